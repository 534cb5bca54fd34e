"""kopf handlers: reconcile HandlerDeployments into worker objects, surface crash loops, drain.

Thin glue over the pure builders and the clients: create/update/resume run one idempotent
reconcile (server-side apply, one field manager); worker pods (HandlerHealthy) and Deployments
(READY), watched with a server-side label selector, feed the status; the finalizer drains (or
purges) the endpoint before deregistering it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import kopf
from pydantic import ValidationError

from handler_operator import builders, conditions
from handler_operator.clients import Conflict, KubeApi, Refused, Unavailable
from handler_operator.metrics import RECONCILE_SECONDS, RECONCILES, start_metrics_server
from handler_operator.models import GROUP, PLURAL, VERSION, HandlerDeployment, describe_errors
from handler_operator.registrations import Registrar
from handler_operator.scaling.engines import Scaler
from handler_operator.scaling.observations import epoch
from handler_operator.settings import OperatorSettings
from handler_protocol.clients import GatewayAdmin
from handler_protocol.ids import endpoint_id

HD = (GROUP, VERSION, PLURAL)
WORKER_SELECTOR = "app.kubernetes.io/managed-by=handler-operator"
ON_DELETE_ANNOTATION = f"{GROUP}/on-delete"  # "drain" (default) or "purge"
GATEWAY_UNREACHABLE = "GatewayUnreachable"
KEDA_RECHECK_SECONDS = 120
ACCESS_RECHECK_SECONDS = 30  # a missing spec.access Secret is looked for again this often
logger = logging.getLogger(__name__)


def now_iso() -> str:
    return conditions.timestamp(time.time())


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    operator = OperatorSettings.from_env(os.environ)
    if not operator.gateway_admin_key:
        # It also keys the workers' tokens (builders.worker_token): never run without one.
        raise kopf.PermanentError("HANDLER_OPERATOR_GATEWAY_ADMIN_KEY is not set")
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.posting.level = 20  # INFO and up become Kubernetes events
    settings.watching.server_timeout = 300
    memo.settings = operator
    memo.kube = await KubeApi.connect()
    memo.gateway = GatewayAdmin(operator.admin_url, operator.gateway_admin_key)
    # The scaling loop polls the gateway on a session of its own (its long-poll waits).
    memo.scaler = Scaler(
        memo.kube, GatewayAdmin(operator.admin_url, operator.gateway_admin_key), operator
    )
    memo.scaler_task = asyncio.get_running_loop().create_task(memo.scaler.run())
    memo.deployment_status = {}
    memo.registrar = Registrar(memo.kube, memo.gateway, operator)
    memo.watch_tasks = start_watches(memo, operator.namespaces)
    if operator.metrics_port:
        start_metrics_server(operator.metrics_port)


@kopf.on.login()
def login(**kwargs: Any) -> Any:
    """In-cluster service account (kopf reads the token file, and again after a 401: rotated
    tokens are picked up), else the kubeconfig named by KUBECONFIG, read at call time."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.cleanup()
async def close_clients(memo: kopf.Memo, **_: Any) -> None:
    for task in [memo.scaler_task, *memo.watch_tasks]:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await memo.scaler.gateway.close()
    await memo.kube.close()
    await memo.gateway.close()


async def _write_status(
    memo: kopf.Memo, body: kopf.Body, fields: dict[str, Any], *updates: dict[str, Any]
) -> None:
    """Status `fields` and the conditions in `updates` (by type; the others are kept)."""
    await memo.kube.update_conditions(
        f"{GROUP}/{VERSION}",
        "HandlerDeployment",
        body.metadata.namespace,
        body.metadata.name,
        list(updates),
        fields,
    )


async def _refuse(
    memo: kopf.Memo, body: kopf.Body, reason: str, message: str, fields: dict[str, Any]
) -> None:
    """Ready=False with `reason` (and the status `fields`), and a Warning event saying it."""
    generation = body.metadata.get("generation")
    await _write_status(
        memo,
        body,
        {"observedGeneration": generation, **fields},
        conditions.condition(conditions.READY, False, reason, message, now_iso(), generation),
    )
    kopf.warn(body, reason=reason, message=message)


async def _create_secret(kube: KubeApi, hd: HandlerDeployment, settings, owner) -> None:
    """Create the worker token Secret; one that exists already holds this very token (its
    name is its content's), so a conflict means done. The operator never reads it back."""
    try:
        await kube.create(builders.owned(builders.build_secret(hd, settings), owner))
    except Conflict:
        pass


