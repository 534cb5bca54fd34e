"""The builtin scaling engine: one loop for every HandlerDeployment, run by the operator.

Each pass makes one gateway call for all endpoints' queue figures (a long-poll that answers as
soon as a job is queued), runs the pure policy per CR, and acts: drains, pod deletions, a
server-side apply of the worker Deployment when its replica count changes, readiness gates,
status and events. Pods and replica counts come from the kopf watches, never from polling.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from handler_operator import builders, conditions
from handler_operator.clients import KubeApi, Refused, Unavailable
from handler_operator.models import GROUP, VERSION, HandlerDeployment
from handler_operator.scaling import policies
from handler_operator.scaling.actions import drain_workers
from handler_operator.scaling.observations import (
    heartbeat_condition,
    observe,
    pod_view,
    queue_figures,
)
from handler_operator.scaling.policies import ScalerState
from handler_operator.settings import OperatorSettings
from handler_protocol.clients import GatewayAdmin

log = logging.getLogger("handler_operator.scaler")

POLL_WAIT_S = 1.0  # the loop runs at least this often, sooner when a job is queued
MIN_PASS_S = 0.1  # and at most ten passes a second under a steady stream of jobs
QUEUE_STATUS_EVERY_S = 5.0  # queue figures in status (the QUEUE column) refresh this often


@dataclass
class Target:
    """One HandlerDeployment as the engine tracks it."""

    cr: dict[str, Any]  # apiVersion, kind, metadata (name, namespace, uid) of the CR
    hd: HandlerDeployment
    replicas: int  # the worker Deployment's spec.replicas as last applied or seen
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    state: ScalerState = field(default_factory=ScalerState)
    status: dict[str, Any] = field(default_factory=dict)  # what we last wrote
    conditions: list[dict[str, Any]] = field(default_factory=list)
    status_written: float = 0.0

    @property
    def builtin(self) -> bool:
        return self.hd.spec.scaling.engine == "builtin"


class Scaler:
    """Registry of HandlerDeployments plus the loop that scales them."""

    def __init__(
        self,
        kube: KubeApi,
        gateway: GatewayAdmin,
        settings: OperatorSettings,
        clock: Callable[[], float] = time.time,
    ):
        self.kube = kube
        self.gateway = gateway
        self.settings = settings
        self.clock = clock
        self.targets: dict[tuple[str, str], Target] = {}
        self.orphan_pods: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        self._since: float | None = None

    # -- registry (fed by the kopf handlers) -----------------------------------------------------
    def register(self, cr: dict[str, Any], hd: HandlerDeployment, replicas: int) -> None:
        key = (hd.namespace, hd.name)
        ref = {
            "apiVersion": cr.get("apiVersion", f"{GROUP}/{VERSION}"),
            "kind": cr.get("kind", "HandlerDeployment"),
            "metadata": {
                k: cr["metadata"].get(k) for k in ("name", "namespace", "uid", "generation")
            },
        }
        target = self.targets.get(key)
        if target is None or target.cr["metadata"]["uid"] != ref["metadata"]["uid"]:
            pods = self.orphan_pods.pop(key, {})
            status = cr.get("status") or {}
            self.targets[key] = Target(
                ref,
                hd,
                replicas,
                pods=pods,
                # What the CR already says: a restarted operator writes only what changed.
                status={
                    k: status[k]
                    for k in ("desiredReplicas", "queue", "lastScaleTime")
                    if k in status
                },
                conditions=list(status.get("conditions") or []),
                status_written=self.clock(),
            )
        else:
            target.hd, target.replicas, target.cr = hd, replicas, ref

    def unregister(self, namespace: str, name: str) -> None:
        self.targets.pop((namespace, name), None)
        self.orphan_pods.pop((namespace, name), None)

    def observe_pod(self, event_type: str, pod: dict[str, Any]) -> None:
        meta = pod.get("metadata") or {}
        instance = (meta.get("labels") or {}).get("app.kubernetes.io/instance")
        if not instance:
            return
        key = (meta.get("namespace") or "default", instance)
        target = self.targets.get(key)
        pods = target.pods if target is not None else self.orphan_pods.setdefault(key, {})
        if event_type == "DELETED":
            pods.pop(meta["name"], None)
        else:
            pods[meta["name"]] = pod

    def observe_replicas(self, namespace: str, name: str, replicas: int | None) -> None:
        target = self.targets.get((namespace, name))
        if target is not None and replicas is not None:
            target.replicas = replicas

    # -- the loop ------------------------------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self.run_pass()
            except asyncio.CancelledError:
                raise
            except Unavailable as exc:
                log.warning("scaling pass skipped: %s", exc)
                await self._mark_gateway_unavailable(str(exc))
                await asyncio.sleep(POLL_WAIT_S)
            except Exception:
                log.exception("scaling pass failed")
                await asyncio.sleep(POLL_WAIT_S)
            await asyncio.sleep(max(0.0, MIN_PASS_S - (loop.time() - started)))

    async def run_pass(self) -> None:
        view = await self.gateway.poll_queues(self._since, POLL_WAIT_S if self._since else 0)
        self._since = view.get("time")
        figures = view.get("endpoints") or {}
        now = self.clock()
        for target in list(self.targets.values()):
            try:
                await self.scale(target, figures.get(target.hd.endpoint_id), now)
            except (Unavailable, Refused) as exc:
                log.warning("scaling %s: %s", target.hd.endpoint_id, exc)
            except Exception:  # a bug met by one endpoint must not stop the others' scaling
                log.exception("scaling %s failed", target.hd.endpoint_id)

    async def scale(self, target: Target, figures: dict[str, Any] | None, now: float) -> None:
        hd = target.hd
        if figures is None:
            await self._write_status(
                target,
                {},
                queue_healthy=(False, "EndpointNotRegistered", "the gateway has no such endpoint"),
                now=now,
            )
            return
        states = figures.get("workerStates") or {}
        live = set(states)
        await self._readiness_gates(target, live)
        await self._deletion_costs(target, figures.get("workerJobs") or {})
        if not target.builtin:
            await self._write_status(target, {"queue": queue_figures(figures)}, now=now)
            return
        views = [pod_view(pod, live) for pod in target.pods.values()]
        obs = observe(figures, target.replicas, tuple(v for v in views if v is not None))
        decision = policies.compute_desired_replicas(obs, hd.spec.scaling, target.state, now)
        removed = await drain_workers(self.gateway, hd.endpoint_id, decision)
        # Marked pods go first when the count falls: the ReplicaSet never replaces one of them.
        for name in removed:
            await self.kube.annotate_pod(
                hd.namespace, name, {builders.DELETION_COST: builders.LOWEST_DELETION_COST}
            )
        decision = policies.carried_out(decision, obs.replicas, removed)
        target.state = decision.state
        replicas = decision.replicas
        last_scale = target.status.get("lastScaleTime")
        if replicas != target.replicas:
            deployment = builders.build_deployment(hd, self.settings, replicas)
            await self.kube.apply(builders.applied(deployment, target.cr))
            direction = "up" if replicas > target.replicas else "down"
            message = f"{target.replicas} -> {replicas} workers: {decision.message}"
            await self._event(target, "Normal", f"Scaled{direction.capitalize()}", message)
            target.replicas = replicas
        await self._remove(target, removed)
        if replicas != obs.replicas or removed:
            last_scale = conditions.timestamp(now)
        fields = {"desiredReplicas": decision.desired, "queue": queue_figures(figures)}
        if last_scale:
            fields["lastScaleTime"] = last_scale
        await self._write_status(target, fields, scaling=decision, now=now)

    async def _remove(self, target: Target, names: list[str]) -> None:
        """Delete drained pods (only those very pods: uid precondition) after the count fell."""
        for name in names:
            pod = target.pods.pop(name, None)
            uid = (pod or {}).get("metadata", {}).get("uid")
            await self.kube.delete("v1", "Pod", target.hd.namespace, name, uid=uid)

    async def _deletion_costs(self, target: Target, worker_jobs: dict[str, int]) -> None:
        """Busy workers cost more to delete than idle ones, for every engine: a ReplicaSet
        scaled down by KEDA's HPA or by hand removes idle pods first."""
        current = {
            name: ((pod.get("metadata") or {}).get("annotations") or {}).get(builders.DELETION_COST)
            for name, pod in target.pods.items()
            if not (pod.get("metadata") or {}).get("deletionTimestamp")
        }
        changes = policies.compute_deletion_costs(
            current, worker_jobs, builders.LOWEST_DELETION_COST
        )
        for name, cost in changes.items():
            await self.kube.annotate_pod(target.hd.namespace, name, {builders.DELETION_COST: cost})
            meta = target.pods[name].setdefault("metadata", {})
            meta.setdefault("annotations", {})[builders.DELETION_COST] = cost

    async def _readiness_gates(self, target: Target, live: set[str]) -> None:
        """A worker pod is ready once the gateway hears its heartbeat (and not after it stops)."""
        for name, pod in list(target.pods.items()):
            if (pod.get("metadata") or {}).get("deletionTimestamp"):
                continue
            wanted = "True" if name in live else "False"
            current = heartbeat_condition(pod)
            if current == wanted or (current is None and wanted == "False"):
                continue
            condition = {
                "type": builders.HEARTBEAT_CONDITION,
                "status": wanted,
                "reason": "WorkerPolling" if wanted == "True" else "NoHeartbeat",
                "lastTransitionTime": conditions.timestamp(self.clock()),
            }
            await self.kube.set_pod_condition(target.hd.namespace, name, condition)
            others = [
                c
                for c in (pod.get("status") or {}).get("conditions") or []
                if c.get("type") != builders.HEARTBEAT_CONDITION
            ]
            pod.setdefault("status", {})["conditions"] = [*others, condition]

    async def _write_status(
        self,
        target: Target,
        fields: dict[str, Any],
        now: float,
        scaling: policies.Decision | None = None,
        queue_healthy: tuple[bool, str, str] = (True, conditions.QUEUE_OK, "queue figures read"),
    ) -> None:
        """Patch status when something changed (queue figures alone: every few seconds).

        Conditions are one list shared with the other handlers: the CR is read afresh before
        a write, and only our two condition types are replaced in it.
        """
        stamp = conditions.timestamp(now)
        generation = target.cr["metadata"].get("generation")

        def ours(current: list[dict[str, Any]]) -> list[dict[str, Any]]:
            new = conditions.set_condition(
                current, conditions.QUEUE_HEALTHY, *queue_healthy, stamp, generation
            )
            if scaling is None:
                return new
            if scaling.waiting_for_capacity:
                return conditions.set_condition(
                    new,
                    conditions.SCALING,
                    False,
                    conditions.UNSCHEDULABLE
                    if scaling.unschedulable
                    else conditions.WAITING_FOR_CAPACITY,
                    scaling.waiting_for_capacity,
                    stamp,
                    generation,
                )
            return conditions.set_condition(
                new, conditions.SCALING, True, scaling.reason, scaling.message, stamp, generation
            )

        def mine(items: list[dict[str, Any]], keys: tuple[str, ...]) -> list[tuple[Any, ...]]:
            kinds = (conditions.QUEUE_HEALTHY, conditions.SCALING)
            return [tuple(c.get(k) for k in keys) for c in items if c.get("type") in kinds]

        # A new status or reason, or new replica figures, are written at once; a new message
        # or new queue figures alone at most every QUEUE_STATUS_EVERY_S.
        changed = {k: v for k, v in fields.items() if target.status.get(k) != v}
        proposed = ours(target.conditions)
        essential = ("type", "status", "reason")
        important = mine(proposed, essential) != mine(target.conditions, essential) or any(
            k != "queue" for k in changed
        )
        detail = "queue" in changed or mine(proposed, (*essential, "message")) != mine(
            target.conditions, (*essential, "message")
        )
        if not (important or (detail and now - target.status_written >= QUEUE_STATUS_EVERY_S)):
            return
        hd = target.hd
        # Only our two condition types are written (merged into the live list by type).
        written = await self.kube.update_conditions(
            f"{GROUP}/{VERSION}", "HandlerDeployment", hd.namespace, hd.name, ours([]), fields
        )
        if not written:
            return
        target.status.update(fields)
        target.conditions = proposed
        target.status_written = now

    async def _mark_gateway_unavailable(self, message: str) -> None:
        now = self.clock()
        for target in list(self.targets.values()):
            try:
                await self._write_status(
                    target,
                    {},
                    now=now,
                    queue_healthy=(False, "GatewayUnavailable", message[:300]),
                )
            except (Unavailable, Refused) as exc:
                log.warning("status of %s: %s", target.hd.endpoint_id, exc)

    async def _event(self, target: Target, kind: str, reason: str, message: str) -> None:
        try:
            await self.kube.post_event(
                target.cr, kind, reason, message, conditions.timestamp(self.clock())
            )
        except (Unavailable, Refused) as exc:
            log.warning("event for %s not posted: %s", target.hd.endpoint_id, exc)
