"""The autoscaling policy: `compute_desired_replicas` turns queue and pod figures into a Decision.

Pure: plain values in, plain values out; the operator and `handlerctl dev` both run it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from handler_operator.conditions import never_fits, timestamp
from handler_operator.models import ScalingSpec

PodPhase = Literal["pending", "starting", "ready"]

# Decision reasons (CamelCase, as the Scaling condition and events show them).
SCALE_UP = "ScaleUp"
SCALE_DOWN = "ScaleDown"
DRAINING = "DrainingIdleWorkers"
STABLE = "Stable"
STABILIZING = "ScaleDownStabilizing"
KEEP_WARM = "KeepWarm"
SCALED_TO_ZERO = "ScaledToZero"
FIXED = "FixedReplicas"
WAITING_FOR_CAPACITY = "WaitingForCapacity"
BUSY_WORKERS = "WorkersBusy"
QUEUE_DELAY = "QueueDelay"

# The order in which a ReplicaSet deletes pods: unscheduled, then pending, then not ready,
# then ready. Victims are picked in the same order so that the ReplicaSet agrees with us.
_REMOVAL_ORDER = {"pending": 0, "starting": 1, "ready": 2}


@dataclass(frozen=True)
class PodView:
    """One worker pod as the policy needs it (the worker id is the pod name)."""

    name: str
    phase: PodPhase
    created: float = 0.0
    unschedulable_since: float | None = None
    unschedulable_message: str = ""  # the scheduler's words, e.g. "Insufficient nvidia.com/gpu"


@dataclass(frozen=True)
class Observation:
    """What the gateway and the cluster say about one endpoint, now."""

    queued: int
    in_progress: int
    replicas: int  # the worker Deployment's spec.replicas (pending pods included)
    low_queued: int = 0  # of `queued`, low-priority: they wait for capacity, never bring it
    pods: tuple[PodView, ...] = ()
    worker_jobs: Mapping[str, int] = field(default_factory=dict)  # worker id -> jobs held
    draining: frozenset[str] = frozenset()  # workers the gateway has as draining
    last_activity: float | None = None  # last enqueue/start/finish on the endpoint
    queue_delay: float = 0.0  # how long the next normal-priority job to run has waited, s
    retry_waiting: int = 0  # of `queued`, retries waiting out their backoff: they bring no worker


@dataclass(frozen=True)
class ScalerState:
    """What the policy remembers between decisions of one endpoint."""

    recommendations: tuple[tuple[float, int], ...] = ()  # (time, recommended) in the window
    draining: tuple[str, ...] = ()  # workers asked to drain, on their way out
    first_seen: float | None = None  # when the policy first ran (idle clock without activity)


@dataclass(frozen=True)
class Decision:
    """What to do now. `replicas` is the Deployment's replica count after `remove` went."""

    replicas: int
    desired: int  # where the policy is heading (status.desiredReplicas)
    reason: str
    message: str
    drain: tuple[str, ...] = ()  # ask the gateway to drain these workers
    undrain: tuple[str, ...] = ()  # give these workers jobs again
    remove: tuple[str, ...] = ()  # drained and idle: delete these pods, replicas lowered
    waiting_for_capacity: str | None = None  # message when pods wait past pendingTimeout
    unschedulable: bool = False  # ... because no node could ever take them (said at once)
    state: ScalerState = ScalerState()


def load_replicas(queued: int, in_progress: int, target_per_worker: int) -> int:
    """RunPod's request count: ceil((queued + running) / target)."""
    return math.ceil(max(0, queued + in_progress) / max(1, target_per_worker))


def _clamp(value: int, spec: ScalingSpec) -> int:
    return max(spec.minReplicas, min(value, spec.maxReplicas))


def _waiting_for_capacity(obs: Observation, spec: ScalingSpec, now: float) -> str | None:
    """Why workers wait: pods unschedulable past pendingTimeoutSeconds, or at once when no node
    of the cluster matches them at all (more of the same nodes would not help)."""
    stuck = [
        pod
        for pod in obs.pods
        if pod.unschedulable_since is not None
        and (
            now - pod.unschedulable_since >= spec.pendingTimeoutSeconds
            or never_fits(pod.unschedulable_message)
        )
    ]
    if not stuck:
        return None
    oldest = min(pod.unschedulable_since for pod in stuck if pod.unschedulable_since is not None)
    said = next((pod.unschedulable_message for pod in stuck if pod.unschedulable_message), "")
    return (
        f"{len(stuck)} worker pod(s) unschedulable for {now - oldest:.0f} s "
        f"(pendingTimeoutSeconds={spec.pendingTimeoutSeconds}); they are kept and counted as "
        "capacity on the way" + (f": {said}" if said else "")
    )


def _unschedulable(obs: Observation) -> bool:
    return any(
        pod.unschedulable_since is not None and never_fits(pod.unschedulable_message)
        for pod in obs.pods
    )


