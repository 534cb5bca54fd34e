"""Job gateway of handler-operator: RunPod-compatible serverless HTTP API over a queue backend."""
