"""Benchmark harness: the Kubernetes emulator and a memory gateway in this process, the operator
(`python -m handler_operator`) in a subprocess, so its peak RSS is its own."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aiohttp import web  # noqa: E402

from handler_gateway.backends import open_backend  # noqa: E402
from handler_gateway.keys import Keys  # noqa: E402
from handler_gateway.routes import create_app  # noqa: E402
from handler_operator.crds import build_crd  # noqa: E402
from tests.operator.emulator import EmulatedCluster  # noqa: E402
from tests.processes import free_port  # noqa: E402

ADMIN_KEY = "bench-admin"
HD_PATH = "/apis/handlerops.dev/v1alpha1/namespaces/{ns}/handlerdeployments"


def post(url: str, body: dict, key: str | None = None) -> dict:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"null")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def handler_deployment(name: str, namespace: str, **scaling: object) -> dict:
    return {
        "apiVersion": "handlerops.dev/v1alpha1",
        "kind": "HandlerDeployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"handler": {"module": "handler"}, "scaling": {"maxReplicas": 2, **scaling}},
    }


@dataclass
class Bench:
    cluster: EmulatedCluster
    gateway_url: str
    operator: subprocess.Popen

    def create(self, body: dict) -> None:
        post(self.cluster.url + HD_PATH.format(ns=body["metadata"]["namespace"]), body)


@contextlib.contextmanager
def running_operator() -> Iterator[Bench]:
    cluster = EmulatedCluster().start()
    port = free_port()
    app = create_app(open_backend("memory://"), Keys.of(admin=[ADMIN_KEY]))

    async def serve():
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()

    cluster.run(serve())
    post(cluster.url + "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", build_crd())
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "KUBECONFIG": str(cluster.kubeconfig(Path(tmp) / "kubeconfig")),
            "HANDLER_OPERATOR_GATEWAY_URL": f"http://127.0.0.1:{port}",
            "HANDLER_OPERATOR_GATEWAY_ADMIN_KEY": ADMIN_KEY,
            "HANDLER_OPERATOR_METRICS_PORT": "0",
            "HANDLER_OPERATOR_LIVENESS_PORT": str(free_port()),
        }
        operator = subprocess.Popen(
            [sys.executable, "-m", "handler_operator"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            yield Bench(cluster, f"http://127.0.0.1:{port}", operator)
        finally:
            os.killpg(operator.pid, signal.SIGTERM)
            operator.wait(30)
    cluster.stop()
