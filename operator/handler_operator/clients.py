"""The only code that talks to Kubernetes (aiohttp, async).

`KubeApi` does server-side apply with one field manager, reads, label-selected watches,
conditions per type (with a resourceVersion precondition) and events, on
kubernetes_asyncio's authenticated connection;
the gateway's client is `handler_protocol.clients`. Retryable failures raise `Unavailable`, refusals
`Refused` (both shared with the gateway's client).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from kubernetes_asyncio import config
from kubernetes_asyncio.client import ApiClient, Configuration

from handler_operator import conditions
from handler_operator.settings import FIELD_MANAGER
from handler_protocol.clients import USER_AGENT, NotFound, Refused, Unavailable

logger = logging.getLogger(__name__)

API_PATHS = {
    ("v1", "Secret"): "/api/v1/namespaces/{ns}/secrets",
    ("v1", "ServiceAccount"): "/api/v1/namespaces/{ns}/serviceaccounts",
    ("v1", "Pod"): "/api/v1/namespaces/{ns}/pods",
    ("v1", "Event"): "/api/v1/namespaces/{ns}/events",
    ("apps/v1", "Deployment"): "/apis/apps/v1/namespaces/{ns}/deployments",
    ("policy/v1", "PodDisruptionBudget"): "/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets",
    ("keda.sh/v1alpha1", "ScaledObject"): "/apis/keda.sh/v1alpha1/namespaces/{ns}/scaledobjects",
    (
        "keda.sh/v1alpha1",
        "TriggerAuthentication",
    ): "/apis/keda.sh/v1alpha1/namespaces/{ns}/triggerauthentications",
    (
        "handlerops.dev/v1alpha1",
        "HandlerDeployment",
    ): "/apis/handlerops.dev/v1alpha1/namespaces/{ns}/handlerdeployments",
}


class Conflict(Unavailable):
    """409: the object changed since it was read (a resourceVersion precondition failed)."""


def collection_path(api_version: str, kind: str, namespace: str | None) -> str:
    """The collection's URL path; namespace None: across all namespaces."""
    path = API_PATHS[(api_version, kind)]
    return path.replace("/namespaces/{ns}", "") if namespace is None else path.format(ns=namespace)


WatchEvent = tuple[str, dict[str, Any]]  # ("ADDED" | "MODIFIED" | "DELETED", object)


