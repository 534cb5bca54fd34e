"""Status conditions of a HandlerDeployment: types, reasons (constants) and the pure setters.

`lastTransitionTime` changes only when a condition's status changes, as Kubernetes expects;
writers change conditions per type (`merge_conditions` into the live list), never the whole list.
"""

from __future__ import annotations

import datetime
from typing import Any

READY = "Ready"
HANDLER_HEALTHY = "HandlerHealthy"
SCALING = "Scaling"
QUEUE_HEALTHY = "QueueHealthy"
TYPES = (READY, HANDLER_HEALTHY, SCALING, QUEUE_HEALTHY)

# Reasons (CamelCase, as `kubectl describe` shows them).
RECONCILED = "Reconciled"
INVALID_SPEC = "InvalidSpec"
GPU_PRODUCT_MISMATCH = "GpuProductMismatch"
IMAGE_PULL_SECRET_MISSING = "ImagePullSecretMissing"
GATEWAY_UNAVAILABLE = "GatewayUnavailable"
GATEWAY_REFUSED = "GatewayRefused"  # it cannot take the registration (an older version)
KEDA_NOT_INSTALLED = "KedaNotInstalled"
WORKERS_NOT_READY = "WorkersNotReady"
WORKERS_READY = "WorkersReady"
SCALED_TO_ZERO = "ScaledToZero"
HANDLER_OK = "HandlerLoaded"
CRASH_LOOP = "HandlerCrashLoop"
NO_WORKERS = "NoWorkers"
WAITING_FOR_CAPACITY = "WaitingForCapacity"
UNSCHEDULABLE = "Unschedulable"  # no node of the cluster as it is could ever take the pod
WORKERS_REJECTED = "FailedCreate"  # the ReplicaSet cannot create pods (admission, quota)
SCALING_STABLE = "Stable"
QUEUE_OK = "QueueReachable"


def timestamp(epoch: float) -> str:
    """`epoch` as Kubernetes writes times: RFC 3339, UTC, whole seconds."""
    stamp = datetime.datetime.fromtimestamp(epoch, datetime.UTC).replace(microsecond=0)
    return stamp.isoformat().replace("+00:00", "Z")


def condition(
    type_: str,
    status: bool | None,
    reason: str,
    message: str,
    now: str,
    generation: int | None = None,
) -> dict[str, Any]:
    """One condition (True/False/Unknown for True/False/None), stamped `now`."""
    value = "Unknown" if status is None else ("True" if status else "False")
    item: dict[str, Any] = {"type": type_, "status": value, "reason": reason, "message": message}
    item["lastTransitionTime"] = now
    if generation is not None:
        item["observedGeneration"] = generation
    return item


