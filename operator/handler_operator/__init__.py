"""Control plane of handler-operator: CRD models, builders, autoscaling policy and kopf handlers."""
