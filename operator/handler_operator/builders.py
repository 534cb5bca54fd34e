"""Pure builders of the Kubernetes objects a HandlerDeployment owns (no I/O).

`build_deployment`, `build_secret`, `build_service_account` return plain dicts ready for
server-side apply; owner references are added by the kopf handlers. `check_spec` reports what
the schema cannot catch as `SpecProblem`s (reason + message) for the Ready condition.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any

from handler_operator.models import GROUP, HandlerDeployment
from handler_operator.settings import FIELD_MANAGER, OperatorSettings
from handler_protocol.models import digest
from handler_protocol.urls import worker_webhook_env

WORKER_CONTAINER = "worker"
TOKEN_KEY = "token"
HEARTBEAT_CONDITION = f"{GROUP}/heartbeat"
# Defaults that pass the Pod Security Standard "restricted" (namespaces labelled
# pod-security.kubernetes.io/enforce: restricted admit no other pods); the uid is the worker
# image's. A HandlerDeployment replaces either with its own.
WORKER_UID = 10001
RESTRICTED_POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": WORKER_UID,
    "runAsGroup": WORKER_UID,
    "fsGroup": WORKER_UID,
    "seccompProfile": {"type": "RuntimeDefault"},
}
RESTRICTED_CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}
# A ReplicaSet scaling down removes the pods with the lowest deletion cost first.
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
LOWEST_DELETION_COST = str(-(2**31))
GPU_RESOURCE = {"nvidia": "nvidia.com/gpu", "amd": "amd.com/gpu"}
KEDA_API = "keda.sh/v1alpha1"
GPU_PRODUCT_LABEL = {"nvidia": "nvidia.com/gpu.product", "amd": "amd.com/gpu.product-name"}
# Product label values that name the other vendor's hardware.
FOREIGN_PRODUCT_HINTS = {
    "nvidia": ("AMD", "INSTINCT", "RADEON", "MI2", "MI3"),
    "amd": ("NVIDIA", "TESLA", "GEFORCE", "QUADRO", "H100", "A100", "L40", "RTX"),
}


def label_value(value: str) -> str:
    """`value` as a label value (at most 63 characters): kept when it fits, else its head and a
    stable hash, so that two long endpoint ids never share a label."""
    if len(value) <= 63:
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:10]
    return f"{value[:52].rstrip('-._')}-{digest}"


def labels(hd: HandlerDeployment) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "handler-worker",
        "app.kubernetes.io/instance": hd.name,
        "app.kubernetes.io/managed-by": "handler-operator",
        f"{GROUP}/endpoint": label_value(hd.endpoint_id),
    }


def selector_labels(hd: HandlerDeployment) -> dict[str, str]:
    return {"app.kubernetes.io/name": "handler-worker", "app.kubernetes.io/instance": hd.name}


def selector_string(hd: HandlerDeployment) -> str:
    return ",".join(f"{k}={v}" for k, v in selector_labels(hd).items())


def worker_token(
    hd: HandlerDeployment, settings: OperatorSettings, rotation: str | None = None
) -> str:
    """The endpoint's worker token: an HMAC of the CR's uid (and of its
    `spec.access.workerTokenRotation`, or of `rotation`) under the gateway admin key. The
    operator computes it rather than reading it back; it stays the same while the CR lives and
    the rotation does not change, and a re-created CR (new uid) gets a new one."""
    rotation = hd.spec.access.workerTokenRotation if rotation is None else rotation
    subject = hd.metadata.get("uid", "") + (f"/{rotation}" if rotation else "")
    message = f"{GROUP}/worker-token/v1/{subject}".encode()
    digest = hmac.new(settings.gateway_admin_key.encode(), message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


# A Secret labelled so holds client keys: "endpoint" ones reach the endpoints naming it in
# spec.access, "namespace" ones every endpoint of its namespace. The operator watches them.
CLIENT_KEYS_LABEL = f"{GROUP}/client-keys"
# Each namespace's key for calls between its endpoints (`@remote` inside a worker): a
# namespace-scoped client key, made by the operator, given to every worker pod.
CALLS_SECRET, CALLS_KEY = "handler-calls", "key"
MIN_CLIENT_KEY = 16  # characters: a short value (a user name, "true") is no key
GENERIC_HANDLER = "handler_worker.generic"


def runs_caller_code(hd: HandlerDeployment) -> bool:
    """The generic handler runs the code a job sends: remote code execution by design (and so
    does any module that says so in spec.access.runsCallerCode)."""
    declared = hd.spec.access.runsCallerCode
    return hd.spec.handler.module == GENERIC_HANDLER if declared is None else declared


def build_client_keys(
    hd: HandlerDeployment, secrets: list[dict[str, Any]]
) -> tuple[list[dict[str, str]], list[SpecProblem]]:
    """The client keys of the endpoint as the gateway keeps them (id, SHA-256, scope), from
    `secrets` (its namespace's labelled ones: the operator reads no other), and what is wrong:
    a named Secret that does not exist or is not labelled, a named data key it lacks, a value
    too short to be a key."""
    by_name = {(s.get("metadata") or {}).get("name"): s for s in secrets}
    keys: dict[str, dict[str, str]] = {}
    problems = []

    def add(secret: dict[str, Any], scope: str, wanted: list[str]) -> None:
        name = secret["metadata"]["name"]
        data = secret.get("data") or {}
        for missing in [key for key in wanted if key not in data]:
            problems.append(
                SpecProblem(
                    "AccessSecretKeyMissing",
                    f"Secret '{name}' named in spec.access has no key '{missing}'",
                )
            )
        for key, encoded in sorted(data.items()):
            if wanted and key not in wanted:
                continue
            value = base64.b64decode(encoded).decode("utf-8", "replace").strip()
            if len(value) < MIN_CLIENT_KEY:
                problems.append(
                    SpecProblem(
                        "AccessKeyTooShort",
                        f"Secret '{name}' key '{key}' holds {len(value)} characters: a client "
                        f"key needs at least {MIN_CLIENT_KEY} (it is not registered)",
                    )
                )
                continue
            sha256 = hashlib.sha256(value.encode()).hexdigest()
            keys.setdefault(sha256, {"id": f"{hd.namespace}/{name}/{key}", "sha256": sha256,
                                     "scope": scope})  # fmt: skip

    for ref in hd.spec.access.secrets:
        if ref.name in by_name:
            add(by_name[ref.name], "endpoint", ref.keys)
        else:
            problems.append(
                SpecProblem(
                    "AccessSecretMissing",
                    f"Secret '{ref.name}' named in spec.access does not exist in namespace "
                    f"'{hd.namespace}' or is not labelled {CLIENT_KEYS_LABEL} (the operator "
                    "reads no other Secret)",
                )
            )
    named = {ref.name for ref in hd.spec.access.secrets}
    for secret in secrets:
        labels_ = (secret.get("metadata") or {}).get("labels") or {}
        if (
            labels_.get(CLIENT_KEYS_LABEL) == "namespace"
            and secret["metadata"]["name"] not in named
        ):
            add(secret, "namespace", [])
    return list(keys.values()), problems


# Worker token rotations accepted besides the current one, at most (the gateway keeps 4).
MAX_RETIRING = 3


def retiring_rotations(status: dict[str, Any], rotation: str) -> list[str]:
    """The worker token rotations still accepted besides `rotation`: those retiring already
    and the one registered before (status), oldest first, at most MAX_RETIRING."""
    registered = status.get("workerTokenRotation")
    if registered is None and status.get("endpointId"):
        registered = ""  # registered before rotations existed: the token of rotation ""
    retiring = list(status.get("retiringWorkerTokenRotations") or [])
    if registered is not None and registered not in retiring:
        retiring.append(registered)
    return [old for old in retiring if old != rotation][-MAX_RETIRING:]


def build_endpoint_registration(
    hd: HandlerDeployment,
    worker_token: str,
    client_keys: list[dict[str, str]] | None = None,
    retiring_tokens: list[str] | None = None,
) -> dict[str, Any]:
    """What the gateway is told of an endpoint (`PUT /admin/v1/endpoints/{id}`): its worker
    token (and those being retired, by digest), who may call it and how often, and the job
    defaults and limits of `spec.jobs` (unset limits left out)."""
    jobs, rate = hd.spec.jobs, hd.spec.access.rateLimit
    retiring = [digest(token) for token in retiring_tokens or []]
    registration = {
        "workerToken": worker_token,
        "workerTokenSha256": retiring or None,
        "namespace": hd.namespace,
        "runsCallerCode": runs_caller_code(hd),
        "clientKeys": client_keys or None,
        "rateLimit": rate.model_dump() if rate else None,
        "executionTimeoutSeconds": jobs.executionTimeoutSeconds,
        "ttlSeconds": jobs.ttlSeconds,
        "maxRetries": jobs.maxRetries,
        "heartbeatIntervalSeconds": jobs.heartbeatIntervalSeconds,
        "maxQueued": jobs.maxQueued,
        "maxInputBytes": jobs.maxInputBytes,
        "retryOnError": jobs.retryOnError.model_dump() if jobs.retryOnError else None,
    }
    return {name: value for name, value in registration.items() if value is not None}


def secret_name(
    hd: HandlerDeployment, settings: OperatorSettings, rotation: str | None = None
) -> str:
    """Named after its content, so the operator only ever creates it: a new token (re-created
    CR, new admin key, a rotation) is a new Secret, and an old one is collected with its owner."""
    token = worker_token(hd, settings, rotation)
    fingerprint = hashlib.sha256(token.encode()).hexdigest()[:10]
    return f"{hd.name}-worker-token-{fingerprint}"


def service_account_name(hd: HandlerDeployment) -> str:
    return f"{hd.name}-worker"


def gpu_summary(hd: HandlerDeployment) -> str:
    gpu = hd.spec.resources.gpu
    if gpu is None or gpu.count == 0:
        return "none"
    products = gpu.acceptable_products
    more = f" (+{len(products) - 1})" if len(products) > 1 else ""
    return f"{gpu.count}x {products[0] if products else gpu.vendor}{more}"


def _metadata(hd: HandlerDeployment, name: str) -> dict[str, Any]:
    return {"name": name, "namespace": hd.namespace, "labels": labels(hd)}


def build_secret(hd: HandlerDeployment, settings: OperatorSettings) -> dict[str, Any]:
    """The endpoint's worker token (workers send it as RUNPOD_AI_API_KEY); created, never
    updated (see `secret_name`)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(hd, secret_name(hd, settings)),
        "type": "Opaque",
        "stringData": {TOKEN_KEY: worker_token(hd, settings)},
    }


