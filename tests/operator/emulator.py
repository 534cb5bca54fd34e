"""A Kubernetes API emulator for operator tests: kmock's emulator plus what kopf and kubectl need.

Adds to kmock 0.8: uid / resourceVersion / creationTimestamp / generation (bumped on spec
changes only), namespaces from the URL, server-side apply that creates missing objects, the
status subresource, and discovery of resources defined by applied CRDs. Runs on 127.0.0.1 in a
background thread; `kubeconfig()` writes a kubeconfig pointing at it.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import itertools
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import jsonpatch
import kmock
from kmock._internal import dicts, enums, parsing

_parse_path = parsing.parse_path


def _parse_path_with_namespaces(path: str) -> parsing.ParsedPath:
    """kmock 0.8 reads `/api/v1/namespaces[/NAME]` as a namespace prefix without a resource."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and len(parts) <= 4:
        name = parts[3] if len(parts) == 4 else None
        return parsing.ParsedPath(group="", version="v1", plural="namespaces", name=name)
    return _parse_path(path)


parsing.parse_path = _parse_path_with_namespaces

BUILTIN = {
    "v1/pods": ("Pod", {"status"}),
    "v1/secrets": ("Secret", set()),
    "v1/serviceaccounts": ("ServiceAccount", set()),
    "v1/events": ("Event", set()),
    "v1/namespaces": ("Namespace", set()),
    "v1/services": ("Service", {"status"}),
    "v1/configmaps": ("ConfigMap", set()),
    "v1/persistentvolumeclaims": ("PersistentVolumeClaim", {"status"}),
    "apps/v1/deployments": ("Deployment", {"status", "scale"}),
    "apps/v1/statefulsets": ("StatefulSet", {"status", "scale"}),
    "policy/v1/poddisruptionbudgets": ("PodDisruptionBudget", {"status"}),
    "networking.k8s.io/v1/networkpolicies": ("NetworkPolicy", set()),
    "rbac.authorization.k8s.io/v1/roles": ("Role", set()),
    "rbac.authorization.k8s.io/v1/rolebindings": ("RoleBinding", set()),
    "rbac.authorization.k8s.io/v1/clusterroles": ("ClusterRole", set()),
    "rbac.authorization.k8s.io/v1/clusterrolebindings": ("ClusterRoleBinding", set()),
    "events.k8s.io/v1/events": ("Event", set()),
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", {"status"}),
}
CLUSTER_SCOPED = {
    "v1/namespaces",
    "apiextensions.k8s.io/v1/customresourcedefinitions",
    "rbac.authorization.k8s.io/v1/clusterroles",
    "rbac.authorization.k8s.io/v1/clusterrolebindings",
}
VERBS = ["get", "list", "watch", "create", "update", "patch", "delete"]


def _now() -> str:
    return (
        datetime.datetime.now(datetime.UTC)
        .replace(microsecond=0)
        .isoformat()
        .replace("+00:00", "Z")
    )


def _cell(obj: dict[str, Any], column: dict[str, Any]) -> Any:
    value: Any = obj
    for part in column["jsonPath"].strip(".").split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if column["type"] == "date" and isinstance(value, str):
        created = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        seconds = int((datetime.datetime.now(datetime.UTC) - created).total_seconds())
        return f"{seconds}s" if seconds < 120 else f"{seconds // 60}m"
    return value if value is not None else ("<none>" if column["type"] == "string" else None)


