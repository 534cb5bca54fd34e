"""The HandlerDeployment custom resource as pydantic models: the single source of the CRD schema.

Pure: pydantic only. `crds.py` turns these models into `crds/handlerdeployments.yaml`; the
operator parses every CR through them, so the API server and the operator agree on defaults.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from handler_protocol.ids import endpoint_id
from handler_protocol.models import RateLimit, RetryOnError

GROUP = "handlerops.dev"
VERSION = "v1alpha1"
KIND = "HandlerDeployment"
PLURAL = "handlerdeployments"
SHORT_NAME = "hd"
CATEGORY = "handlerops"

# The CR's name is the workers' app.kubernetes.io/instance label value: at most 63 characters.
MAX_NAME = 63
NAME_RULE = f"self.metadata.name.size() <= {MAX_NAME}"
NAME_MESSAGE = (
    f"metadata.name must be at most {MAX_NAME} characters: it is the value of the worker pods' "
    "app.kubernetes.io/instance label"
)
MODULE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
RESERVED_ENV_PREFIXES = ("RUNPOD_", "HANDLER_")
RESERVED_ENV_RULE = "self.all(e, !e.name.startsWith('RUNPOD_') && !e.name.startsWith('HANDLER_'))"
# What the API server's CEL compiler must see of an env entry: its `name`, declared, bounded
# (a rule may only select declared fields, and its cost must be bounded); the rest of the EnvVar
# shape is kept as-is and validated by the API server when the Deployment is applied.
ENV_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
MAX_ENV = 128
ENV_ITEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 256, "pattern": ENV_NAME_PATTERN}
    },
    "additionalProperties": True,
}

# An image reference as the container runtime parses it (distribution/reference): an optional
# registry host[:port], lowercase path components, then a tag, a digest, or both.
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_PATTERN = (
    rf"^(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*(?::[0-9]+)?/)?{_PATH_PART}(?:/{_PATH_PART})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$"
)
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"

# A Kubernetes object (EnvVar, Volume, Toleration ...) kept as-is: the API server validates it.
K8sObject = dict[str, Any]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class HandlerSpec(_Spec):
    """Which Python module serves the jobs."""

    module: str = Field(
        ...,
        pattern=MODULE_PATTERN,
        description="Dotted module name exporting `handler` (HANDLER_MODULE), importable in the "
        "image, e.g. handlers.sdxl.",
    )


PRODUCT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
PRODUCTS_MESSAGE = "set resources.gpu.product or resources.gpu.products, not both"


class GpuSpec(_Spec):
    """GPUs per worker."""

    count: int = Field(1, ge=0, le=16, description="GPUs per worker pod (0: CPU only).")
    vendor: Literal["nvidia", "amd"] = Field(
        "nvidia", description="Device plugin vendor: nvidia (nvidia.com/gpu) or amd (amd.com/gpu)."
    )
    product: str | None = Field(
        None,
        max_length=128,
        pattern=PRODUCT_PATTERN,
        description="GPU product label value (nvidia.com/gpu.product, amd.com/gpu.product-name, "
        "set by GPU Feature Discovery); workers are scheduled only on such nodes, e.g. "
        "NVIDIA-A100-SXM4-80GB.",
    )
    products: list[Annotated[str, Field(max_length=128, pattern=PRODUCT_PATTERN)]] = Field(
        default_factory=list,
        max_length=8,
        description="Acceptable GPU products in order of preference (instead of `product`): "
        "workers go only to nodes with one of them, preferring the earlier ones.",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.product) || !has(self.products) || size(self.products) == 0",
                    "message": PRODUCTS_MESSAGE,
                }
            ]
        },
        extra="forbid",
        populate_by_name=True,
    )

    @model_validator(mode="after")
    def _one_product_field(self) -> GpuSpec:
        if self.product and self.products:
            raise ValueError(PRODUCTS_MESSAGE)
        return self

    @property
    def acceptable_products(self) -> list[str]:
        """The products a worker may run on, most preferred first (empty: any)."""
        return list(self.products) or ([self.product] if self.product else [])


class ResourcesSpec(_Spec):
    """Compute resources of each worker."""

    gpu: GpuSpec | None = Field(None, description="GPUs per worker; omit for CPU-only handlers.")
    requests: dict[str, str] = Field(
        default_factory=dict,
        description="Container resource requests, e.g. {cpu: '4', memory: 16Gi}.",
    )
    limits: dict[str, str] = Field(
        default_factory=dict, description="Container resource limits (the GPU limit is added)."
    )


class SharedMemorySpec(_Spec):
    """A memory-backed /dev/shm: containers get 64 MiB otherwise, and GPU frameworks (NCCL,
    PyTorch DataLoader workers) need more."""

    enabled: bool | None = Field(
        None, description="Mount it; default: on for GPU endpoints, off for CPU-only ones."
    )
    sizeLimit: str = Field(
        "2Gi",
        max_length=32,
        pattern=QUANTITY_PATTERN,
        description="Size limit of the emptyDir (medium Memory); what it holds counts against "
        "the pod's memory.",
    )


ROLLOUT_BOTH_ZERO = "rollout.maxSurge and rollout.maxUnavailable cannot both be 0"
ROLLOUT_RECREATE = "rollout.maxSurge and rollout.maxUnavailable apply to RollingUpdate only"


class RolloutSpec(_Spec):
    """How a spec change replaces the workers. Default: RollingUpdate with maxSurge 1 and
    maxUnavailable 0 for CPU endpoints; maxSurge 0 and maxUnavailable 1 for GPU endpoints (a surge
    pod would need a spare GPU a full cluster does not have). A replaced worker finishes its job
    in flight within its termination grace period either way."""

    strategy: Literal["RollingUpdate", "Recreate"] = Field(
        "RollingUpdate", description="Deployment strategy type."
    )
    maxSurge: int | None = Field(
        None, ge=0, le=1000, description="Extra workers during a rollout (default by GPU use)."
    )
    maxUnavailable: int | None = Field(
        None, ge=0, le=1000, description="Workers that may be missing during a rollout."
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.maxSurge) || !has(self.maxUnavailable) || "
                    "self.maxSurge > 0 || self.maxUnavailable > 0",
                    "message": ROLLOUT_BOTH_ZERO,
                },
                {
                    "rule": "self.strategy != 'Recreate' || "
                    "(!has(self.maxSurge) && !has(self.maxUnavailable))",
                    "message": ROLLOUT_RECREATE,
                },
            ]
        },
        extra="forbid",
        populate_by_name=True,
    )

    @model_validator(mode="after")
    def _consistent(self) -> RolloutSpec:
        if self.maxSurge == 0 and self.maxUnavailable == 0:
            raise ValueError(ROLLOUT_BOTH_ZERO)
        if self.strategy == "Recreate" and (
            self.maxSurge is not None or self.maxUnavailable is not None
        ):
            raise ValueError(ROLLOUT_RECREATE)
        return self


RATE_FIELDS = ("maxScaleUpRate", "maxScaleDownRate")


def _rate_message(name: str) -> str:
    return f"{name} must be 0 (no limit) or at least 1"


def _rate_rule(name: str) -> dict[str, Any]:
    """CEL twin of ScalingSpec._rate: a rate is 0 or at least 1."""
    return {
        "rule": f"!has(self.{name}) || self.{name} == 0.0 || self.{name} >= 1.0",
        "message": _rate_message(name),
    }


class ScalingSpec(_Spec):
    """How many workers run; scaled on the endpoint's queue."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    # has(): the CRD's `default: {}` is checked before its fields' defaults apply.
                    "rule": "!has(self.maxReplicas) || !has(self.minReplicas) "
                    "|| self.maxReplicas >= self.minReplicas",
                    "message": "maxReplicas must be greater than or equal to minReplicas",
                },
                *[_rate_rule(name) for name in RATE_FIELDS],
            ]
        },
    )

    minReplicas: int = Field(
        0, ge=0, le=1000, description="Workers kept at all times (0: scale to zero)."
    )
    maxReplicas: int = Field(1, ge=0, le=1000, description="Most workers at once.")
    replicas: int | None = Field(
        None,
        ge=0,
        le=1000,
        description="Fixed worker count (set by `kubectl scale hd`); while set, the autoscaler "
        "is off. Remove it to autoscale again.",
    )
    targetQueuePerWorker: int = Field(
        1,
        ge=1,
        le=10000,
        description="Queued plus running jobs one worker should hold: desired workers = "
        "ceil((inQueue + inProgress) / targetQueuePerWorker).",
    )
    targetQueueDelaySeconds: int | None = Field(
        None,
        ge=1,
        le=86400,
        description="RunPod's request-delay scaler: one more worker when the next job to run "
        "has waited longer than this and every worker is up (none on its way); on top of the "
        "queue-depth rule. The builtin engine and handlerctl dev.",
    )
    scaleToZeroAfterSeconds: int = Field(
        60, ge=0, le=86400, description="Idle time before the last workers are removed."
    )
    scaleDownStabilizationSeconds: int = Field(
        30,
        ge=0,
        le=3600,
        description="Scale down only to the highest recommendation of this window.",
    )
    pendingTimeoutSeconds: int = Field(
        600,
        ge=10,
        le=86400,
        description="How long pods may wait for GPU capacity before Scaling reports WaitingForCapacity.",
    )
    maxScaleUpRate: float = Field(
        0,
        ge=0,
        le=1000,
        description="Most workers after one scale-up, as a multiple of the current count "
        "(at least one more); 0: no limit, straight to what the queue needs.",
    )
    maxScaleDownRate: float = Field(
        2,
        ge=0,
        le=1000,
        description="Fewest workers after one scale-down, as a fraction 1/rate of the current "
        "count (2: at most half go at once); 0: no limit.",
    )
    kedaPollingIntervalSeconds: int = Field(
        5, ge=1, le=3600, description="engine keda: how often KEDA reads the queue."
    )
    engine: Literal["builtin", "keda"] = Field(
        "builtin", description="builtin: the operator's 1 s loop; keda: render a KEDA ScaledObject."
    )

    @field_validator(*RATE_FIELDS)
    @classmethod
    def _rate(cls, value: float, info: Any) -> float:
        if 0 < value < 1:
            raise ValueError(_rate_message(info.field_name))
        return value


