"""Operator test helpers: example CRs, the emulated cluster with a real gateway, the operator."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from aiohttp import web
from kopf.testing import KopfRunner

from handler_gateway.backends import open_backend
from handler_gateway.keys import Keys
from handler_gateway.routes import GATEWAY, create_app
from handler_operator import rbac
from handler_operator.crds import build_crd
from handler_operator.models import HandlerDeployment
from tests.conftest import EXAMPLES
from tests.operator.emulator import EmulatedCluster
from tests.processes import free_port

GOLDEN = Path(__file__).resolve().parent / "golden"
EXAMPLE_CRS = sorted(EXAMPLES.glob("*/handlerdeployment.yaml"))


def load_cr(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def parse_cr(body: dict, namespace: str = "default") -> HandlerDeployment:
    body = {**body, "metadata": {"namespace": namespace, **body["metadata"]}}
    return HandlerDeployment.model_validate(body)


ADMIN_KEY = "operator-test-admin-key"
HD_PATH = "/apis/handlerops.dev/v1alpha1/namespaces/{ns}/handlerdeployments"


def call(method: str, url: str, body=None, content_type="application/json", key=None):
    headers = {"Content-Type": content_type}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def wait_for(predicate, timeout=30.0, message="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {message}")


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    cluster = EmulatedCluster().start()
    port = free_port()
    keys = Keys.of(admin=[ADMIN_KEY])
    app = create_app(open_backend("memory://"), keys)
    cluster.gateway = app[GATEWAY]

    async def serve():
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner

    runner = cluster.run(serve())
    cluster.stop_gateway = lambda: cluster.run(runner.cleanup())
    cluster.gateway_url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig(tmp_path / "kubeconfig")))
    monkeypatch.setenv("HANDLER_OPERATOR_GATEWAY_URL", cluster.gateway_url)
    monkeypatch.setenv("HANDLER_OPERATOR_GATEWAY_ADMIN_KEY", ADMIN_KEY)
    monkeypatch.setenv("HANDLER_OPERATOR_METRICS_PORT", "0")
    status, _ = call(
        "POST", cluster.url + "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", build_crd()
    )
    assert status in (200, 201)
    yield cluster
    cluster.run(runner.cleanup())
    cluster.stop()


OPERATOR_ARGS = ["run", "--standalone", "--all-namespaces", "-m", "handler_operator.handlers"]


@pytest.fixture
def operator(cluster):
    with KopfRunner(OPERATOR_ARGS, timeout=60) as runner:
        yield runner
    assert runner.exception is None or isinstance(runner.exception, SystemExit), runner.exception
    assert_allowed_by_rbac(cluster.api.operator_calls)


def assert_allowed_by_rbac(calls: set[tuple[str, str, str]]) -> None:
    """Every call the operator made is granted by `handler_operator.rbac.RULES`."""
    assert ("handlerops.dev", "handlerdeployments", "watch") in calls, "no operator calls seen"
    granted = {(r.group, r.resource, verb) for r in rbac.RULES for verb in r.verbs}
    missing = sorted(calls - granted)
    assert not missing, f"operator calls not covered by handler_operator.rbac.RULES: {missing}"


def hd(cluster, ns: str, name: str):
    return call("GET", cluster.url + HD_PATH.format(ns=ns) + f"/{name}")[1]


def deployment(cluster, ns: str, name: str):
    status, body = call("GET", f"{cluster.url}/apis/apps/v1/namespaces/{ns}/deployments/{name}")
    return body if status == 200 else None


def condition(obj, type_):
    return next(
        (c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), None
    )


def wait_condition(cluster, ns: str, name: str, type_: str, **expected: str) -> dict:
    """The CR's condition `type_` once its fields are `expected` (e.g. status="False")."""

    def matching():
        found = condition(hd(cluster, ns, name), type_)
        return found if found and all(found.get(k) == v for k, v in expected.items()) else None

    return wait_for(matching, message=f"{type_} {expected} on {ns}/{name}")


def worker_token_secret(cluster, ns: str, name: str) -> dict | None:
    """The worker token Secret the endpoint's Deployment reads (its name is computed)."""
    found = deployment(cluster, ns, name)
    if not found:
        return None
    env = found["spec"]["template"]["spec"]["containers"][0]["env"]
    ref = next(e for e in env if e["name"] == "RUNPOD_AI_API_KEY")["valueFrom"]["secretKeyRef"]
    status, secret = call("GET", f"{cluster.url}/api/v1/namespaces/{ns}/secrets/{ref['name']}")
    return secret if status == 200 else None


def worker_pod(namespace: str, instance: str, name: str, env: list | None = None) -> dict:
    """A running worker pod of HandlerDeployment `instance`, as its Deployment would make it."""
    container = {"name": "worker", "image": "x", **({"env": env} if env else {})}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/managed-by": "handler-operator",
                "app.kubernetes.io/name": "handler-worker",
                "app.kubernetes.io/instance": instance,
            },
        },
        "spec": {"containers": [container]},
        "status": {"phase": "Running"},
    }