def _delayed(obs: Observation, spec: ScalingSpec, queued: int) -> bool:
    """The request-delay rule applies: normal jobs wait past targetQueueDelaySeconds, and no
    worker is on its way (a pending or starting pod is capacity coming: no second scale-up)."""
    return (
        spec.targetQueueDelaySeconds is not None
        and queued > 0
        and obs.queue_delay > spec.targetQueueDelaySeconds
        and len(obs.pods) >= obs.replicas
        and all(pod.phase == "ready" for pod in obs.pods)
    )


def _recommend(
    obs: Observation, spec: ScalingSpec, state: ScalerState, now: float
) -> tuple[int, str, bool, bool]:
    """(recommended replicas before stabilization, its message, idle long enough, raised by
    the queue-delay rule)."""
    # Low-priority jobs and retries waiting out their backoff bring no worker.
    queued = max(0, obs.queued - obs.low_queued - obs.retry_waiting)
    load = queued + obs.in_progress
    needed = load_replicas(queued, obs.in_progress, spec.targetQueuePerWorker)
    waiting = (
        f"; {obs.low_queued} low-priority job(s) waiting for capacity (they scale nothing up)"
        if obs.low_queued
        else ""
    )
    figures = f"{queued} queued + {obs.in_progress} running, {spec.targetQueuePerWorker} per worker"
    if (
        load > 0
        and _delayed(obs, spec, queued)
        and _clamp(obs.replicas + 1, spec) > max(_clamp(needed, spec), obs.replicas)
    ):
        delay = (
            f"the next job has waited {obs.queue_delay:.0f} s, over targetQueueDelaySeconds="
            f"{spec.targetQueueDelaySeconds} ({figures})"
        )
        return _clamp(obs.replicas + 1, spec), delay + waiting, False, True
    if load > 0:
        return _clamp(needed, spec), figures + waiting, False, False
    since = obs.last_activity if obs.last_activity is not None else state.first_seen
    idle_for = now - since if since is not None else math.inf
    # Messages name fixed times, not durations: a status write only when something changed.
    idle = f"idle since {_clock(since)}"
    if idle_for >= spec.scaleToZeroAfterSeconds:
        return (
            spec.minReplicas,
            f"{idle} (scaleToZeroAfterSeconds={spec.scaleToZeroAfterSeconds}){waiting}",
            True,
            False,
        )
    # Idle, but not for long: keep one worker warm until scaleToZeroAfterSeconds.
    keep = 1 if obs.replicas > 0 else 0
    return _clamp(keep, spec), f"{idle}, keeping a warm worker{waiting}", False, False


def _clock(epoch: float | None) -> str:
    return "ever" if epoch is None else timestamp(epoch)


def _rate_limited(target: int, current: int, spec: ScalingSpec) -> int:
    if target > current and spec.maxScaleUpRate > 0:
        return min(target, max(current + 1, math.ceil(max(current, 1) * spec.maxScaleUpRate)))
    if target < current and spec.maxScaleDownRate > 0:
        return max(target, math.floor(current / spec.maxScaleDownRate))
    return target


def _victims(obs: Observation, already: tuple[str, ...], count: int) -> tuple[str, ...]:
    """Up to `count` more workers to drain: never one that holds a job."""
    candidates = [
        pod for pod in obs.pods if pod.name not in already and obs.worker_jobs.get(pod.name, 0) == 0
    ]
    candidates.sort(key=lambda pod: (_REMOVAL_ORDER[pod.phase], -pod.created, pod.name))
    return tuple(pod.name for pod in candidates[: max(0, count)])