def merge_conditions(
    conditions: list[dict[str, Any]] | None, updates: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """`conditions` with each update replacing the condition of its type, the others kept; a
    condition whose status did not change keeps its lastTransitionTime."""
    result = [dict(c) for c in conditions or []]
    for update in updates:
        previous = next((c for c in result if c.get("type") == update["type"]), None)
        merged = dict(update)
        if previous is not None and previous.get("status") == update["status"]:
            merged["lastTransitionTime"] = previous.get(
                "lastTransitionTime", update["lastTransitionTime"]
            )
        result = [c for c in result if c.get("type") != update["type"]] + [merged]
    order = {name: index for index, name in enumerate(TYPES)}
    return sorted(result, key=lambda c: order.get(c["type"], len(order)))


def set_condition(conditions: list[dict[str, Any]] | None, *fields: Any) -> list[dict[str, Any]]:
    """A new list with one condition set; `fields` as for `condition` (type, status, reason,
    message, now[, generation])."""
    return merge_conditions(conditions, [condition(*fields)])


def would_change(conditions: list[dict[str, Any]] | None, *updates: dict[str, Any]) -> bool:
    """Whether merging `updates` into `conditions` changes anything worth a write."""
    return bool(changed_types(conditions, merge_conditions(conditions, list(updates))))


def changed_types(
    before: list[dict[str, Any]] | None, after: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The conditions of `after` that differ from those of the same type in `before`."""
    old = {c.get("type"): c for c in before or []}
    return [c for c in after if old.get(c["type"]) != c]


# Kubelet waiting reasons that are the endpoint's own problem, kept as the condition's reason.
KUBELET_REASONS = (
    "CreateContainerConfigError",
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
)


# Ready reasons that the worker Deployment's status decides. Any other Ready=False (InvalidSpec,
# GpuProductMismatch, GatewayUnavailable, ...) is the reconcile's and stays until it runs again.
WORKLOAD_REASONS = (WORKERS_READY, WORKERS_NOT_READY, SCALED_TO_ZERO, WORKERS_REJECTED)


def ready_from_workload(
    current: list[dict[str, Any]],
    deployment_status: dict[str, Any],
    desired: int,
    now: str,
) -> list[dict[str, Any]]:
    """Ready as the worker Deployment shows it: False `FailedCreate` with the controller's
    message while its ReplicaSet cannot create pods (a Pod Security or quota refusal), else True
    with how many of the `desired` workers are ready."""
    previous = next((c for c in current if c.get("type") == READY), None)
    if previous is None or previous.get("reason") not in WORKLOAD_REASONS:
        return current
    generation = previous.get("observedGeneration")
    failure = next(
        (
            c
            for c in deployment_status.get("conditions") or []
            if c.get("type") == "ReplicaFailure" and c.get("status") == "True"
        ),
        None,
    )
    if failure is not None:
        message = (
            f"worker pods cannot be created: {failure.get('message') or failure.get('reason')}"
        )
        return set_condition(current, READY, False, WORKERS_REJECTED, message, now, generation)
    ready = deployment_status.get("readyReplicas") or 0
    if desired == 0 and ready == 0:
        reason = SCALED_TO_ZERO
    else:
        reason = WORKERS_READY if ready else WORKERS_NOT_READY
    message = f"{ready}/{desired} workers ready"
    return set_condition(current, READY, True, reason, message, now, generation)


def pod_problem(pod: dict[str, Any]) -> tuple[str, str] | None:
    """Why a worker pod cannot serve, as (reason, message): the loader's error of a crashed
    worker (termination message) with reason HandlerCrashLoop, or the kubelet's own reason
    (ImagePullBackOff, CreateContainerConfigError, ...); None when nothing is wrong."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        state = status.get("state") or {}
        last = (status.get("lastState") or {}).get("terminated") or {}
        terminated = state.get("terminated") or {}
        waiting = state.get("waiting") or {}
        if waiting.get("reason") in KUBELET_REASONS:
            return waiting["reason"], waiting.get("message") or waiting["reason"]
        for candidate in (terminated, last):
            if candidate and candidate.get("exitCode", 0) != 0:
                message = (candidate.get("message") or "").strip()
                reason = candidate.get("reason") or "Error"
                return CRASH_LOOP, (
                    message or f"worker exited with code {candidate.get('exitCode')} ({reason})"
                )
        if waiting.get("reason") == "CrashLoopBackOff":
            return CRASH_LOOP, waiting.get("message") or waiting["reason"]
    return None


def crash_message(pod: dict[str, Any]) -> str | None:
    """The message of `pod_problem`, or None."""
    problem = pod_problem(pod)
    return problem[1] if problem else None


def unschedulable_message(pod: dict[str, Any]) -> str | None:
    """Why a worker pod waits for capacity (PodScheduled=False, Unschedulable), or None."""
    status = pod.get("status") or {}
    if status.get("phase") != "Pending":
        return None
    for condition in status.get("conditions") or []:
        if (
            condition.get("type") == "PodScheduled"
            and condition.get("status") == "False"
            and condition.get("reason") == "Unschedulable"
        ):
            name = (pod.get("metadata") or {}).get("name", "pod")
            return f"{name} waits for capacity: {condition.get('message') or 'unschedulable'}"
    return None


# Scheduler reasons that more or bigger nodes of the kinds the pod accepts would fix.
CAPACITY_HINTS = ("Insufficient", "Too many pods")


def never_fits(scheduler_message: str) -> bool:
    """The scheduler's message says no node of the cluster as it is could take the pod (every
    node excluded by its node affinity/selector: e.g. a GPU product no node has), as opposed to
    nodes short of GPUs or memory, which capacity on the way may fix."""
    if "nodes are available:" not in scheduler_message:
        return False
    reasons = scheduler_message.split("nodes are available:", 1)[1].split("preemption:")[0]
    return "didn't match Pod's node affinity/selector" in reasons and not any(
        hint in reasons for hint in CAPACITY_HINTS
    )