class JobsSpec(_Spec):
    """Job defaults of the endpoint (a job's own policy overrides them)."""

    executionTimeoutSeconds: int = Field(
        600, ge=1, le=7 * 86400, description="Max run time of a job."
    )
    ttlSeconds: int = Field(
        86400, ge=10, le=30 * 86400, description="Lifetime of a job and its result."
    )
    maxRetries: int = Field(
        2, ge=0, le=100, description="Redeliveries after a lost worker before the DLQ."
    )
    concurrency: int = Field(
        1, ge=1, le=256, description="Jobs one worker runs at once (HANDLER_CONCURRENCY)."
    )
    heartbeatIntervalSeconds: int = Field(
        5, ge=1, le=600, description="Worker heartbeat period (RUNPOD_PING_INTERVAL)."
    )
    maxQueued: int | None = Field(
        None,
        ge=1,
        le=100_000_000,
        description="Queued jobs beyond which /run and /runsync answer 429 with Retry-After "
        "(unset: unbounded).",
    )
    maxInputBytes: int | None = Field(
        None,
        ge=1,
        le=1024**3,
        description="Largest /run or /runsync request body in bytes; larger ones get 413 "
        "(unset: the gateway's own limit).",
    )
    retryOnError: RetryOnError | None = Field(
        None,
        description="Retries of jobs whose handler failed (opt-in): attempts, exponential "
        "backoff with jitter, which exception types. A job's policy.retryOnError overrides it.",
    )