def _replicas(hd: HandlerDeployment, current: dict[str, Any] | None) -> int:
    return builders.initial_replicas(hd, (current or {}).get("spec", {}).get("replicas"))


async def reconcile_hd(
    body: kopf.Body, memo: kopf.Memo, logger: Any, was_keda: bool | None = None
) -> None:
    """One idempotent reconcile. `was_keda`: the previous spec used engine keda (None: unknown,
    as on resume), so KEDA objects may need removing."""
    meta, status = body.metadata, body.get("status") or {}
    generation = meta.get("generation")
    current = list(status.get("conditions") or [])
    try:
        hd = HandlerDeployment.model_validate(dict(body))
    except ValidationError as exc:
        message = describe_errors(exc, most=1)
        await _refuse(memo, body, conditions.INVALID_SPEC, message, {})
        raise kopf.PermanentError(message) from None

    kube: KubeApi = memo.kube
    pull_secrets = set()
    for secret in hd.spec.imagePullSecrets:
        if await kube.get("v1", "Secret", hd.namespace, secret.name):
            pull_secrets.add(secret.name)
    problems = builders.check_spec(hd, pull_secrets)
    if problems:
        message = "; ".join(p.message for p in problems)
        await _refuse(memo, body, problems[0].reason, message, {"endpointId": hd.endpoint_id})
        raise kopf.PermanentError(message)

    settings: OperatorSettings = memo.settings
    try:
        access_problems = await memo.registrar.register(hd.namespace, hd.name)
    except Refused as exc:
        # A gateway that cannot take the registration (an older version than the operator's,
        # during an upgrade): said, and tried again until it can.
        await _refuse(memo, body, conditions.GATEWAY_REFUSED, str(exc), {})
        raise kopf.TemporaryError(f"the gateway refused the endpoint: {exc}", delay=30) from exc
    except Unavailable as exc:
        await _write_status(
            memo,
            body,
            {},
            conditions.condition(
                conditions.READY, False, conditions.GATEWAY_UNAVAILABLE, str(exc), now_iso(),
                generation,
            ),
        )  # fmt: skip
        raise kopf.TemporaryError(f"gateway unavailable: {exc}", delay=5) from exc
    if access_problems:
        # Looked at again now and then: a Secret may be created or labelled later.
        message = "; ".join(p.message for p in access_problems)
        await _refuse(memo, body, access_problems[0].reason, message, {})
        raise kopf.TemporaryError(message, delay=ACCESS_RECHECK_SECONDS)

    keda = hd.spec.scaling.engine == "keda"
    if keda and not await kube.serves(builders.KEDA_API):
        message = (
            f"scaling.engine is keda, but this cluster does not serve {builders.KEDA_API} "
            "(KEDA is not installed): install KEDA, or use scaling.engine builtin"
        )
        ready = conditions.condition(
            conditions.READY, False, conditions.KEDA_NOT_INSTALLED, message, now_iso(), generation
        )
        if conditions.would_change(current, ready):
            await _write_status(memo, body, {"observedGeneration": generation}, ready)
            kopf.warn(body, reason=conditions.KEDA_NOT_INSTALLED, message=message)
        # Checked again now and then (KEDA may be installed later), not in a tight loop.
        raise kopf.TemporaryError(message, delay=KEDA_RECHECK_SECONDS)
    live = {
        "ServiceAccount": await kube.get(
            "v1", "ServiceAccount", hd.namespace, builders.service_account_name(hd)
        ),
        "Deployment": await kube.get("apps/v1", "Deployment", hd.namespace, hd.name),
        "PodDisruptionBudget": await kube.get(
            "policy/v1", "PodDisruptionBudget", hd.namespace, hd.name
        ),
    }
    replicas = _replicas(hd, live["Deployment"])
    objects = builders.build_objects(hd, settings, replicas)
    if keda:
        for kind, name in (
            ("TriggerAuthentication", builders.trigger_authentication_name(hd)),
            ("ScaledObject", hd.name),
        ):
            live[kind] = await kube.get("keda.sh/v1alpha1", kind, hd.namespace, name)
    try:
        for obj in objects:
            if obj["kind"] == "Secret":
                # Created once per token: a Deployment already reading it means it exists.
                if not builders.references_secret(live["Deployment"], obj["metadata"]["name"]):
                    await _create_secret(kube, hd, settings, dict(body))
                continue
            obj = builders.applied(obj, dict(body))
            if builders.needs_apply(obj, live[obj["kind"]]):  # unchanged: no write at all
                await kube.apply(obj)
        if not keda and was_keda is not False:
            await _remove_keda_objects(kube, hd)
        budget = live["PodDisruptionBudget"]
        if hd.spec.scaling.minReplicas == 0 and budget and _owned_by_hd(budget):
            await kube.delete("policy/v1", "PodDisruptionBudget", hd.namespace, hd.name)
    except Unavailable as exc:
        raise kopf.TemporaryError(str(exc), delay=5) from exc
    except Refused as exc:  # e.g. the KEDA CRDs are not installed
        raise kopf.TemporaryError(f"cannot apply the worker objects: {exc}", delay=30) from exc
    memo.scaler.register(dict(body), hd, replicas)

    ready = status.get("readyReplicas") or 0
    reason = (
        conditions.SCALED_TO_ZERO
        if replicas == 0
        else (conditions.WORKERS_READY if ready else conditions.WORKERS_NOT_READY)
    )
    fields = {
        "observedGeneration": generation,
        "endpointId": hd.endpoint_id,
        "selector": builders.selector_string(hd),
        "gpu": builders.gpu_summary(hd),
        "desiredReplicas": replicas,
        "ready": f"{ready}/{replicas}",
    }
    reconciled = conditions.condition(
        conditions.READY,
        True,
        reason,
        f"worker Deployment {hd.name} reconciled ({replicas} desired)",
        now_iso(),
        generation,
    )
    if any(status.get(key) != value for key, value in fields.items()) or (
        conditions.would_change(current, reconciled)
    ):
        await _write_status(memo, body, fields, reconciled)
        kopf.info(body, reason=conditions.RECONCILED, message=f"applied generation {generation}")
        await _keep_refusal(memo, body, hd, conditions.merge_conditions(current, [reconciled]))


