"""Request and response models of the gateway's HTTP API (RunPod-compatible + admin): what
clients, workers and the operator send and get.

Pure: pydantic only. The OpenAPI document is generated from these models.
"""

from __future__ import annotations

import hashlib
import re
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The bounds of a job's times, as an endpoint's (`EndpointConfig`): 7 days running, 30 days alive.
MAX_EXECUTION_MS = 7 * 86400 * 1000
MAX_TTL_MS = 30 * 86400 * 1000


class RetryOnError(BaseModel):
    """Retries of jobs whose handler failed (ours, opt-in; lost workers are redelivered
    anyway): up to `maxAttempts` runs in all, the n-th retry after
    min(maxBackoffSeconds, backoffSeconds × 2^(n-1)), half of it jittered."""

    model_config = ConfigDict(extra="forbid")

    maxAttempts: int = Field(..., ge=2, le=20, description="runs in all, the first included")
    backoffSeconds: float = Field(1.0, ge=0, le=3600, description="before the first retry")
    maxBackoffSeconds: float = Field(60.0, ge=0, le=86400, description="the longest wait")
    errorTypes: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        None,
        max_length=50,
        description="exception class names to retry (e.g. OutOfMemoryError or "
        "torch.cuda.OutOfMemoryError); none: every handler error",
    )


class Policy(BaseModel):
    """Per-job policy, as RunPod's `policy` (times in milliseconds). Every field acts; an
    unknown one is refused (400), never ignored."""

    model_config = ConfigDict(extra="forbid")

    executionTimeout: int | None = Field(
        None, ge=1000, le=MAX_EXECUTION_MS, description="max execution time of the job, ms"
    )
    ttl: int | None = Field(
        None, ge=1000, le=MAX_TTL_MS, description="lifetime of the job from submission, ms"
    )
    lowPriority: bool = False
    retryOnError: RetryOnError | None = Field(
        None, description="ours: retries of this job when its handler fails (over the endpoint's)"
    )


class S3Config(BaseModel):
    """A job's bucket, as RunPod's `s3Config`: handed to the handler with the job
    (`job["s3Config"]`, what the SDK's `rp_upload` takes as bucket credentials)."""

    model_config = ConfigDict(extra="forbid")

    accessId: str = Field(..., min_length=1, max_length=1024)
    accessSecret: str = Field(..., min_length=1, max_length=1024)
    bucketName: str = Field(..., min_length=1, max_length=255)
    endpointUrl: str = Field(..., min_length=1, max_length=2048)


class RunRequest(BaseModel):
    """Body of `run` and `runsync`. Every field acts; an unknown one is refused (400)."""

    model_config = ConfigDict(extra="forbid")

    input: Any = Field(..., description="the job input handed to the handler")
    webhook: str | None = Field(None, description="URL POSTed with the result when the job ends")
    policy: Policy | None = None
    s3Config: S3Config | None = Field(
        None, description="the job's bucket: handed to the handler with the job (job['s3Config'])"
    )

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


class HandlerProblem(BaseModel):
    """Why an endpoint's workers cannot run jobs now (the handler does not import, workers
    crash-loop), as the operator or `handlerctl dev` reported it: what a waiting client is told."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(
        ..., min_length=1, max_length=64, pattern=r"^[A-Za-z][A-Za-z0-9]*$",
        description="CamelCase, as the HandlerHealthy condition's (CrashLoopBackOff, ...)",
    )  # fmt: skip
    message: str = Field(..., max_length=2000, description="the loader's message, or the crash's")
    since: float | None = Field(None, description="unix time the gateway was first told")


class HandlerProblemView(BaseModel):
    """An endpoint's handler problem as the admin route answers it (null: none)."""

    endpoint: str
    handlerProblem: HandlerProblem | None = None


class JobView(BaseModel):
    """A job as `run`, `runsync`, `status`, `cancel` and `retry` return it. A job still queued
    on an endpoint whose workers are failing carries `handlerProblem` (ours): why it waits."""

    id: str
    status: str
    delayTime: int | None = None
    executionTime: int | None = None
    output: Any = None
    error: Any = None
    retries: int | None = None
    workerId: str | None = None
    handlerProblem: HandlerProblem | None = None
    attempt: int | None = Field(None, description="ours: the run it is on, when retried on error")
    attempts: list[dict[str, Any]] | None = Field(
        None, description="ours: the failed runs before (error, workerId, finishedAt)"
    )
    retryAt: float | None = Field(None, description="ours: when a retry waiting joins the queue")


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
    attempt: int | None = Field(None, description="the run it is on, when retried on error")


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
    refreshes: int = Field(
        0, description="times a worker started afresh after a job asked (refresh_worker)"
    )


class Health(BaseModel):
    jobs: HealthJobs
    workers: HealthWorkers
    handlerProblem: HandlerProblem | None = Field(
        None, description="set while the endpoint's workers are failing (ours)"
    )