class ImagePullSecret(_Spec):
    name: str = Field(..., min_length=1, max_length=253)


class AccessSecret(_Spec):
    """A Secret in the endpoint's namespace whose values are client keys that may call it."""

    name: str = Field(..., min_length=1, max_length=253)
    keys: list[Annotated[str, Field(min_length=1, max_length=253)]] = Field(
        default_factory=list,
        max_length=256,
        description="Which of its data keys hold client keys (empty: every one).",
    )


class AccessSpec(_Spec):
    """Who may call the endpoint, how often, and its worker token's rotation."""

    secrets: list[AccessSecret] = Field(
        default_factory=list,
        max_length=64,
        description="Secrets whose values are client keys scoped to this endpoint. Label a "
        "Secret handlerops.dev/client-keys=endpoint so a change to it applies at once (else "
        "at the next reconcile); handlerops.dev/client-keys=namespace makes its keys reach "
        "every endpoint of the namespace without being named here.",
    )
    rateLimit: RateLimit | None = Field(
        None, description="Per caller (key) token bucket; 429 with Retry-After beyond it."
    )
    runsCallerCode: bool | None = Field(
        None,
        description="The endpoint runs code its callers send, so only keys scoped to it may "
        "call it (unset: true for handler_worker.generic; set true for a module of your own "
        "that runs pickled callables).",
    )
    workerTokenRotation: str = Field(
        "",
        max_length=63,
        description="Change it to rotate the worker token: workers restart with the new one, "
        "and the old one works until none of them uses it.",
    )


