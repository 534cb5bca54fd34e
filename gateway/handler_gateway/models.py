"""Request and response models of the gateway's HTTP API (RunPod-compatible + admin).

Pure: pydantic only. The OpenAPI document is generated from these models.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

ENDPOINT_ID = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")


# The bounds of a job's times, as an endpoint's (`EndpointConfig`): 7 days running, 30 days alive.
MAX_EXECUTION_MS = 7 * 86400 * 1000
MAX_TTL_MS = 30 * 86400 * 1000


class Policy(BaseModel):
    """Per-job policy, as RunPod's `policy` (times in milliseconds)."""

    model_config = ConfigDict(extra="ignore")

    executionTimeout: int | None = Field(
        None, ge=1000, le=MAX_EXECUTION_MS, description="max execution time of the job, ms"
    )
    ttl: int | None = Field(
        None, ge=1000, le=MAX_TTL_MS, description="lifetime of the job from submission, ms"
    )
    lowPriority: bool = False


class RunRequest(BaseModel):
    """Body of `run` and `runsync`."""

    model_config = ConfigDict(extra="ignore")

    input: Any = Field(..., description="the job input handed to the handler")
    webhook: str | None = Field(None, description="URL POSTed with the result when the job ends")
    policy: Policy | None = None
    s3Config: dict[str, Any] | None = None

    @field_validator("input")
    @classmethod
    def _input_present(cls, value: Any) -> Any:
        if value is None:
            raise ValueError('"input" must not be null')
        return value

    @field_validator("webhook")
    @classmethod
    def _webhook_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("webhook must be an http(s) URL")
        return value


class JobView(BaseModel):
    """A job as `run`, `runsync`, `status`, `cancel` and `retry` return it."""

    id: str
    status: str
    delayTime: int | None = None
    executionTime: int | None = None
    output: Any = None
    error: Any = None
    retries: int | None = None
    workerId: str | None = None


class JobSummary(BaseModel):
    """A job as the listing shows it (`GET /v2/{endpoint}/jobs`): no input, output or error."""

    id: str
    status: str
    createdAt: float = Field(description="when it was submitted (Unix time, seconds)")
    delayTime: int | None = None
    executionTime: int | None = None
    workerId: str | None = None
    retries: int | None = None
    lowPriority: bool | None = None


class JobList(BaseModel):
    jobs: list[JobSummary]
    nextCursor: str | None = Field(
        None, description="pass as ?cursor= for the next (older) page; absent: no more"
    )


class StreamChunk(BaseModel):
    output: Any


class StreamView(BaseModel):
    id: str
    status: str
    stream: list[StreamChunk]
    cursor: int = Field(description="pass as ?cursor= to read from here with your own cursor")
    output: Any = None
    error: Any = None


class PurgeResult(BaseModel):
    removed: int
    status: str = "completed"


class HealthJobs(BaseModel):
    completed: int = 0
    failed: int = 0
    inProgress: int = 0
    inQueue: int = 0
    retried: int = 0
    cancelled: int = 0
    timedOut: int = 0


class HealthWorkers(BaseModel):
    idle: int = 0
    running: int = 0
    draining: int = 0


class Health(BaseModel):
    jobs: HealthJobs
    workers: HealthWorkers


class EndpointConfig(BaseModel):
    """An endpoint registration (`PUT /admin/v1/endpoints/{id}`), with per-endpoint defaults."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, description="taken from the URL")
    workerToken: str = Field(..., min_length=16, description="raw token workers authenticate with")
    executionTimeoutSeconds: float = Field(600, ge=1, le=7 * 86400)
    ttlSeconds: float = Field(86400, ge=10, le=30 * 86400)
    maxRetries: int = Field(2, ge=0, le=100)
    heartbeatIntervalSeconds: float = Field(
        10, ge=0.2, le=600, description="the workers' RUNPOD_PING_INTERVAL, in seconds"
    )
    heartbeatMisses: int = Field(
        3, ge=1, le=100, description="missed heartbeats after which a running job is re-queued"
    )
    maxQueued: int | None = Field(
        None,
        ge=1,
        le=100_000_000,
        description="queued jobs beyond which /run and /runsync answer 429 (none: unbounded)",
    )
    maxInputBytes: int | None = Field(
        None,
        ge=1,
        le=1024**3,
        description="largest /run or /runsync request body, in bytes (413 beyond; none: the "
        "gateway's --max-body-bytes)",
    )

    @property
    def lost_after_s(self) -> float:
        return self.heartbeatIntervalSeconds * self.heartbeatMisses


class EndpointSummary(BaseModel):
    id: str
    executionTimeoutSeconds: float
    ttlSeconds: float
    maxRetries: int
    heartbeatIntervalSeconds: float
    heartbeatMisses: int


class EndpointList(BaseModel):
    endpoints: list[EndpointSummary]


class WorkerView(BaseModel):
    id: str
    state: str = Field(description="idle | running | draining")
    jobs: list[str]
    lastSeen: float


class QueueFigures(BaseModel):
    inQueue: int
    inProgress: int
    lowPriorityQueued: int = Field(
        0, description="queued low-priority jobs (in inQueue too): no reason to scale up alone"
    )
    load: int = Field(
        0,
        description="inQueue - lowPriorityQueued + inProgress: what the autoscalers scale on",
    )
    workers: HealthWorkers
    workerStates: dict[str, str] = Field(description="worker id -> idle | running | draining")
    workerJobs: dict[str, int] = Field(
        default_factory=dict, description="worker id -> jobs it holds (draining ones too)"
    )
    lastActivity: float | None = None


class QueuesView(BaseModel):
    endpoints: dict[str, QueueFigures]
    time: float


class DrainResult(BaseModel):
    endpoint: str
    worker: str
    draining: bool
    jobs: list[str] = Field(description="jobs the worker still holds; drained when empty")


class DeadLetterList(BaseModel):
    endpoint: str
    jobs: list[JobView]


class ReplayRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ids: list[str] | None = Field(None, description="job ids to replay; all when omitted")


class ReplayResult(BaseModel):
    replayed: list[str]


class ErrorBody(BaseModel):
    error: str
