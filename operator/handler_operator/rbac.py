"""The Kubernetes permissions the operator uses, in one place: the Helm chart's Role/ClusterRole
is checked against this list, so the two cannot drift apart. Pure data."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    group: str  # "" is the core API group
    resource: str  # with "/subresource" where one is used
    verbs: tuple[str, ...]
    why: str


RULES: tuple[Rule, ...] = (
    Rule(
        "handlerops.dev",
        "handlerdeployments",
        ("get", "list", "watch", "patch"),
        "kopf watches the CRs, keeps its finalizer and progress annotations on them",
    ),
    Rule(
        "handlerops.dev",
        "handlerdeployments/finalizers",
        ("update",),
        "owner references with blockOwnerDeletion: the OwnerReferencesPermissionEnforcement "
        "admission plugin (OpenShift, hardened clusters) refuses every create without it",
    ),
    Rule(
        "handlerops.dev",
        "handlerdeployments/status",
        ("patch",),
        "conditions, observedGeneration, replicas, queue figures",
    ),
    Rule(
        "apps",
        "deployments",
        ("get", "list", "watch", "create", "patch"),
        "server-side apply of the worker Deployments (an apply that creates needs create); "
        "their status feeds READY",
    ),
    Rule(
        "",
        "pods",
        ("list", "watch", "patch", "delete"),
        "crash loops and pending pods feed the status; busy workers get a high "
        "pod-deletion-cost and idle ones 0 (any scale-down removes idle pods first), drained "
        "idle workers the lowest, and are deleted",
    ),
    Rule("", "pods/status", ("patch",), "the heartbeat readiness gate of worker pods"),
    Rule(
        "policy",
        "poddisruptionbudgets",
        ("get", "create", "patch", "delete"),
        "server-side apply of the PodDisruptionBudget of endpoints with minReplicas > 0, "
        "removed when minReplicas goes back to 0",
    ),
    Rule(
        "",
        "secrets",
        ("get", "list", "watch", "create"),
        "the per-endpoint worker token, created once (named after its content, computed, never "
        "read back or changed); read: image pull Secrets exist, and the client keys of the "
        "Secrets labelled handlerops.dev/client-keys, listed and watched with that selector "
        "(no other is read; only digests leave the operator)",
    ),
    Rule(
        "",
        "serviceaccounts",
        ("get", "create", "patch"),
        "server-side apply of the workers' account",
    ),
    Rule("", "events", ("create",), "events on HandlerDeployments (kopf's and the scaler's)"),
    Rule(
        "apiextensions.k8s.io",
        "customresourcedefinitions",
        ("list", "watch"),
        "kopf notices CRDs appearing later (cluster-scoped: a ClusterRole even when "
        "watchNamespaces is set)",
    ),
    Rule(
        "keda.sh",
        "scaledobjects",
        ("get", "create", "patch", "delete"),
        "scaling.engine: keda renders a ScaledObject, removed when switching back",
    ),
    Rule(
        "keda.sh",
        "triggerauthentications",
        ("get", "create", "patch", "delete"),
        "the ScaledObject's credentials for the gateway's queue route",
    ),
)


def policy_rules() -> list[dict[str, list[str]]]:
    """RULES in the shape of a Role's `rules`, one entry per resource."""
    return [
        {"apiGroups": [rule.group], "resources": [rule.resource], "verbs": list(rule.verbs)}
        for rule in RULES
    ]