def _verb(request: Any) -> str:
    """The RBAC verb of a request, as the API server's authorizer names it."""
    method = request.method.upper()
    if method == "GET":
        if request.name:
            return "get"
        return (
            "watch"
            if str((request.params or {}).get("watch", "")).lower() in ("true", "1")
            else "list"
        )
    return {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(
        method, method.lower()
    )


def selector_matches(selector: str, labels: dict[str, str] | None) -> bool:
    """A label selector of equalities and existences (`k=v,k2`) against an object's labels."""
    labels = labels or {}
    for term in (term.strip() for term in selector.split(",") if term.strip()):
        key, equals, value = term.partition("=")
        if key.strip() not in labels or (equals and labels[key.strip()] != value.strip()):
            return False
    return True


class ApiEmulator(kmock.KubernetesEmulator):
    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._versions = itertools.count(1)
        self.log: list[tuple[str, str | None]] = []  # (method, plural) of every request
        self.reads: list[tuple[str, str, str | None]] = []  # (plural, list/watch, labelSelector)
        self._finished: set[int] = set()
        self.deletions: list[tuple[str, str | None, str]] = []  # (plural, namespace, name)
        # (group, resource[/subresource], verb) the operator used: checked against its RBAC
        self.operator_calls: set[tuple[str, str, str]] = set()
        # (monotonic time, method, plural, namespace, name) of every write, for benchmarks
        self.writes: list[tuple[float, str, str, str | None, str | None]] = []
        self._index: dict[tuple[str | None, str], list[Any]] = {}
        for key, (kind, subresources) in BUILTIN.items():
            self.resources[key] = kmock.ResourceInfo(
                kind=kind,
                namespaced=key not in CLUSTER_SCOPED,
                verbs=VERBS,
                subresources=subresources,
            )

    def _named(self, request: Any) -> list[Any]:
        """Stored objects with the request's namespace and name, through an index by name.

        kmock scans every object and compares resources for each lookup (slow with thousands of
        objects). New keys are appended to kmock's dict, so the index only reads the new tail;
        it is rebuilt when objects were removed.
        """
        store = self.objects._objects
        size = getattr(self, "_index_size", 0)
        if size > len(store):
            size, self._index = 0, {}
        if size < len(store):
            for key in itertools.islice(store, size, None):
                self._index.setdefault((key[1], key[2]), []).append(key)
            self._index_size = len(store)
        keys = self._index.get((request.namespace, request.name), ())
        return [store[key] for key in keys if key in store and key[0] == request.resource]

    def _KubernetesEmulator__get_objs(self, request: Any, strict: bool) -> list[Any]:
        if request.name is not None and request.namespace is not None:
            return self._named(request)
        selector = (request.params or {}).get("labelSelector") or ""
        return [
            obj
            for (resource, namespace, name), obj in self.objects.items()
            if resource == request.resource
            and (
                namespace == request.namespace if strict else request.namespace in (None, namespace)
            )
            and (request.name is None or name == request.name)
            and (
                not selector
                or (
                    not obj.deleted
                    and selector_matches(selector, obj.raw["metadata"].get("labels"))
                )
            )
        ]

    async def _serve_watch(self, request: Any) -> Any:
        """kmock's watch, with the label selector applied as the apiserver does (kmock ignores
        it): existing objects first, then the changes of matching objects."""
        yield b""
        selector = (request.params or {}).get("labelSelector") or ""
        async with self._lock:
            objs = [o for o in self._KubernetesEmulator__get_objs(request, False) if not o.deleted]
            events = [{"type": "ADDED", "object": obj.raw} for obj in objs]
        for event in events:
            yield event
        async for event in self._buses[request.resource]:
            meta = event.get("object", {}).get("metadata", {})
            if self._KubernetesEmulator__check(
                request, request.resource, meta.get("namespace"), meta.get("name"), strict=False
            ) and (not selector or selector_matches(selector, meta.get("labels"))):
                yield event

    def _stored(self, request: Any) -> dict[str, Any] | None:
        found = (
            self._named(request)
            if request.namespace is not None
            else [
                obj
                for (resource, namespace, name), obj in self.objects.items()
                if resource == request.resource and namespace is None and name == request.name
            ]
        )
        return None if not found or found[0].deleted else found[0].raw

    def _register_crd(self, crd: dict[str, Any]) -> None:
        spec = crd.get("spec") or {}
        names = spec.get("names") or {}
        for version in spec.get("versions") or []:
            self.resources[f"{spec['group']}/{version['name']}/{names['plural']}"] = (
                kmock.ResourceInfo(
                    kind=names.get("kind"),
                    singular=names.get("singular"),
                    namespaced=spec.get("scope") == "Namespaced",
                    verbs=VERBS,
                    shortnames=names.get("shortNames") or [],
                    categories=names.get("categories") or [],
                    subresources=set((version.get("subresources") or {}).keys()),
                )
            )

    # -- kubectl: server-side tables and the scale subresource ---------------------------------
    def _crd_for(self, resource: Any) -> dict[str, Any] | None:
        for (res, _, _), obj in self.objects.items():
            if res.plural == "customresourcedefinitions" and not obj.deleted:
                spec = obj.raw.get("spec") or {}
                if (
                    spec.get("group") == resource.group
                    and spec.get("names", {}).get("plural") == resource.plural
                ):
                    return obj.raw
        return None

    def _table(self, request: Any) -> dict[str, Any]:
        crd = self._crd_for(request.resource) if request.resource.group else None
        columns = [{"name": "Name", "type": "string", "jsonPath": ".metadata.name"}]
        if crd is not None:
            columns += [c for c in crd["spec"]["versions"][0].get("additionalPrinterColumns") or []]
        else:
            columns.append(
                {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
            )
        rows = []
        for (res, namespace, name), obj in sorted(
            self.objects.items(), key=lambda kv: kv[0][2] or ""
        ):
            if obj.deleted or res != request.resource:
                continue
            if request.namespace and namespace != request.namespace:
                continue
            if request.name and name != request.name:
                continue
            raw = obj.raw
            rows.append(
                {
                    "cells": [_cell(raw, c) for c in columns],
                    "object": {
                        "kind": "PartialObjectMetadata",
                        "apiVersion": "meta.k8s.io/v1",
                        "metadata": raw["metadata"],
                    },
                }
            )
        return {
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": "1"},
            "columnDefinitions": [
                {
                    "name": c["name"],
                    "type": c["type"],
                    "format": "name" if c["name"] == "Name" else "",
                    "description": "",
                    "priority": 0,
                }
                for c in columns
            ],
            "rows": rows,
        }

    async def _scale(self, request: Any) -> Any:
        existing = self._stored(request)
        if existing is None:
            raise kmock.KubernetesObjectNotFoundError()
        if request.action == enums.action.UPDATE:
            replicas = (request.data or {}).get("spec", {}).get("replicas")
            for key, obj in self.objects.items():
                if (
                    key[0] == request.resource
                    and key[1] == request.namespace
                    and key[2] == request.name
                ):
                    generation = (existing["metadata"].get("generation") or 1) + 1
                    obj.patch(
                        {
                            "spec": {"scaling": {"replicas": replicas}},
                            "metadata": {
                                "generation": generation,
                                "resourceVersion": str(next(self._versions)),
                            },
                        }
                    )
                    existing = obj.raw
                    await self._buses[request.resource].put(
                        {"type": "MODIFIED", "object": existing}
                    )
        status = existing.get("status") or {}
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {
                k: existing["metadata"][k] for k in ("name", "namespace", "uid", "resourceVersion")
            },
            "spec": {"replicas": (existing["spec"].get("scaling") or {}).get("replicas") or 0},
            "status": {
                "replicas": status.get("replicas") or 0,
                "selector": status.get("selector", ""),
            },
        }

    async def _serve_version(self, request: Any) -> Any:
        payload = await super()._serve_version(request)
        # kmock 0.8 names the core group's version "/v1"; kubectl then finds no core kinds.
        payload["groupVersion"] = payload.get("groupVersion", "").lstrip("/")
        for entry in payload["resources"]:
            # ... and repeats the plural as singularName (`kubectl get deployment` fails).
            if entry.get("singularName") == entry["name"] and entry.get("kind"):
                entry["singularName"] = entry["kind"].lower()
        for entry in payload["resources"]:
            if "/" in entry["name"]:
                entry["shortNames"], entry["categories"] = [], []
                if entry["name"].endswith("/scale"):
                    entry.update(
                        kind="Scale",
                        group="autoscaling",
                        version="v1",
                        verbs=["get", "patch", "update"],
                    )
        return payload

    async def _handle(self, request: Any) -> Any:
        # kmock matches each request against every recorded request (quadratic): keep only the
        # requests still in flight there, and a light log of our own for assertions.
        self.log.append(
            (request.method.upper(), request.resource.plural if request.resource else None)
        )
        if request.resource is not None and _verb(request) in ("list", "watch"):
            selector = (request.params or {}).get("labelSelector")
            self.reads.append((request.resource.plural, _verb(request), selector))
        agent = (request.headers or {}).get("User-Agent", "")
        operator_agent = any(name in agent for name in ("aiohttp", "kopf", "handler-operator"))
        if request.resource is not None and request.resource.plural and operator_agent:
            self.operator_calls.add(
                (
                    request.resource.group or "",
                    request.resource.plural
                    + (f"/{request.subresource}" if request.subresource else ""),
                    _verb(request),
                )
            )
        if request.method.upper() == "DELETE" and request.resource is not None and request.name:
            self.deletions.append((request.resource.plural, request.namespace, request.name))
        if request.method.upper() != "GET" and request.resource is not None:
            self.writes.append(
                (
                    time.monotonic(),
                    request.method.upper(),
                    request.resource.plural,
                    request.namespace,
                    request.name,
                )
            )
        try:
            return await self._respond(request)
        finally:
            self._finished.add(id(request))
            if len(self._finished) > 16:
                self._requests[:] = [r for r in self._requests if id(r) not in self._finished]
                self._finished.clear()

    async def _respond(self, request: Any) -> Any:
        from aiohttp import web

        accept = (request.headers or {}).get("Accept", "")
        if (
            request.resource is not None
            and "as=Table" in accept
            and request.action in (enums.action.LIST, enums.action.FETCH)
        ):
            return web.json_response(self._table(request))
        if request.resource is not None and request.subresource == "scale" and request.name:
            try:
                return web.json_response(await self._scale(request))
            except kmock.KubernetesObjectNotFoundError:
                return web.json_response(
                    {"kind": "Status", "code": 404, "reason": "NotFound"}, status=404
                )
        if request.resource is not None and isinstance(request.data, dict):
            conflict = self._stale(request)
            if conflict:
                return web.json_response(
                    {"kind": "Status", "code": 409, "reason": "Conflict", "message": conflict},
                    status=409,
                )
            request = self._stamp(request)
        try:
            response = await super()._handle(request)
        except jsonpatch.JsonPatchTestFailed as exc:
            # kopf's JSON patches test the resourceVersion first; the apiserver answers a failed
            # test with 422 (kopf then retries on the next event), kmock with a 500 forever.
            return web.json_response(
                {"kind": "Status", "code": 422, "reason": "Invalid", "message": str(exc)},
                status=422,
            )
        if (
            request.resource is not None
            and request.resource.plural == "customresourcedefinitions"
            and isinstance(request.data, dict)
            and request.data.get("spec")
        ):
            self._register_crd(request.data)
        return response

    def _stale(self, request: Any) -> str | None:
        """The apiserver's optimistic concurrency: a write that names a resourceVersion other
        than the stored one is refused (409), which kmock does not do."""
        wanted = (request.data.get("metadata") or {}).get("resourceVersion")
        if not wanted or request.action != enums.action.UPDATE or not request.name:
            return None
        existing = self._stored(request)
        current = (existing or {}).get("metadata", {}).get("resourceVersion")
        if existing is None or current == wanted:
            return None
        return (
            f'Operation cannot be fulfilled on {request.resource.plural} "{request.name}": the '
            "object has been modified; please apply your changes to the latest version and try again"
        )

    def _stamp(self, request: Any) -> Any:
        """Fill in the metadata a real API server maintains, before kmock stores the change."""
        data = copy.deepcopy(request.data)
        meta = data.setdefault("metadata", {})
        existing = self._stored(request) if request.name else None
        action = request.action
        if action == enums.action.UPDATE and existing is None:
            action = enums.action.CREATE  # server-side apply creates missing objects
        if action == enums.action.CREATE:
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            meta.setdefault("name", request.name)
            if request.namespace:
                meta["namespace"] = request.namespace
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        elif action == enums.action.UPDATE and existing is not None:
            merged = dicts.patch_dict(copy.deepcopy(existing), copy.deepcopy(request.data))
            if request.subresource != "status" and merged.get("spec") != existing.get("spec"):
                meta["generation"] = (existing["metadata"].get("generation") or 1) + 1
            for key in ("uid", "creationTimestamp"):
                meta.pop(key, None)
        else:
            return request
        meta["resourceVersion"] = str(next(self._versions))
        if request.resource.plural == "secrets" and "stringData" in data:
            # The apiserver folds the write-only stringData into data (base64) on every write.
            written = {
                key: base64.b64encode(str(value).encode()).decode()
                for key, value in (data.pop("stringData") or {}).items()
            }
            data["data"] = {**(data.get("data") or {}), **written}
        # kmock's Request is a frozen attrs class; the fallback reactions need this very object.
        object.__setattr__(request, "action", action)
        object.__setattr__(request, "data", data)
        return request


class EmulatedCluster:
    """The emulator served from a background thread, with extra apps (e.g. a gateway) beside it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.api: ApiEmulator | None = None
        self.url = ""
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> EmulatedCluster:
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("emulator did not start")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with ApiEmulator() as api, kmock.Server(api) as server:
            self.api = api
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def run(self, coroutine: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: emulator\n"
            f"clusters: [{{name: emulator, cluster: {{server: '{self.url}'}}}}]\n"
            "users: [{name: tester, user: {token: emulator-token}}]\n"
            "contexts: [{name: emulator, context: {cluster: emulator, user: tester, namespace: default}}]\n"
        )
        return path

    def objects(self, plural: str) -> dict[tuple[str | None, str], dict[str, Any]]:
        found = {}
        for (resource, namespace, name), obj in list(self.api.objects.items()):
            if resource.plural == plural and not obj.deleted:
                found[(namespace, name)] = obj.raw
        return found
