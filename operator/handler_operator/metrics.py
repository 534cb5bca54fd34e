"""Prometheus metrics of the operator (reconcile counts and latency) and their HTTP server."""

from __future__ import annotations

import contextlib

from prometheus_client import Counter, Histogram, start_http_server

RECONCILES = Counter(
    "handler_operator_reconciles", "HandlerDeployment reconciles, by outcome", ["outcome"]
)
RECONCILE_SECONDS = Histogram(
    "handler_operator_reconcile_seconds",
    "Time to reconcile one HandlerDeployment",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
_started: set[int] = set()


def start_metrics_server(port: int) -> None:
    """Serve /metrics on `port` once per process (kopf may call startup more than once in tests)."""
    if port in _started:
        return
    with contextlib.suppress(OSError):  # the port is taken: metrics off, the operator still runs
        start_http_server(port)
        _started.add(port)