def references_secret(deployment: dict[str, Any] | None, name: str) -> bool:
    """Whether a (live) worker Deployment's pods read the token from Secret `name`."""
    spec = ((deployment or {}).get("spec") or {}).get("template", {}).get("spec") or {}
    return pod_reads_secret(spec, name)


def pod_reads_secret(pod_spec: dict[str, Any], name: str) -> bool:
    spec = pod_spec
    return any(
        ((item.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name") == name
        for container in spec.get("containers") or []
        for item in container.get("env") or []
    )


# The chart's generated credentials (gateway keys, Redis password) are made at install time by
# a hook, never rendered: `helm template` stays the same on every render, and Helm never deletes
# or rotates them on an upgrade (`keep` is honoured on the live object).
KEEP_ANNOTATIONS = {
    "helm.sh/resource-policy": "keep",
    # Argo CD neither prunes them nor shows them out of sync (they are in no rendered manifest).
    "argocd.argoproj.io/sync-options": "Prune=false",
    "argocd.argoproj.io/compare-options": "IgnoreExtraneous",
}


def build_calls_secret(namespace: str, key: str) -> dict[str, Any]:
    """The namespace's calls key (see CALLS_SECRET): a namespace-scoped client key Secret."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": CALLS_SECRET,
            "namespace": namespace,
            "labels": {
                CLIENT_KEYS_LABEL: "namespace",
                "app.kubernetes.io/managed-by": FIELD_MANAGER,
            },
        },
        "type": "Opaque",
        "data": {CALLS_KEY: base64.b64encode(key.encode()).decode()},
    }


def build_kept_secret_write(
    namespace: str,
    name: str,
    keys: list[str],
    labels: dict[str, str],
    existing: dict[str, Any] | None,
    new_value: Any,
) -> tuple[str, dict[str, Any]] | None:
    """What the chart's key hook writes for one Secret: ("create", the Secret) when it is
    missing; ("patch", a merge patch) adding the keys it lacks and the keep annotation; None
    when nothing is missing. Values already there are never changed. `new_value()` makes one."""
    if existing is None:
        return "create", {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": labels,
                "annotations": dict(KEEP_ANNOTATIONS),
            },
            "type": "Opaque",
            "stringData": {key: new_value() for key in keys},
        }
    meta = existing.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    patch: dict[str, Any] = {}
    missing = [key for key in keys if key not in (existing.get("data") or {})]
    if missing:
        patch["stringData"] = {key: new_value() for key in missing}
    if any(annotations.get(key) != value for key, value in KEEP_ANNOTATIONS.items()):
        patch["metadata"] = {"annotations": dict(KEEP_ANNOTATIONS)}
    if not patch:
        return None
    patch.setdefault("metadata", {})["resourceVersion"] = meta.get("resourceVersion")
    return "patch", patch


def build_service_account(hd: HandlerDeployment) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(hd, service_account_name(hd)),
        "automountServiceAccountToken": False,
    }


def runtime_env(hd: HandlerDeployment, settings: OperatorSettings) -> list[dict[str, Any]]:
    """The env the runtime owns (PROTOCOL.md); user env cannot override any of it."""
    jobs = hd.spec.jobs
    env: list[dict[str, Any]] = [
        {"name": "HANDLER_MODULE", "value": hd.spec.handler.module},
        {"name": "HANDLER_CONCURRENCY", "value": str(jobs.concurrency)},
    ]
    env += [
        {"name": name, "value": value}
        for name, value in worker_webhook_env(settings.gateway_url, hd.endpoint_id).items()
    ]
    env += [
        {"name": "RUNPOD_POD_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {
            "name": "RUNPOD_AI_API_KEY",
            "valueFrom": {"secretKeyRef": {"name": secret_name(hd, settings), "key": TOKEN_KEY}},
        },
        {"name": "RUNPOD_ENDPOINT_ID", "value": hd.endpoint_id},
        {"name": "RUNPOD_PING_INTERVAL", "value": str(jobs.heartbeatIntervalSeconds * 1000)},
        {"name": "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS", "value": "true"},
        # `@remote` calls from this worker to its namespace's other endpoints: the gateway and
        # the namespace's calls key (a Secret the operator makes, a namespace-scoped key).
        {"name": "HANDLER_REMOTE_URL", "value": settings.gateway_url},
        {
            "name": "HANDLER_REMOTE_API_KEY",
            "valueFrom": {
                "secretKeyRef": {"name": CALLS_SECRET, "key": CALLS_KEY, "optional": True}
            },
        },
    ]
    return env


def _resources(hd: HandlerDeployment) -> dict[str, Any]:
    spec = hd.spec.resources
    limits = dict(spec.limits)
    requests = dict(spec.requests)
    gpu = spec.gpu
    if gpu is not None and gpu.count > 0:
        limits[GPU_RESOURCE[gpu.vendor]] = str(gpu.count)
    resources: dict[str, Any] = {}
    if requests:
        resources["requests"] = requests
    if limits:
        resources["limits"] = limits
    return resources


def _affinity(hd: HandlerDeployment) -> dict[str, Any] | None:
    """The spec's affinity with the GPU products required (ANDed into every node selector term)
    and, for a list of products, preferred in their order."""
    affinity = copy.deepcopy(hd.spec.affinity or {})
    gpu = hd.spec.resources.gpu
    products = gpu.acceptable_products if gpu is not None and _uses_gpu(hd) else []
    if not products:
        return affinity or None
    assert gpu is not None
    key = GPU_PRODUCT_LABEL[gpu.vendor]
    node = affinity.setdefault("nodeAffinity", {})
    required = node.setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
    expression = {"key": key, "operator": "In", "values": products}
    required["nodeSelectorTerms"] = [
        {**term, "matchExpressions": [*(term.get("matchExpressions") or []), expression]}
        for term in required.get("nodeSelectorTerms") or [{}]
    ]
    if len(products) > 1:
        node.setdefault("preferredDuringSchedulingIgnoredDuringExecution", []).extend(
            {
                "weight": 100 - 10 * rank,
                "preference": {"matchExpressions": [{"key": key, "operator": "In", "values": [p]}]},
            }
            for rank, p in enumerate(products)
        )
    return affinity


def _tolerations(hd: HandlerDeployment, settings: OperatorSettings) -> list[dict[str, Any]]:
    tolerations = list(hd.spec.tolerations)
    gpu = hd.spec.resources.gpu
    if settings.gpu_tolerations and gpu is not None and _uses_gpu(hd):
        default = {"key": GPU_RESOURCE[gpu.vendor], "operator": "Exists", "effect": "NoSchedule"}
        if default not in tolerations:
            tolerations.append(default)
    return tolerations


SHM_VOLUME = "dshm"


def _uses_gpu(hd: HandlerDeployment) -> bool:
    gpu = hd.spec.resources.gpu
    return gpu is not None and gpu.count > 0


def _shared_memory(hd: HandlerDeployment) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(volume, mount) of a memory-backed /dev/shm, unless off or the user mounts their own."""
    shm = hd.spec.sharedMemory
    enabled = _uses_gpu(hd) if shm.enabled is None else shm.enabled
    if not enabled or any(m.get("mountPath") == "/dev/shm" for m in hd.spec.volumeMounts):
        return None
    volume = {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": shm.sizeLimit}}
    return volume, {"name": SHM_VOLUME, "mountPath": "/dev/shm"}


def image_pull_policy(image: str) -> str:
    """What Kubernetes defaults it to: Always for `:latest` or no tag (and no digest)."""
    last = image.rsplit("/", 1)[-1]
    if "@" in last:
        return "IfNotPresent"
    tag = last.split(":", 1)[1] if ":" in last else None
    return "Always" if tag in (None, "latest") else "IfNotPresent"


def _strategy(hd: HandlerDeployment) -> dict[str, Any]:
    """Rollout strategy: GPU endpoints replace a worker before adding one (no spare GPU)."""
    rollout = hd.spec.rollout
    if rollout.strategy == "Recreate":
        return {"type": "Recreate"}
    surge, unavailable = (0, 1) if _uses_gpu(hd) else (1, 0)
    surge = surge if rollout.maxSurge is None else rollout.maxSurge
    unavailable = unavailable if rollout.maxUnavailable is None else rollout.maxUnavailable
    if surge == 0 and unavailable == 0:  # one of them was set to 0, the other defaulted to 0
        surge, unavailable = (0, 1) if rollout.maxSurge == 0 else (1, 0)
    return {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": surge, "maxUnavailable": unavailable},
    }


def spec_hash(hd: HandlerDeployment) -> str:
    """Digest of the spec, recorded on the pod template (what a rollout changed). Fields left at
    their defaults are not hashed, so a release that adds a field does not roll every worker."""
    spec = hd.spec.model_dump(mode="json", exclude={"scaling"}, exclude_defaults=True)
    raw = json.dumps(spec, sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def build_deployment(
    hd: HandlerDeployment, settings: OperatorSettings, replicas: int | None
) -> dict[str, Any]:
    """The worker Deployment (apply it whole: `replicas` is ours as well, one field manager).

    `replicas=None` leaves the field out, to whoever scales instead (KEDA's HPA).
    """
    spec = hd.spec
    image = spec.image or settings.default_image
    container: dict[str, Any] = {
        "name": WORKER_CONTAINER,
        "image": image,
        "imagePullPolicy": spec.imagePullPolicy or image_pull_policy(image),
        "env": runtime_env(hd, settings) + list(spec.env),
        "resources": _resources(hd),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": spec.securityContext or RESTRICTED_CONTAINER_SECURITY,
    }
    if spec.envFrom:
        container["envFrom"] = list(spec.envFrom)
    volumes, mounts = list(spec.volumes), list(spec.volumeMounts)
    shm = _shared_memory(hd)
    if shm is not None:
        volumes.append(shm[0])
        mounts.append(shm[1])
    if mounts:
        container["volumeMounts"] = mounts
    pod: dict[str, Any] = {
        "serviceAccountName": service_account_name(hd),
        "automountServiceAccountToken": False,
        "securityContext": spec.podSecurityContext or RESTRICTED_POD_SECURITY,
        # On SIGTERM the worker finishes its jobs: give it the execution timeout, up to a cap
        # (a node drain waits this long; a longer job is redelivered instead).
        "terminationGracePeriodSeconds": min(
            spec.jobs.executionTimeoutSeconds + settings.termination_grace_extra_seconds,
            settings.termination_grace_max_seconds,
        ),
        # Ready once the gateway has heard the worker's heartbeat (the operator sets it).
        "readinessGates": [{"conditionType": HEARTBEAT_CONDITION}],
        "containers": [container],
    }
    optional = {
        "runtimeClassName": spec.runtimeClassName,
        "priorityClassName": spec.priorityClassName,
        "nodeSelector": dict(spec.nodeSelector) or None,
        "affinity": _affinity(hd),
        "tolerations": _tolerations(hd, settings) or None,
        "imagePullSecrets": [s.model_dump() for s in spec.imagePullSecrets] or None,
        "volumes": volumes or None,
        "topologySpreadConstraints": list(spec.topologySpreadConstraints) or None,
    }
    pod.update({key: value for key, value in optional.items() if value is not None})
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(hd, hd.name),
        "spec": {
            **({"replicas": replicas} if replicas is not None else {}),
            "selector": {"matchLabels": selector_labels(hd)},
            "strategy": _strategy(hd),
            "template": {
                "metadata": {
                    "labels": {**spec.podLabels, **labels(hd)},
                    "annotations": {**spec.podAnnotations, f"{GROUP}/spec-hash": spec_hash(hd)},
                },
                "spec": pod,
            },
        },
    }


def trigger_authentication_name(hd: HandlerDeployment) -> str:
    return f"{hd.name}-gateway"


def queue_url(hd: HandlerDeployment, settings: OperatorSettings) -> str:
    """The gateway's per-endpoint queue figures (KEDA's metrics-api scaler reads them)."""
    return f"{settings.gateway_url.rstrip('/')}/admin/v1/endpoints/{hd.endpoint_id}/queue"


# HPA rate policies act over this period (the HPA's default sync period is 15 s).
KEDA_RATE_PERIOD_SECONDS = 15


def _hpa_behavior(hd: HandlerDeployment) -> dict[str, Any]:
    """The builtin engine's stabilization and rates, as HPA behavior rules."""
    scaling = hd.spec.scaling
    down: dict[str, Any] = {"stabilizationWindowSeconds": scaling.scaleDownStabilizationSeconds}
    if scaling.maxScaleDownRate == 1:
        down["selectPolicy"] = "Disabled"
    elif scaling.maxScaleDownRate > 1:
        percent = max(1, int(100 * (1 - 1 / scaling.maxScaleDownRate)))
        down["policies"] = [
            {"type": "Percent", "value": percent, "periodSeconds": KEDA_RATE_PERIOD_SECONDS}
        ]
    up: dict[str, Any] = {"stabilizationWindowSeconds": 0}
    if scaling.maxScaleUpRate >= 1:
        percent = max(1, int(100 * (scaling.maxScaleUpRate - 1)))
        up["policies"] = [
            {"type": "Percent", "value": percent, "periodSeconds": KEDA_RATE_PERIOD_SECONDS},
            {"type": "Pods", "value": 1, "periodSeconds": KEDA_RATE_PERIOD_SECONDS},
        ]
    return {"scaleUp": up, "scaleDown": down}


def build_scaled_object(hd: HandlerDeployment, settings: OperatorSettings) -> dict[str, Any]:
    """`scaling.engine: keda`: a KEDA ScaledObject on the gateway's queue figures.

    metrics-api scaler on `load` (queued + running) with an AverageValue target of
    targetQueuePerWorker: the HPA's ceil(load / target) is RunPod's request count.
    """
    scaling = hd.spec.scaling
    return {
        "apiVersion": KEDA_API,
        "kind": "ScaledObject",
        "metadata": _metadata(hd, hd.name),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": hd.name},
            "pollingInterval": scaling.kedaPollingIntervalSeconds,
            "cooldownPeriod": scaling.scaleToZeroAfterSeconds,
            "minReplicaCount": scaling.minReplicas,
            "maxReplicaCount": scaling.maxReplicas,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": _hpa_behavior(hd)}},
            "triggers": [
                {
                    "type": "metrics-api",
                    "name": "queue",
                    "metricType": "AverageValue",
                    "metadata": {
                        "url": queue_url(hd, settings),
                        "format": "json",
                        "valueLocation": "load",
                        "targetValue": str(scaling.targetQueuePerWorker),
                        "activationTargetValue": "0",
                        "authMode": "bearer",
                    },
                    "authenticationRef": {"name": trigger_authentication_name(hd)},
                }
            ],
        },
    }


def build_trigger_authentication(
    hd: HandlerDeployment, settings: OperatorSettings
) -> dict[str, Any]:
    """KEDA reads the queue with the endpoint's worker token (Bearer), from its Secret."""
    secret = {"parameter": "token", "name": secret_name(hd, settings), "key": TOKEN_KEY}
    return {
        "apiVersion": KEDA_API,
        "kind": "TriggerAuthentication",
        "metadata": _metadata(hd, trigger_authentication_name(hd)),
        "spec": {"secretTargetRef": [secret]},
    }


def build_pod_disruption_budget(hd: HandlerDeployment) -> dict[str, Any]:
    """For endpoints that keep workers (minReplicas > 0): voluntary disruptions (node drains,
    evictions) take one worker at a time, which finishes its job in flight first."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(hd, hd.name),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(hd)}},
    }


def build_objects(
    hd: HandlerDeployment, settings: OperatorSettings, replicas: int
) -> list[dict[str, Any]]:
    """Every object the operator writes for `hd` (what `handlerctl render` prints)."""
    keda = hd.spec.scaling.engine == "keda"
    objects = [
        build_service_account(hd),
        build_secret(hd, settings),
        # engine keda: the Deployment's replicas belong to KEDA's HPA, not to us.
        build_deployment(hd, settings, None if keda else replicas),
    ]
    if keda:
        objects += [build_trigger_authentication(hd, settings), build_scaled_object(hd, settings)]
    if hd.spec.scaling.minReplicas > 0:
        objects.append(build_pod_disruption_budget(hd))
    return objects


def initial_replicas(hd: HandlerDeployment, current: int | None = None) -> int:
    """Keep what the autoscaler set; a fixed `scaling.replicas` wins; clamp to min/max."""
    scaling = hd.spec.scaling
    if scaling.replicas is not None:
        return scaling.replicas
    replicas = scaling.minReplicas if current is None else current
    return max(scaling.minReplicas, min(replicas, scaling.maxReplicas))


def owner_reference(owner: dict[str, Any]) -> dict[str, Any]:
    """A controller owner reference to `owner` (garbage collection deletes with it)."""
    meta = owner["metadata"]
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def owned(obj: dict[str, Any], owner: dict[str, Any]) -> dict[str, Any]:
    return {**obj, "metadata": {**obj["metadata"], "ownerReferences": [owner_reference(owner)]}}


def applied(obj: dict[str, Any], owner: dict[str, Any]) -> dict[str, Any]:
    """`obj` as the operator applies it: owned by `owner`, stamped with its applied hash."""
    return with_applied_hash(owned(obj, owner))


APPLIED_HASH = f"{GROUP}/applied-hash"


def with_applied_hash(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` annotated with a digest of itself: an unchanged object needs no new apply."""
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]
    annotations = {**obj["metadata"].get("annotations", {}), APPLIED_HASH: digest}
    return {**obj, "metadata": {**obj["metadata"], "annotations": annotations}}


def needs_apply(desired: dict[str, Any], live: dict[str, Any] | None) -> bool:
    if live is None:
        return True
    wanted = desired["metadata"]["annotations"][APPLIED_HASH]
    return bool((live["metadata"].get("annotations") or {}).get(APPLIED_HASH) != wanted)


@dataclass(frozen=True)
class SpecProblem:
    """A spec the schema accepts but the operator cannot serve (reason: CamelCase constant)."""

    reason: str
    message: str


def check_spec(
    hd: HandlerDeployment, existing_secrets: set[str] | None = None
) -> list[SpecProblem]:
    """What the schema cannot catch: vendor/product mismatches, missing pull secrets."""
    problems = []
    gpu = hd.spec.resources.gpu
    for product in gpu.acceptable_products if gpu is not None else []:
        assert gpu is not None
        if any(hint in product.upper() for hint in FOREIGN_PRODUCT_HINTS[gpu.vendor]):
            problems.append(
                SpecProblem(
                    "GpuProductMismatch",
                    f"GPU product '{product}' does not look like a {gpu.vendor} GPU "
                    f"(resources.gpu.vendor={gpu.vendor})",
                )
            )
    if existing_secrets is not None:
        for secret in hd.spec.imagePullSecrets:
            if secret.name not in existing_secrets:
                problems.append(
                    SpecProblem(
                        "ImagePullSecretMissing",
                        f"image pull secret '{secret.name}' does not exist in namespace "
                        f"'{hd.namespace}'",
                    )
                )
    return problems