class HandlerDeploymentSpec(_Spec):
    """Desired state of a HandlerDeployment."""

    handler: HandlerSpec
    image: str | None = Field(
        None,
        min_length=1,
        max_length=512,
        pattern=IMAGE_PATTERN,
        description="Worker image, by tag or digest (registry/name:tag, name@sha256:...); the "
        "operator's default image when omitted.",
    )
    imagePullPolicy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        None,
        description="Default as Kubernetes derives it: Always for :latest or an untagged image, "
        "IfNotPresent for a tag or digest.",
    )
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    jobs: JobsSpec = Field(default_factory=JobsSpec)
    env: list[K8sObject] = Field(
        default_factory=list,
        max_length=MAX_ENV,
        description="Extra container env (Kubernetes EnvVar); RUNPOD_* and HANDLER_* are reserved.",
        json_schema_extra={
            "items": ENV_ITEM_SCHEMA,
            "x-kubernetes-validations": [
                {
                    "rule": RESERVED_ENV_RULE,
                    "message": "env names starting with RUNPOD_ or HANDLER_ are set by the operator",
                }
            ],
        },
    )
    envFrom: list[K8sObject] = Field(
        default_factory=list, description="Kubernetes EnvFromSource list."
    )
    volumes: list[K8sObject] = Field(default_factory=list, description="Pod volumes.")
    volumeMounts: list[K8sObject] = Field(
        default_factory=list, description="Worker container mounts."
    )
    tolerations: list[K8sObject] = Field(default_factory=list, description="Extra pod tolerations.")
    nodeSelector: dict[str, str] = Field(default_factory=dict)
    affinity: K8sObject | None = Field(
        None,
        description="Pod affinity (Kubernetes Affinity); the GPU product requirement is added "
        "to each of its required node selector terms.",
    )
    topologySpreadConstraints: list[K8sObject] = Field(
        default_factory=list, max_length=16, description="Pod topology spread constraints."
    )
    runtimeClassName: str | None = Field(None, description="e.g. nvidia")
    imagePullSecrets: list[ImagePullSecret] = Field(default_factory=list)
    podAnnotations: dict[str, str] = Field(default_factory=dict)
    podLabels: dict[str, str] = Field(default_factory=dict)
    priorityClassName: str | None = None
    podSecurityContext: K8sObject | None = Field(
        None,
        description="Pod securityContext; replaces the default, which passes the Pod Security "
        "Standard 'restricted' (runAsNonRoot, uid/gid 10001 as in the worker image, seccomp "
        "RuntimeDefault).",
    )
    securityContext: K8sObject | None = Field(
        None,
        description="Worker container securityContext; replaces the default "
        "(allowPrivilegeEscalation false, all capabilities dropped).",
    )
    sharedMemory: SharedMemorySpec = Field(default_factory=SharedMemorySpec)
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    access: AccessSpec = Field(default_factory=AccessSpec)

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: list[K8sObject]) -> list[K8sObject]:
        for item in env:
            name = item.get("name")
            if not isinstance(name, str) or not name:
                raise ValueError("every env entry needs a name")
            if not re.fullmatch(ENV_NAME_PATTERN, name) or len(name) > 256:
                raise ValueError(f"env name {name!r} is not a valid environment variable name")
            if name.startswith(RESERVED_ENV_PREFIXES):
                raise ValueError(
                    f"env {name} is reserved: RUNPOD_* and HANDLER_* are set by the operator"
                )
        return env

    @model_validator(mode="after")
    def _scaling_bounds(self) -> HandlerDeploymentSpec:
        if self.scaling.maxReplicas < self.scaling.minReplicas:
            raise ValueError("scaling.maxReplicas must be greater than or equal to minReplicas")
        return self


