"""Time and operator peak RSS to converge N HandlerDeployments against the Kubernetes emulator.

    python bench/operator_scale.py [--counts 100,1000]

The emulator (tests/operator/emulator.py) and a memory-backend gateway run in this process; the
operator runs as `python -m handler_operator` in a subprocess, so its peak RSS (VmHWM) is its
own. Converged = every CR has Ready=True and its worker Deployment exists.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
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

HD_PATH = "/apis/handlerops.dev/v1alpha1/namespaces/{ns}/handlerdeployments"


def post(url: str, body: dict) -> None:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(request, timeout=30).read()


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def converged(cluster: EmulatedCluster, count: int) -> int:
    ready = 0
    for (_, _), obj in cluster.objects("handlerdeployments").items():
        conditions = (obj.get("status") or {}).get("conditions") or []
        ready += any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
    return min(ready, len(cluster.objects("deployments")))


def run(count: int) -> None:
    cluster = EmulatedCluster().start()
    port = free_port()
    app = create_app(open_backend("memory://"), Keys(frozenset(), frozenset({"bench-admin"})))

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
            "HANDLER_OPERATOR_GATEWAY_ADMIN_KEY": "bench-admin",
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
            time.sleep(2)  # operator start-up, not counted
            start = time.perf_counter()
            for n in range(count):
                body = {
                    "apiVersion": "handlerops.dev/v1alpha1",
                    "kind": "HandlerDeployment",
                    "metadata": {"name": f"hd{n:04d}", "namespace": f"team{n % 10}"},
                    "spec": {"handler": {"module": "handler"}, "scaling": {"maxReplicas": 2}},
                }
                post(cluster.url + HD_PATH.format(ns=f"team{n % 10}"), body)
            while converged(cluster, count) < count:
                if time.perf_counter() - start > 1800:
                    raise TimeoutError(f"only {converged(cluster, count)} of {count} converged")
                time.sleep(0.5)
            elapsed = time.perf_counter() - start
            rss = peak_rss_mib(operator.pid)
        finally:
            os.killpg(operator.pid, signal.SIGTERM)
            operator.wait(30)
    cluster.stop()
    print(
        f"N={count}: converged in {elapsed:.1f} s ({count / elapsed:.1f} CRs/s), "
        f"operator peak RSS {rss:.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="100,1000")
    for count in parser.parse_args().counts.split(","):
        run(int(count))


if __name__ == "__main__":
    main()
