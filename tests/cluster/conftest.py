"""Fixtures of the cluster tier: one real control plane and its simulated nodes per test run,
kubectl and helm against it, a fresh namespace per test, the gateway and the operator as
processes on this machine. Every test here is marked `cluster`; none skips when the harness
cannot be built: it fails."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster import harness
from tests.cluster.nodes import NodeAgent
from tests.conftest import EXAMPLES, FIXTURES, REPO_ROOT, subprocess_env
from tests.processes import ADMIN_KEY, GatewayProcess, free_port, stop_group
from tests.tools import tool

CLUSTER_DIR = Path(__file__).resolve().parent
IMAGE_PREFIX = "ghcr.io/handler-operator/"
# What each image holds, on this machine: the examples' images hold their example's code, the
# default worker image the test handlers (`handlers.*`), the operator image this project.
IMAGE_CODE = {
    **{
        f"{IMAGE_PREFIX}examples-{path.name}:": [str(path), str(REPO_ROOT)]
        for path in EXAMPLES.iterdir()
        if (path / "handler.py").exists()
    },
    f"{IMAGE_PREFIX}handler-worker:": [str(FIXTURES), str(REPO_ROOT)],
    f"{IMAGE_PREFIX}handler-operator:": [str(REPO_ROOT)],
}
# The chart's operator pod is only marked running: the tests run that operator on this machine,
# where the gateway is reachable. Its credentials hook runs as the pod would.
IMAGE_COMMANDS = {f"{IMAGE_PREFIX}handler-operator:": "handler_operator.credentials"}
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if CLUSTER_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory) -> Iterator[harness.ControlPlane]:
    plane = harness.start(tmp_path_factory.mktemp("control-plane"))
    yield plane
    plane.stop()


@pytest.fixture(scope="session")
def nodes(control_plane, tmp_path_factory) -> Iterator[NodeAgent]:
    agent = NodeAgent(
        control_plane.kubeconfig,
        tmp_path_factory.mktemp("nodes"),
        code=IMAGE_CODE,
        commands=IMAGE_COMMANDS,
    ).start()
    yield agent
    agent.stop()


@pytest.fixture(autouse=True)
def _harness_kubeconfig(request, monkeypatch):
    """Inside this tier the only cluster a client may find is the harness's."""
    if "control_plane" in request.fixturenames:
        plane = request.getfixturevalue("control_plane")
        monkeypatch.setenv("KUBECONFIG", plane.kubeconfig)
    for name in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        monkeypatch.delenv(name, raising=False)


class Kubectl:
    """kubectl (and helm) as one identity: admin by default, or a ServiceAccount's token."""

    def __init__(self, kubeconfig: str):
        self.kubeconfig = kubeconfig

    def _tool(
        self, name: str, args: tuple[str, ...], stdin: str | None, timeout: float
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [tool(name), "--kubeconfig", self.kubeconfig, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO_ROOT,
        )

    def run(
        self, *args: str, stdin: str | None = None, timeout: float = 90
    ) -> subprocess.CompletedProcess:
        return self._tool("kubectl", args, stdin, timeout)

    def __call__(self, *args: str, stdin: str | None = None, timeout: float = 90) -> str:
        result = self.run(*args, stdin=stdin, timeout=timeout)
        assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
        return result.stdout

    def get(self, kind: str, name: str = "", namespace: str | None = None) -> dict[str, Any]:
        args = ["get", kind, *([name] if name else []), "-o", "json"]
        if namespace:
            args += ["-n", namespace]
        return json.loads(self(*args))

    def maybe(self, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        result = self.run("get", kind, name, "-n", namespace, "-o", "json")
        return json.loads(result.stdout) if result.returncode == 0 else None

    def apply(self, manifest: str | dict | list, namespace: str | None = None) -> str:
        if not isinstance(manifest, str):
            docs = manifest if isinstance(manifest, list) else [manifest]
            manifest = yaml.safe_dump_all(docs)
        args = ["apply", "-f", "-"] + (["-n", namespace] if namespace else [])
        return self(*args, stdin=manifest)

    def helm(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return self._tool("helm", args, None, timeout)


@pytest.fixture(scope="session")
def crd_installed(control_plane) -> bool:
    """Whether the committed CRD is accepted (a test reports the apiserver's message)."""
    admin = Kubectl(control_plane.kubeconfig)
    result = admin.run("apply", "--server-side", "-f", str(REPO_ROOT / "crds"))
    if result.returncode != 0:
        return False
    admin("wait", "--for=condition=Established", "crd/handlerdeployments.handlerops.dev")
    return True


@pytest.fixture
def kubectl(control_plane) -> Kubectl:
    return Kubectl(control_plane.kubeconfig)


def make_namespace(kubectl: Kubectl, labels: dict[str, str] | None = None) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    kubectl.apply(
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "labels": labels or {}},
        }
    )
    return name


@pytest.fixture
def namespace(kubectl) -> Iterator[str]:
    name = make_namespace(kubectl)
    yield name
    kubectl.run("delete", "namespace", name, "--wait=false")


def wait_for(predicate: Callable[[], Any], timeout: float = 60, message: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except AssertionError:
            last = None
        if last:
            return last
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {message}")


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for item in ((obj or {}).get("status") or {}).get("conditions") or []:
        if item["type"] == type_:
            return item
    return {}


def service_account_kubeconfig(
    kubectl: Kubectl, plane: harness.ControlPlane, namespace: str, account: str, path: Path
) -> str:
    """A kubeconfig with a token for `account` from the TokenRequest API (what a pod mounts)."""
    token = kubectl("create", "token", account, "-n", namespace, "--duration=2h").strip()
    ca = base64.b64encode(Path(plane.ca_file).read_bytes()).decode()
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "harness",
                        "cluster": {"server": plane.server, "certificate-authority-data": ca},
                    }
                ],
                "users": [{"name": account, "user": {"token": token}}],
                "contexts": [
                    {
                        "name": account,
                        "context": {"cluster": "harness", "user": account, "namespace": namespace},
                    }
                ],
                "current-context": account,
            }
        )
    )
    return str(path)


class OperatorProcess:
    """`python -m handler_operator` as a process, as its pod would run it."""

    def __init__(self, kubeconfig: str, gateway_url: str, workdir: Path, **env: str):
        settings = {
            "HANDLER_OPERATOR_GATEWAY_ADMIN_KEY": ADMIN_KEY,
            "HANDLER_OPERATOR_METRICS_PORT": "0",
            "HANDLER_OPERATOR_LIVENESS_PORT": str(free_port()),
            **env,
        }
        self.env = subprocess_env(
            KUBECONFIG=kubeconfig, HANDLER_OPERATOR_GATEWAY_URL=gateway_url, **settings
        )
        self.log_path = workdir / f"operator-{time.monotonic_ns()}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> OperatorProcess:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "handler_operator"],
            env=self.env,
            cwd=REPO_ROOT,
            stdout=open(self.log_path, "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process)

    def log(self) -> str:
        return self.log_path.read_text()


@pytest.fixture
def gateway(tmp_path) -> Iterator[GatewayProcess]:
    process = GatewayProcess("memory://", tmp_path).start()
    yield process
    process.stop()