SHA256_HEX = r"^[0-9a-f]{64}$"
KEY_ID = r"^[A-Za-z0-9][A-Za-z0-9._/:@-]{0,599}$"  # namespace/secret/data-key fits


def digest(credential: str) -> str:
    """What the gateway keeps of a key or token: its SHA-256, hex (keys are random and long,
    so a digest cannot be reversed; a dump of the backend holds no credential)."""
    return hashlib.sha256(credential.encode()).hexdigest()


class ClientKey(BaseModel):
    """A client key that may call one endpoint, by its digest (the operator registers the keys
    of the Secrets a HandlerDeployment names in `spec.access`, and its namespace's keys)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(
        ..., pattern=KEY_ID, description="shown in logs and metrics, e.g. namespace/secret/key"
    )
    sha256: str = Field(..., pattern=SHA256_HEX, description="SHA-256 of the key, hex")
    scope: Literal["endpoint", "namespace"] = Field(
        "endpoint", description="where the key came from: this endpoint's, or its namespace's"
    )


class RateLimit(BaseModel):
    """Requests per second each caller (key) may make to one endpoint: a token bucket (also
    the HandlerDeployment's spec.access.rateLimit)."""

    model_config = ConfigDict(extra="forbid")

    requestsPerSecond: float = Field(
        ...,
        ge=0.001,
        le=1_000_000,
        description="Sustained requests per second of one caller (key).",
    )
    burst: int = Field(..., ge=1, le=1_000_000, description="Requests one caller may make at once.")


class EndpointConfig(BaseModel):
    """An endpoint registration (`PUT /admin/v1/endpoints/{id}`), with per-endpoint defaults."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, description="taken from the URL")
    workerToken: str | None = Field(
        None,
        min_length=16,
        description="raw token workers authenticate with: kept only as its digest",
    )
    workerTokenSha256: list[str] = Field(
        default_factory=list,
        max_length=4,
        description="digests of the worker tokens accepted (more than one while one rotates)",
    )
    namespace: str | None = Field(None, max_length=253, description="the endpoint's namespace")
    runsCallerCode: bool = Field(
        False,
        description="the endpoint runs code its callers send (handler_worker.generic): only "
        "keys scoped to it may call it, never a global or admin key",
    )
    clientKeys: list[ClientKey] = Field(
        default_factory=list, max_length=10_000, description="keys scoped to this endpoint"
    )
    rateLimit: RateLimit | None = Field(None, description="per caller; none: unlimited")
    retryOnError: RetryOnError | None = Field(
        None, description="retries of jobs whose handler fails; none: a handler error is final"
    )
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

    @field_validator("workerTokenSha256")
    @classmethod
    def _digests(cls, value: list[str]) -> list[str]:
        for item in value:
            if not re.match(SHA256_HEX, item):
                raise ValueError("a worker token digest is 64 lowercase hex characters")
        return value

    @model_validator(mode="after")
    def _keep_digest_only(self) -> EndpointConfig:
        """A raw worker token becomes the first digest (and is forgotten)."""
        if self.workerToken is not None:
            token = digest(self.workerToken)
            self.workerTokenSha256 = [token, *(d for d in self.workerTokenSha256 if d != token)]
            self.workerToken = None
        if not self.workerTokenSha256:
            raise ValueError("workerToken or workerTokenSha256 is required")
        return self

    @property
    def lost_after_s(self) -> float:
        return self.heartbeatIntervalSeconds * self.heartbeatMisses

    @cached_property
    def _client_keys(self) -> dict[str, ClientKey]:
        return {key.sha256: key for key in self.clientKeys}

    def client_key(self, sha256: str) -> ClientKey | None:
        return self._client_keys.get(sha256)


class EndpointSummary(BaseModel):
    id: str
    executionTimeoutSeconds: float
    ttlSeconds: float
    maxRetries: int
    heartbeatIntervalSeconds: float
    heartbeatMisses: int
    maxQueued: int | None = None
    maxInputBytes: int | None = None
    namespace: str | None = None
    runsCallerCode: bool = False
    clientKeys: list[str] = Field(default_factory=list, description="ids of its scoped keys")
    workerTokens: int = Field(1, description="worker tokens accepted (2 while one rotates)")
    rateLimit: RateLimit | None = None


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
    retriesWaiting: int = Field(
        0,
        description="queued jobs (in inQueue too) waiting out a retry backoff: no worker can "
        "take them yet, so they bring none",
    )
    load: int = Field(
        0,
        description="inQueue - lowPriorityQueued - retriesWaiting + inProgress: what the "
        "autoscalers scale on",
    )
    workers: HealthWorkers
    workerStates: dict[str, str] = Field(description="worker id -> idle | running | draining")
    workerJobs: dict[str, int] = Field(
        default_factory=dict, description="worker id -> jobs it holds (draining ones too)"
    )
    lastActivity: float | None = None
    queueDelaySeconds: float = Field(
        0.0,
        ge=0,
        description="how long the next normal-priority job to run has waited (0: none queued)",
    )


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