async def on_access_secret(memo: kopf.Memo, event_type: str, secret: dict[str, Any]) -> None:
    """A labelled key Secret changed (its keys, or its label: whom it reaches): the endpoints
    of its namespace get their keys again (rotation and revocation without touching a
    HandlerDeployment)."""
    await memo.registrar.register_namespace((secret.get("metadata") or {}).get("namespace"))


async def _keep_refusal(
    memo: kopf.Memo, body: kopf.Body, hd: HandlerDeployment, written: list[dict[str, Any]]
) -> None:
    """The worker Deployment's watcher may have said FailedCreate before the reconcile's Ready
    landed on top of it; read the Deployment after the write, so its refusal always has the last
    word whichever writer came second."""
    deployment = await memo.kube.get("apps/v1", "Deployment", hd.namespace, hd.name)
    if not deployment:
        return
    spec_replicas = (deployment.get("spec") or {}).get("replicas") or 0
    derived = conditions.ready_from_workload(
        written, deployment.get("status") or {}, spec_replicas, now_iso()
    )
    ready = next(c for c in derived if c.get("type") == conditions.READY)
    if ready.get("reason") == conditions.WORKERS_REJECTED:
        await _write_status(memo, body, {}, ready)


async def _remove_keda_objects(kube: KubeApi, hd: HandlerDeployment) -> None:
    """Back to the builtin engine: the ScaledObject we rendered before must go (its HPA too)."""
    for kind, name in (
        ("ScaledObject", hd.name),
        ("TriggerAuthentication", builders.trigger_authentication_name(hd)),
    ):
        try:
            found = await kube.get("keda.sh/v1alpha1", kind, hd.namespace, name)
        except Refused:  # KEDA not installed
            return
        if found and _owned_by_hd(found):
            await kube.delete("keda.sh/v1alpha1", kind, hd.namespace, name)


def _owned_by_hd(obj: dict[str, Any]) -> bool:
    refs = obj["metadata"].get("ownerReferences") or []
    return any(ref.get("kind") == "HandlerDeployment" for ref in refs)


def _owned_by(obj: dict[str, Any], owner: dict[str, Any]) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == owner["metadata"].get("uid") for ref in refs)


@kopf.on.resume(*HD)
@kopf.on.create(*HD)
@kopf.on.update(*HD, field="spec")
async def reconcile(
    body: kopf.Body, memo: kopf.Memo, logger: Any, reason: Any, old: Any, **_: Any
) -> None:
    outcome = "error"
    with RECONCILE_SECONDS.time():
        try:
            # Only a switch away from KEDA, or a resume (no memory of the last spec), may leave
            # a ScaledObject behind: skip the lookups on every other reconcile.
            if reason == kopf.Reason.CREATE:
                was_keda: bool | None = False
            elif reason == kopf.Reason.UPDATE and old:  # `old` is the old spec (field="spec")
                was_keda = (old.get("scaling") or {}).get("engine") == "keda"
            else:
                was_keda = None
            await reconcile_hd(body, memo, logger, was_keda)
            outcome = "ok"
        except kopf.PermanentError:
            outcome = "invalid"
            raise
        except kopf.TemporaryError:
            outcome = "retry"
            raise
        finally:
            RECONCILES.labels(outcome).inc()