def compute_desired_replicas(
    obs: Observation, spec: ScalingSpec, state: ScalerState, now: float
) -> Decision:
    """Decide the worker count of one endpoint.

    Scale-up is immediate (pending pods count as capacity on the way, so a GPU node being
    provisioned never triggers a second scale-up). Scale-down takes the highest recommendation
    of the stabilization window, removes at most `maxScaleDownRate`-th of the workers at a time,
    and only ever removes workers that hold no job: they are drained first, and removed once
    the gateway confirms they are draining and idle.
    """
    state = replace(state, first_seen=state.first_seen if state.first_seen is not None else now)
    current = obs.replicas
    pods = {pod.name for pod in obs.pods}
    draining = tuple(name for name in state.draining if name in pods)
    waiting = _waiting_for_capacity(obs, spec, now)

    if spec.replicas is not None:
        recommended, why, straight = spec.replicas, "replicas fixed by spec.scaling.replicas", True
        reason_up = reason_down = FIXED
    else:
        recommended, why, straight, delayed = _recommend(obs, spec, state, now)
        reason_up, reason_down = (QUEUE_DELAY if delayed else SCALE_UP), SCALE_DOWN

    window_start = now - spec.scaleDownStabilizationSeconds
    history = tuple((t, r) for t, r in state.recommendations if t > window_start)
    history += ((now, recommended),)
    state = replace(state, recommendations=history)

    if recommended >= current:
        target = _rate_limited(recommended, current, spec)
        undrain = draining
        state = replace(state, draining=())
        if target > current:
            return Decision(
                replicas=target,
                desired=target,
                reason=reason_up,
                message=f"{current} -> {target} workers: {why}",
                undrain=undrain,
                waiting_for_capacity=waiting,
                unschedulable=_unschedulable(obs),
                state=state,
            )
        steady = FIXED if reason_up == FIXED else STABLE
        return Decision(
            replicas=current,
            desired=current,
            reason=SCALED_TO_ZERO if current == 0 else steady,
            message=f"{current} workers: {why}",
            undrain=undrain,
            waiting_for_capacity=waiting,
            unschedulable=_unschedulable(obs),
            state=state,
        )

    # Scaling down: the highest recommendation of the window, unless idle long enough to go
    # straight to the floor (the idle period already was the stabilization).
    stabilized = recommended if straight else max(r for _, r in history)
    if stabilized >= current:
        return Decision(
            replicas=current,
            desired=current,
            reason=STABILIZING,
            message=(
                f"{current} workers: {why}; scale-down waits for the "
                f"{spec.scaleDownStabilizationSeconds} s stabilization window"
            ),
            undrain=draining,
            waiting_for_capacity=waiting,
            unschedulable=_unschedulable(obs),
            state=replace(state, draining=()),
        )
    target = _rate_limited(stabilized, current, spec)
    # Replicas without a pod (not created yet, or refused by a quota) go first: nothing runs there.
    phantom = min(max(0, current - len(obs.pods)), current - target)
    excess = current - target - phantom
    keep_draining = draining[:excess]
    undrain = draining[excess:]
    # A drained worker the gateway forgot (restart, stale record) is drained again.
    redrain = tuple(name for name in keep_draining if name not in obs.draining)
    drain = _victims(obs, keep_draining, excess - len(keep_draining))
    remove = tuple(
        name for name in keep_draining if name in obs.draining and obs.worker_jobs.get(name, 0) == 0
    )
    replicas = current - phantom - len(remove)
    state = replace(state, draining=tuple(n for n in keep_draining if n not in remove) + drain)
    if remove or phantom:
        reason = SCALED_TO_ZERO if replicas == 0 else reason_down
        removed = [*remove, *([f"{phantom} replica(s) without a pod"] if phantom else [])]
        message = f"{current} -> {replicas} workers: {why}; removed idle {', '.join(removed)}"
    elif keep_draining or drain:
        reason = DRAINING
        message = (
            f"{current} -> {target} workers: {why}; draining "
            f"{', '.join(keep_draining + drain)} before removal"
        )
    else:
        reason = BUSY_WORKERS
        message = f"{current} workers: {why}; every worker holds a job, none is removed"
    return Decision(
        replicas=replicas,
        desired=target,
        reason=reason,
        message=message,
        drain=redrain + drain,
        undrain=undrain,
        remove=remove,
        waiting_for_capacity=waiting,
        unschedulable=_unschedulable(obs),
        state=state,
    )


def carried_out(decision: Decision, before: int, gone: Sequence[str]) -> Decision:
    """The decision once its drains were answered: drained workers that hold no job (`gone`) go
    now. The policy counted `remove` in `replicas` already; the others lower it as well, leave
    the draining list, and the reason becomes the scale-down itself, not the drain."""
    if not gone:
        return decision
    extra = len([name for name in gone if name not in decision.remove])
    replicas = max(0, decision.replicas - extra)
    draining = tuple(name for name in decision.state.draining if name not in gone)
    result = replace(decision, replicas=replicas, state=replace(decision.state, draining=draining))
    if replicas >= before:
        return result
    return replace(
        result,
        reason=SCALED_TO_ZERO if replicas == 0 else SCALE_DOWN,
        message=f"{before} -> {replicas} workers; removed idle {', '.join(gone)}",
    )


# The pod-deletion-cost of a worker that holds jobs: whatever removes pods through the
# ReplicaSet (KEDA's HPA, `kubectl scale`, a rollout's scale-down) takes idle ones (cost 0)
# first. Drained workers carry the lowest cost and are left alone here.
BUSY_DELETION_COST = 1000


def compute_deletion_costs(
    current: Mapping[str, str | None], worker_jobs: Mapping[str, int], lowest: str
) -> dict[str, str]:
    """The deletion-cost annotations to write, by pod name: busy workers (in `worker_jobs` with
    jobs) get BUSY_DELETION_COST, workers that went idle go back to 0; only changes are
    returned, so a pod is written when it turns busy or idle, not on every pass."""
    changes: dict[str, str] = {}
    for name, cost in current.items():
        if cost == lowest or name not in worker_jobs:
            continue  # drained for removal, or no heartbeat yet: nothing known
        wanted = str(BUSY_DELETION_COST) if worker_jobs[name] > 0 else "0"
        if (cost or "0") != wanted:
            changes[name] = wanted
    return changes
