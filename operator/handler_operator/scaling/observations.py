"""The policy's view of what the engine reads: pods as `PodView`s, heartbeat conditions, a
queue's figures. Pure (plain dicts in, plain values out)."""

from __future__ import annotations

import datetime
import time
from typing import Any

from handler_operator import builders
from handler_operator.scaling.policies import Observation, PodPhase, PodView


def epoch(stamp: str | None) -> float | None:
    if not stamp:
        return None
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def pod_view(pod: dict[str, Any], live_workers: set[str]) -> PodView | None:
    """The policy's view of a pod; None for a pod on its way out (deletionTimestamp)."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    if meta.get("deletionTimestamp"):
        return None
    name = meta["name"]
    found = {c.get("type"): c for c in status.get("conditions") or []}
    scheduled = found.get("PodScheduled") or {}
    unschedulable = (
        epoch(scheduled.get("lastTransitionTime")) or time.time()
        if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable"
        else None
    )
    phase: PodPhase
    if status.get("phase") in (None, "Pending") and name not in live_workers:
        phase = "pending"
    elif name in live_workers or (found.get("Ready") or {}).get("status") == "True":
        phase = "ready"
    else:
        phase = "starting"
    return PodView(
        name,
        phase,
        epoch(meta.get("creationTimestamp")) or 0.0,
        unschedulable,
        scheduled.get("message") or "" if unschedulable is not None else "",
    )


def heartbeat_condition(pod: dict[str, Any]) -> str | None:
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == builders.HEARTBEAT_CONDITION:
            found = condition.get("status")
            return None if found is None else str(found)
    return None


def queue_figures(figures: dict[str, Any]) -> dict[str, int]:
    """The figures shown in status: jobs queued and in progress, worker refreshes."""
    return {
        "inQueue": figures.get("inQueue", 0),
        "inProgress": figures.get("inProgress", 0),
        "workerRefreshes": (figures.get("workers") or {}).get("refreshes", 0),
    }


def observe(figures: dict[str, Any], replicas: int, pods: tuple[PodView, ...]) -> Observation:
    """The policy's input for one endpoint: its gateway figures (`QueueFigures` as a dict), the
    replica count last applied, and its pods (or `handlerctl dev`'s processes)."""
    states = figures.get("workerStates") or {}
    return Observation(
        queued=figures.get("inQueue", 0),
        in_progress=figures.get("inProgress", 0),
        low_queued=figures.get("lowPriorityQueued", 0),
        replicas=replicas,
        pods=pods,
        worker_jobs=figures.get("workerJobs") or {},
        draining=frozenset(w for w, s in states.items() if s == "draining"),
        last_activity=figures.get("lastActivity"),
        queue_delay=figures.get("queueDelaySeconds", 0.0),
        retry_waiting=figures.get("retriesWaiting", 0),
    )