def registered_endpoint(body: Mapping[str, Any]) -> str:
    """A HandlerDeployment's gateway endpoint: as its status records it, else as it would be."""
    meta = body["metadata"]
    return (body.get("status") or {}).get("endpointId") or endpoint_id(
        meta.get("namespace") or "default", meta["name"]
    )


@kopf.on.delete(*HD)
async def finalize(body: kopf.Body, memo: kopf.Memo, logger: Any, retry: int, **_: Any) -> None:
    """Drain (wait for the queue to empty, bounded) or purge, then deregister the endpoint."""
    endpoint = registered_endpoint(body)
    settings: OperatorSettings = memo.settings
    policy = body.metadata.annotations.get(ON_DELETE_ANNOTATION)
    purge = policy == "purge" or (policy is None and settings.purge_on_delete)
    try:
        if purge:
            await memo.gateway.purge(endpoint)
        else:
            figures = (await memo.gateway.queues()).get(endpoint)
            busy = figures and (figures["inQueue"] or figures["inProgress"])
            if busy and retry * 5 < settings.drain_timeout_seconds:
                raise kopf.TemporaryError(
                    f"draining {endpoint}: {figures['inQueue']} queued, "
                    f"{figures['inProgress']} running",
                    delay=5,
                )
        await memo.gateway.delete_endpoint(endpoint)
    except Unavailable as exc:
        waited = time.time() - (epoch(body.metadata.get("deletionTimestamp")) or time.time())
        if waited < settings.deregister_timeout_seconds:
            raise kopf.TemporaryError(f"gateway unavailable: {exc}", delay=5) from exc
        message = (
            f"the gateway was unreachable for {waited:.0f} s ({exc}): removing the "
            f"HandlerDeployment anyway; endpoint {endpoint} may stay registered there"
        )
        await memo.kube.post_event(dict(body), "Warning", GATEWAY_UNREACHABLE, message, now_iso())
        logger.warning(message)
    else:
        logger.info("endpoint %s deregistered", endpoint)
    memo.scaler.unregister(body.metadata.namespace, body.metadata.name)


async def _owner_hd(memo: kopf.Memo, namespace: str, name: str | None) -> dict[str, Any] | None:
    if not name:
        return None
    return await memo.kube.get(f"{GROUP}/{VERSION}", "HandlerDeployment", namespace, name)


async def on_worker_pod(memo: kopf.Memo, event_type: str, pod: dict[str, Any]) -> None:
    """Pods feed the scaler; HandlerHealthy follows them (the loader's termination message)."""
    memo.scaler.observe_pod(event_type, pod)
    meta = pod.get("metadata") or {}
    namespace = meta.get("namespace", "default")
    owner = await _owner_hd(
        memo, namespace, (meta.get("labels") or {}).get("app.kubernetes.io/instance")
    )
    if owner is not None and event_type == "DELETED":
        await memo.registrar.retire_tokens(owner)
    if owner is None or event_type == "DELETED":
        return
    # Unschedulable pods are the scaler's (Scaling=WaitingForCapacity past pendingTimeout):
    # they are never deleted for it, a GPU node may be on its way.
    current = (owner.get("status") or {}).get("conditions") or []
    generation = owner["metadata"].get("generation")
    problem = conditions.pod_problem(pod)
    if problem is None:
        running = (pod.get("status") or {}).get("phase") == "Running"
        if not running:
            return
        problem_free = (True, conditions.HANDLER_OK, "workers are running")
        healthy = conditions.condition(
            conditions.HANDLER_HEALTHY, *problem_free, now_iso(), generation
        )
    else:
        reason, message = problem
        healthy = conditions.condition(
            conditions.HANDLER_HEALTHY, False, reason, message, now_iso(), generation
        )
        await _recreate_missing_secret(memo, owner, reason, message)
    changes = conditions.would_change(current, healthy)
    if problem is not None or changes:  # a problem each time (idempotent), its end once
        await _tell_gateway(memo, owner, problem)
    if changes:
        await memo.kube.update_conditions(
            f"{GROUP}/{VERSION}", "HandlerDeployment", namespace, owner["metadata"]["name"],
            [healthy],
        )  # fmt: skip
        if problem is not None:
            await memo.kube.post_event(owner, "Warning", problem[0], problem[1], now_iso())