class Condition(BaseModel):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    lastTransitionTime: str | None = None
    observedGeneration: int | None = None


class QueueStatus(BaseModel):
    inQueue: int = 0
    inProgress: int = 0
    workerRefreshes: int = Field(
        0, description="times a worker started afresh because a job asked (refresh_worker)"
    )


class HandlerDeploymentStatus(BaseModel):
    """Observed state, written by the operator (kopf adds keys of its own)."""

    model_config = ConfigDict(extra="allow")

    observedGeneration: int | None = None
    endpointId: str | None = None
    replicas: int | None = None
    readyReplicas: int | None = None
    desiredReplicas: int | None = None
    ready: str | None = Field(None, description="readyReplicas/desired, for kubectl get")
    gpu: str | None = Field(None, description="GPU summary, for kubectl get")
    selector: str | None = Field(
        None, description="label selector of the workers (scale subresource)"
    )
    queue: QueueStatus | None = None
    lastScaleTime: str | None = None
    clientKeys: list[str] | None = Field(
        None, description="ids of the client keys registered for the endpoint (never the keys)"
    )
    workerTokenRotation: str | None = Field(
        None, description="the spec.access.workerTokenRotation the worker token is of"
    )
    retiringWorkerTokenRotations: list[str] | None = Field(
        None, description="rotations before, each accepted until no worker uses its token"
    )
    conditions: list[Condition] = Field(default_factory=list)


class HandlerDeployment(BaseModel):
    """A whole CR as the operator reads it."""

    model_config = ConfigDict(extra="ignore")

    apiVersion: str = f"{GROUP}/{VERSION}"
    kind: str = KIND
    metadata: dict[str, Any]
    spec: HandlerDeploymentSpec
    status: HandlerDeploymentStatus | None = None

    @field_validator("metadata")
    @classmethod
    def _name_fits_a_label(cls, metadata: dict[str, Any]) -> dict[str, Any]:
        name = metadata.get("name") or ""
        if len(name) > MAX_NAME:
            raise ValueError(NAME_MESSAGE + f" (got {len(name)})")
        return metadata

    @property
    def name(self) -> str:
        return str(self.metadata["name"])

    @property
    def namespace(self) -> str:
        return self.metadata.get("namespace") or "default"

    @property
    def endpoint_id(self) -> str:
        return endpoint_id(self.namespace, self.name)


def is_module_name(value: str) -> bool:
    return re.match(MODULE_PATTERN, value) is not None


def describe_errors(exc: ValidationError, most: int = 5) -> str:
    """A validation error as people read it: each field's path and a plain message (no
    pydantic documentation links), up to `most` of them."""
    found = exc.errors(include_url=False)
    parts = []
    for error in found[:most]:
        where = ".".join(str(p) for p in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    if len(found) > most:
        parts.append(f"and {len(found) - most} more")
    return "; ".join(parts)
