"""Prometheus metrics of the gateway, per endpoint, on a registry of its own.

Counters and histograms are fed by job changes; queue gauges are read from the backend at
scrape time (every replica reports the same shared figures: aggregate them with `max`).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from handler_gateway.jobs import TERMINAL, Change, JobStatus

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._children: dict[tuple[Any, ...], Any] = {}
        labels = ["endpoint"]
        self.submitted = Counter(
            "handler_gateway_jobs_submitted", "Jobs accepted", labels, registry=self.registry
        )
        self.finished = Counter(
            "handler_gateway_jobs_finished",
            "Jobs that ended, by final status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.retried = Counter(
            "handler_gateway_jobs_retried",
            "Jobs re-queued (lost worker, retry, replay)",
            labels,
            registry=self.registry,
        )
        self.ignored = Counter(
            "handler_gateway_results_ignored",
            "Worker results for jobs that were cancelled, timed out or reassigned",
            labels,
            registry=self.registry,
        )
        self.delay = Histogram(
            "handler_gateway_job_delay_seconds",
            "Time from submission to a worker taking the job",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.execution = Histogram(
            "handler_gateway_job_execution_seconds",
            "Time from a worker taking the job to its end",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_queue = Gauge(
            "handler_gateway_queue_depth",
            "Jobs waiting in the queue",
            labels,
            registry=self.registry,
        )
        self.in_progress = Gauge(
            "handler_gateway_jobs_in_progress",
            "Jobs running on workers",
            labels,
            registry=self.registry,
        )
        self.channels = Gauge(
            "handler_gateway_job_channels",
            "Job channels (WebSockets of handler_worker's loop) open on this replica",
            labels,
            registry=self.registry,
        )
        self.requests = Counter(
            "handler_gateway_requests",
            "Authenticated routes' requests by endpoint, caller key id (never the key; "
            "'unknown' for a missing or unknown one) and answer status",
            ["endpoint", "key", "code"],
            registry=self.registry,
        )
        self.workers = Gauge(
            "handler_gateway_workers",
            "Workers seen recently, by state",
            ["endpoint", "state"],
            registry=self.registry,
        )

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once (every job change feeds a few)."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def on_change(self, change: Change) -> None:
        job = change.job
        if change.note == "submitted":
            self._child(self.submitted, job.endpoint).inc()
        elif job.status == JobStatus.IN_PROGRESS and change.note == "started":
            delay = job.delay_ms()
            if delay is not None:
                self._child(self.delay, job.endpoint).observe(delay / 1000)
        if job.status in TERMINAL and change.effects.counters:
            self._child(self.finished, job.endpoint, job.status.value).inc()
            execution = job.execution_ms()
            if execution is not None:
                self._child(self.execution, job.endpoint).observe(execution / 1000)
        if change.effects.counters.get("retried"):
            self._child(self.retried, job.endpoint).inc()

    def on_request(self, endpoint: str, key: str, code: int) -> None:
        self._child(self.requests, endpoint, key, str(code)).inc()

    def on_ignored(self, endpoint: str) -> None:
        self.ignored.labels(endpoint).inc()

    def render(self, figures: dict) -> bytes:
        """Exposition text, with queue gauges set from `figures` (Gateway.queues())."""
        for endpoint, fig in figures.items():
            self.in_queue.labels(endpoint).set(fig.inQueue)
            self.in_progress.labels(endpoint).set(fig.inProgress)
            for state in ("idle", "running", "draining"):
                self.workers.labels(endpoint, state).set(getattr(fig.workers, state))
        return generate_latest(self.registry)