async def _tell_gateway(
    memo: kopf.Memo, owner: dict[str, Any], problem: tuple[str, str] | None
) -> None:
    """The gateway tells clients waiting on the endpoint's queued jobs why they wait."""
    endpoint = registered_endpoint(owner)
    reason, message = problem if problem is not None else (None, "")
    try:
        await memo.gateway.report_problem(endpoint, reason, message)
    except (Unavailable, Refused) as exc:  # the condition and the event still say it
        logger.warning("the gateway was not told of %s's handler problem: %s", endpoint, exc)


async def _recreate_missing_secret(
    memo: kopf.Memo, owner: dict[str, Any], reason: str, message: str
) -> None:
    """The worker token Secret was deleted under running workers (the kubelet says so): the
    operator, which never reads its token Secrets, creates it again (same name, same token)."""
    if reason != "CreateContainerConfigError":
        return
    try:
        hd = HandlerDeployment.model_validate(owner)
    except ValidationError:
        return
    if f'secret "{builders.secret_name(hd, memo.settings)}" not found' in message:
        await _create_secret(memo.kube, hd, memo.settings, owner)


async def on_worker_deployment(
    memo: kopf.Memo, event_type: str, deployment: dict[str, Any]
) -> None:
    """READY and replicas of `kubectl get hd` follow the worker Deployment's status."""
    meta = deployment.get("metadata") or {}
    seen = memo.deployment_status
    if event_type == "DELETED":
        seen.pop(meta.get("uid"), None)
        return
    status = dict(deployment.get("status") or {})
    if seen.get(meta.get("uid")) == status:
        return  # only the status matters here: spec/metadata writes are ours
    spec = deployment.get("spec") or {}
    namespace = meta.get("namespace", "default")
    instance = (meta.get("labels") or {}).get("app.kubernetes.io/instance")
    if instance:
        memo.scaler.observe_replicas(namespace, instance, spec.get("replicas"))
    owner = await _owner_hd(memo, namespace, instance)
    if owner is None or not _owned_by(deployment, owner):
        return  # not remembered: the status counts once its HandlerDeployment has adopted it
    seen[meta.get("uid")] = status
    ready = status.get("readyReplicas") or 0
    desired = (owner.get("status") or {}).get("desiredReplicas") or 0
    replicas = spec.get("replicas")
    current = (owner.get("status") or {}).get("conditions") or []
    updated = conditions.ready_from_workload(
        current, status, replicas if replicas is not None else desired, now_iso()
    )
    fields: dict[str, Any] = {
        "replicas": status.get("replicas") or 0,
        "readyReplicas": ready,
        "ready": f"{ready}/{desired}",
    }
    await memo.kube.update_conditions(
        f"{GROUP}/{VERSION}", "HandlerDeployment", namespace, owner["metadata"]["name"],
        conditions.changed_types(current, updated), fields,
    )  # fmt: skip
    await memo.registrar.retire_tokens(owner)


# The objects the operator follows, watched with a server-side label selector (kopf's
# `labels=` filters in the client, after listing every Pod, Deployment and Secret of the
# cluster): its worker Pods and Deployments, and the Secrets labelled as holding client keys.
WATCHES = (
    ("v1", "Pod", WORKER_SELECTOR, on_worker_pod),
    ("apps/v1", "Deployment", WORKER_SELECTOR, on_worker_deployment),
    ("v1", "Secret", builders.CLIENT_KEYS_LABEL, on_access_secret),
)


async def _follow(
    memo: kopf.Memo, api_version: str, kind: str, namespace: str | None, selector: str, react
):
    async for event_type, obj in memo.kube.watch(api_version, kind, namespace, selector):
        try:
            await react(memo, event_type, obj)
        except asyncio.CancelledError:
            raise
        except Exception:  # one event that fails must not end the watch
            meta = obj.get("metadata") or {}
            logger.exception(
                "%s %s/%s: %s failed", kind, meta.get("namespace"), meta.get("name"), event_type
            )


def start_watches(memo: kopf.Memo, namespaces: list[str]) -> list[asyncio.Task]:
    """One task per watched kind and namespace (all namespaces when none are named)."""
    loop = asyncio.get_running_loop()
    return [
        loop.create_task(_follow(memo, api_version, kind, namespace, selector, react))
        for api_version, kind, selector, react in WATCHES
        for namespace in (namespaces or [None])
    ]