class KubeApi:
    """Kubernetes calls on kubernetes_asyncio's authenticated connection.

    Auth, TLS and token refresh are the maintained client's: in a pod the service-account token
    is re-read from its file (projected tokens rotate), kubeconfigs may hold a token, a client
    certificate or an exec plugin. Errors map to `NotFound`, `Unavailable` (retry) or
    `Refused` (a request the apiserver refuses).
    """

    def __init__(self, api_client: ApiClient):
        self.api = api_client
        # Who made a call, in the apiserver's audit log (and the emulator's RBAC check).
        self.api.user_agent = USER_AGENT
        self.writes = 0  # apply/patch/delete calls made (tests count spurious updates)

    @classmethod
    async def connect(cls, config_file: str | None = None) -> KubeApi:
        """In-cluster service account when in a pod, else the kubeconfig (explicit path, else
        $KUBECONFIG read now, else the client's default ~/.kube/config)."""
        configuration = Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            await config.load_kube_config(
                config_file=config_file or os.environ.get("KUBECONFIG"),
                client_configuration=configuration,
            )
        return cls(ApiClient(configuration))

    async def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        params: dict[str, str] | None = None,
    ) -> Any:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        try:
            response = await self.api.call_api(
                path,
                method,
                query_params=list((params or {}).items()),
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=30,
            )
            try:
                text = await response.text()
            finally:
                response.release()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unavailable(f"{method} {path}: {exc!r}") from exc
        if response.status == 404:
            raise NotFound(f"{method} {path}: not found")
        if response.status == 409:
            raise Conflict(f"{method} {path}: HTTP 409: {text[:300]}")
        if response.status == 429 or response.status >= 500:
            raise Unavailable(f"{method} {path}: HTTP {response.status}: {text[:300]}")
        if response.status >= 400:
            raise Refused(response.status, f"{method} {path}: HTTP {response.status}: {text[:500]}")
        return json.loads(text) if text else None

    async def apply(self, obj: dict[str, Any], force: bool = True) -> dict[str, Any]:
        """Server-side apply with our field manager (force only takes back our own fields)."""
        meta = obj["metadata"]
        path = (
            f"{collection_path(obj['apiVersion'], obj['kind'], meta['namespace'])}/{meta['name']}"
        )
        params = {"fieldManager": FIELD_MANAGER, "force": "true" if force else "false"}
        self.writes += 1
        return await self._request(
            "PATCH", path, obj, content_type="application/apply-patch+yaml", params=params
        )

    async def get(
        self, api_version: str, kind: str, namespace: str, name: str
    ) -> dict[str, Any] | None:
        try:
            return await self._request(
                "GET", f"{collection_path(api_version, kind, namespace)}/{name}"
            )
        except NotFound:
            return None

    async def serves(self, api_version: str) -> bool:
        """Whether the apiserver serves this group/version (its CRDs are installed)."""
        try:
            await self._request("GET", f"/apis/{api_version}")
        except NotFound:
            return False
        return True

    async def list(
        self, api_version: str, kind: str, namespace: str, selector: str | None = None
    ) -> list[dict[str, Any]]:
        params = {"labelSelector": selector} if selector else {}
        body = await self._request(
            "GET", collection_path(api_version, kind, namespace), params=params
        )
        return list((body or {}).get("items") or [])

    async def watch(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        selector: str,
        server_timeout: int = 300,
        retry_delay: float = 1.0,
    ) -> AsyncIterator[WatchEvent]:
        """List, then watch from the list's resourceVersion, filtered on the server by the label
        `selector`, forever: unrelated objects never reach this process. After an expired
        resourceVersion (410) or a lost connection it lists again, yielding what it already
        knew as MODIFIED (ADDED if new) and DELETED for what went away meanwhile."""
        path = collection_path(api_version, kind, namespace)
        known: dict[str, dict[str, Any]] = {}
        while True:
            try:
                listing = await self._request("GET", path, params={"labelSelector": selector})
                version = ((listing or {}).get("metadata") or {}).get("resourceVersion", "")
                current = {
                    item["metadata"]["uid"]: item for item in (listing or {}).get("items") or []
                }
                for uid, gone in known.items():
                    if uid not in current:
                        yield "DELETED", gone
                for uid, item in current.items():
                    yield ("MODIFIED" if uid in known else "ADDED"), item
                known = current
                async for event_type, obj in self._watch_from(
                    path, selector, version, server_timeout
                ):
                    uid = obj["metadata"]["uid"]
                    if event_type == "DELETED":
                        known.pop(uid, None)
                    else:
                        known[uid] = obj
                    yield event_type, obj
            # ValueError: a line that is not JSON; Refused: e.g. 403 while RBAC is applied.
            except (Unavailable, Refused, ValueError, aiohttp.ClientError, TimeoutError) as exc:
                logger.info("watch of %s %s: %s; listing again", kind, selector, exc)
                await asyncio.sleep(retry_delay)

    async def _watch_from(
        self, path: str, selector: str, version: str, server_timeout: int
    ) -> AsyncIterator[WatchEvent]:
        """Watch streams from `version` on; a server-closed stream resumes where it ended.
        Returns (so the caller lists again) when the version has expired."""
        while True:
            params = [
                ("watch", "true"),
                ("labelSelector", selector),
                ("resourceVersion", version),
                ("allowWatchBookmarks", "true"),
                ("timeoutSeconds", str(server_timeout)),
            ]
            response = await self.api.call_api(
                path,
                "GET",
                query_params=params,
                header_params={"Accept": "application/json"},
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=server_timeout + 30,
            )
            try:
                if response.status == 410:
                    return
                if response.status >= 400:
                    raise Unavailable(f"watch {path}: HTTP {response.status}")
                async for line in response.content:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    obj = event.get("object") or {}
                    if event.get("type") == "ERROR":
                        if obj.get("code") == 410:
                            return
                        raise Unavailable(f"watch {path}: {obj.get('message')}")
                    version = (obj.get("metadata") or {}).get("resourceVersion") or version
                    if event.get("type") != "BOOKMARK":
                        yield event["type"], obj
            finally:
                response.release()

    async def update_conditions(
        self,
        api_version: str,
        kind: str,
        namespace: str,
        name: str,
        updates: list[dict[str, Any]],
        fields: dict[str, Any] | None = None,
        attempts: int = 5,
    ) -> bool:
        """Set the conditions in `updates` (by type) and the status `fields` on the live object:
        read, merge, write with its resourceVersion as a precondition, again on a conflict, so
        a concurrent writer's conditions are never lost. False if the object is gone."""
        path = f"{collection_path(api_version, kind, namespace)}/{name}"
        for attempt in range(attempts):
            try:
                live = await self._request("GET", path)
            except NotFound:
                return False
            status = live.get("status") or {}
            merged = conditions.merge_conditions(status.get("conditions"), updates)
            patch = {**(fields or {}), "conditions": merged}
            if all(status.get(key) == value for key, value in patch.items()):
                return True
            version = live["metadata"].get("resourceVersion")
            self.writes += 1
            try:
                await self._request(
                    "PATCH",
                    f"{path}/status",
                    {"metadata": {"resourceVersion": version}, "status": patch},
                    content_type="application/merge-patch+json",
                )
                return True
            except Conflict:
                if attempt == attempts - 1:
                    raise
            except NotFound:
                return False
        return False

    async def delete(
        self, api_version: str, kind: str, namespace: str, name: str, uid: str | None = None
    ) -> bool:
        """Delete one object (only that very object when `uid` is given); False if absent."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if uid:
            body["preconditions"] = {"uid": uid}
        self.writes += 1
        try:
            await self._request(
                "DELETE", f"{collection_path(api_version, kind, namespace)}/{name}", body
            )
        except NotFound:
            return False
        return True

    async def post_event(
        self, involved: dict[str, Any], type_: str, reason: str, message: str, now: str
    ) -> None:
        """A core/v1 Event about `involved` (what `kubectl describe` lists)."""
        meta = involved["metadata"]
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": involved["apiVersion"],
                "kind": involved["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "reportingInstance": FIELD_MANAGER,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self.writes += 1
        await self._request("POST", collection_path("v1", "Event", meta["namespace"]), event)

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """POST a new object; `Conflict` when one of that name already exists."""
        meta = obj["metadata"]
        self.writes += 1
        return await self._request(
            "POST", collection_path(obj["apiVersion"], obj["kind"], meta["namespace"]), obj
        )

    async def merge_patch(
        self, api_version: str, kind: str, namespace: str, name: str, patch: dict[str, Any]
    ) -> dict[str, Any]:
        """A JSON merge patch (a `metadata.resourceVersion` in it is a precondition)."""
        self.writes += 1
        return await self._request(
            "PATCH",
            f"{collection_path(api_version, kind, namespace)}/{name}",
            patch,
            content_type="application/merge-patch+json",
        )

    async def annotate_pod(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        """Merge `annotations` into a pod's metadata (a pod already gone is left alone)."""
        try:
            await self.merge_patch(
                "v1", "Pod", namespace, name, {"metadata": {"annotations": annotations}}
            )
        except NotFound:
            return

    async def set_pod_condition(self, namespace: str, name: str, condition: dict[str, Any]) -> None:
        """Set one condition of a pod's status (a readiness gate), leaving the others alone."""
        path = f"{collection_path('v1', 'Pod', namespace)}/{name}/status"
        self.writes += 1
        try:
            await self._request(
                "PATCH",
                path,
                {"status": {"conditions": [condition]}},
                content_type="application/strategic-merge-patch+json",
            )
        except NotFound:
            return

    async def close(self) -> None:
        await self.api.close()
