"""An endpoint's registration with the gateway: its worker tokens (a rotation, the tokens it
retires once no pod reads them) and its client keys (labelled Secrets), written by one writer
at a time per HandlerDeployment, from its live state.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Collection
from secrets import token_urlsafe
from typing import Any

from pydantic import ValidationError

from handler_operator import builders
from handler_operator.clients import Conflict, KubeApi
from handler_operator.models import GROUP, VERSION, HandlerDeployment
from handler_operator.settings import OperatorSettings
from handler_protocol.clients import GatewayAdmin

logger = logging.getLogger(__name__)
HD_API = f"{GROUP}/{VERSION}"


class Registrar:
    """Registers endpoints. Every path (a reconcile, a key Secret's change, a retirement)
    reads the Secrets and the HandlerDeployment and writes the gateway and the status under
    the HandlerDeployment's lock, so the last registration is of the latest state read (a
    revoked key never comes back from a slower writer)."""

    def __init__(self, kube: KubeApi, gateway: GatewayAdmin, settings: OperatorSettings):
        self.kube, self.gateway, self.settings = kube, gateway, settings
        self._locks: defaultdict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)

    async def register(
        self, namespace: str, name: str, retire: Collection[str] = ()
    ) -> list[builders.SpecProblem]:
        """Register the endpoint as the live HandlerDeployment says, but for the retiring
        worker token rotations in `retire`; what is wrong with its spec.access. Nothing for
        one that is gone, going away or invalid (its reconcile says why)."""
        async with self._locks[(namespace, name)]:
            live = await self.kube.get(HD_API, "HandlerDeployment", namespace, name)
            if live is None or live["metadata"].get("deletionTimestamp"):
                return []
            try:
                hd = HandlerDeployment.model_validate(live)
            except ValidationError:
                return []
            status = live.get("status") or {}
            secrets = await self.kube.list("v1", "Secret", namespace, builders.CLIENT_KEYS_LABEL)
            if not any(s["metadata"]["name"] == builders.CALLS_SECRET for s in secrets):
                secrets.append(await self._make_calls_key(namespace))
            keys, problems = builders.build_client_keys(hd, secrets)
            rotation = hd.spec.access.workerTokenRotation
            retiring = [
                old for old in builders.retiring_rotations(status, rotation) if old not in retire
            ]
            registration = builders.build_endpoint_registration(
                hd,
                builders.worker_token(hd, self.settings),
                keys,
                [builders.worker_token(hd, self.settings, old) for old in retiring],
            )
            await self.gateway.put_endpoint(hd.endpoint_id, registration)
            fields = {
                "endpointId": hd.endpoint_id,
                "clientKeys": [key["id"] for key in keys],
                "workerTokenRotation": rotation,
                "retiringWorkerTokenRotations": retiring or None,
            }
            if any(status.get(key) != value for key, value in fields.items()):
                await self.kube.update_conditions(
                    HD_API, "HandlerDeployment", namespace, name, [], fields
                )
            return problems

    async def _make_calls_key(self, namespace: str) -> dict[str, Any]:
        """The namespace's key for calls between its endpoints (`@remote` inside a worker;
        every worker pod reads it): made once, when the namespace has none (a deleted one is
        made again, with a new value)."""
        body = builders.build_calls_secret(namespace, token_urlsafe(30))
        try:
            return await self.kube.create(body)
        except Conflict:  # made meanwhile (another registration of the namespace)
            found = await self.kube.get("v1", "Secret", namespace, builders.CALLS_SECRET)
            return found or body

    async def register_namespace(self, namespace: str) -> None:
        """Every registered endpoint of the namespace again (a key Secret there changed: its
        keys, or its label, which says whom it reaches)."""
        for body in await self.kube.list(HD_API, "HandlerDeployment", namespace):
            if (body.get("status") or {}).get("endpointId"):
                await self.register(namespace, body["metadata"]["name"])

    async def retire_tokens(self, owner: dict[str, Any]) -> None:
        """The retiring worker tokens that no worker pod, and not the Deployment's template,
        reads any more (the rollout after a rotation is over, the last old pod gone with its
        jobs) stop being accepted."""
        status = owner.get("status") or {}
        retiring = status.get("retiringWorkerTokenRotations") or []
        if not retiring or owner["metadata"].get("deletionTimestamp"):
            return
        try:
            hd = HandlerDeployment.model_validate(owner)
        except ValidationError:
            return
        if hd.spec.access.workerTokenRotation != status.get("workerTokenRotation"):
            return  # a rotation its reconcile has not registered yet: after that
        deployment = await self.kube.get("apps/v1", "Deployment", hd.namespace, hd.name)
        pods = await self.kube.list("v1", "Pod", hd.namespace, builders.selector_string(hd))
        unread = []
        for old in retiring:
            secret = builders.secret_name(hd, self.settings, old)
            if builders.references_secret(deployment, secret) or any(
                builders.pod_reads_secret(pod.get("spec") or {}, secret) for pod in pods
            ):
                continue
            unread.append(old)
        if unread:
            await self.register(hd.namespace, hd.name, retire=unread)
            logger.info(
                "%s/%s: worker token(s) of rotation %s retired",
                hd.namespace, hd.name, ", ".join(repr(old) for old in unread),
            )  # fmt: skip
