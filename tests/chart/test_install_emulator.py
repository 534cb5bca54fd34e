"""`helm template | kubectl apply -f -` onto the Kubernetes API emulator, then the gateway and the
operator run as the chart configures them (flags, env, keys from the chart's Secret) and reconcile
the GitOps example; re-applying it from Git finds nothing to change while the endpoint scales."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.request

import pytest
import yaml
from kopf.testing import KopfRunner

from tests.chart.conftest import NAMESPACE, VARIANTS, helm, template_args
from tests.chart.test_rbac import grants
from tests.operator.conftest import OPERATOR_ARGS, call, condition, wait_for
from tests.operator.emulator import EmulatedCluster
from tests.processes import free_port
from tests.tools import kubectl as run_kubectl

GATEWAY, OPERATOR = "handler-gateway", "handler-operator"
HD_URL = "/apis/handlerops.dev/v1alpha1/namespaces/ml/handlerdeployments/hello"
DEPLOYMENT_URL = "/apis/apps/v1/namespaces/ml/deployments/hello"


@pytest.fixture
def cluster(tmp_path):
    cluster = EmulatedCluster().start()
    cluster.config = str(cluster.kubeconfig(tmp_path / "kubeconfig"))
    yield cluster
    cluster.stop()


def kubectl(cluster, *args: str, stdin: str | None = None) -> str:
    return run_kubectl(cluster.config, *args, stdin=stdin)


def get(cluster, kind: str, name: str, namespace: str = NAMESPACE) -> dict:
    return json.loads(kubectl(cluster, "get", kind, name, "-n", namespace, "-o", "json"))


def secret_value(cluster, ref: dict) -> str:
    secret = get(cluster, "secret", ref["name"])
    return base64.b64decode(secret["data"][ref["key"]]).decode()


def start_gateway(cluster, container: dict, tmp_path) -> tuple[subprocess.Popen, str]:
    """The gateway with the rendered flags and env; the mounted key files come from the Secret."""
    volume = next(m for m in container["volumeMounts"] if m["name"] == "keys")["mountPath"]
    keys = tmp_path / "keys"
    keys.mkdir()
    secret = get(cluster, "secret", f"{GATEWAY}-keys")
    for key, value in secret["data"].items():
        (keys / key).write_bytes(base64.b64decode(value))
    port = free_port()
    args = [a.replace(volume, str(keys)) for a in container["args"] if not a.startswith("--port")]
    env = {**os.environ, **{e["name"]: e["value"] for e in container["env"] if "value" in e}}
    process = subprocess.Popen(
        [sys.executable, "-m", "handler_gateway", *args, f"--port={port}", "--host=127.0.0.1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    wait_for(ready, timeout=20, message="gateway ready")
    return process, url


def test_rendered_chart_applies_and_the_operator_reconciles_a_gitops_handler(
    cluster, tmp_path, monkeypatch
):
    rendered = helm(*template_args(VARIANTS["memory-single-gateway"], "--include-crds"))
    assert rendered.returncode == 0, rendered.stderr
    namespace = f"{{apiVersion: v1, kind: Namespace, metadata: {{name: {NAMESPACE}}}}}"
    kubectl(cluster, "apply", "-f", "-", stdin=namespace)
    applied = kubectl(
        cluster, "apply", "--validate=false", "-n", NAMESPACE, "-f", "-", stdin=rendered.stdout
    )
    for line in (
        "customresourcedefinition.apiextensions.k8s.io/handlerdeployments.handlerops.dev created",
        f"deployment.apps/{OPERATOR} created",
        f"deployment.apps/{GATEWAY} created",
        f"service/{GATEWAY} created",
        f"secret/{GATEWAY}-keys created",
        f"clusterrole.rbac.authorization.k8s.io/{OPERATOR} created",
        f"clusterrolebinding.rbac.authorization.k8s.io/{OPERATOR} created",
    ):
        assert line in applied, applied

    def container(name: str) -> dict:
        return get(cluster, "deployment", name)["spec"]["template"]["spec"]["containers"][0]

    gateway, gateway_url = start_gateway(cluster, container(GATEWAY), tmp_path)
    try:
        for env in container(OPERATOR)["env"]:
            value = env.get("value")
            if value is None:
                value = secret_value(cluster, env["valueFrom"]["secretKeyRef"])
            monkeypatch.setenv(env["name"], value)
        # In the cluster the operator reaches the gateway's Service; here, the local process.
        monkeypatch.setenv("HANDLER_OPERATOR_GATEWAY_URL", gateway_url)
        monkeypatch.setenv("HANDLER_OPERATOR_METRICS_PORT", "0")
        monkeypatch.setenv("KUBECONFIG", cluster.config)
        with KopfRunner(OPERATOR_ARGS, timeout=60) as runner:
            assert "unchanged" not in kubectl(cluster, "apply", "-k", "examples/gitops")
            wait_for(
                lambda: (
                    (condition(call("GET", cluster.url + HD_URL)[1], "Ready") or {}).get("status")
                    == "True"
                ),
                message="the GitOps HandlerDeployment is Ready",
            )
            assert call("GET", cluster.url + DEPLOYMENT_URL)[1]["spec"]["replicas"] == 0

            # A client with the chart's generated API key queues a job: the endpoint scales up.
            api_key = secret_value(cluster, {"name": f"{GATEWAY}-keys", "key": "api-key"})
            status, job = call(
                "POST", f"{gateway_url}/v2/ml--hello/run", {"input": {"name": "Git"}}, key=api_key
            )
            assert status == 200 and job["status"] == "IN_QUEUE"
            wait_for(
                lambda: call("GET", cluster.url + DEPLOYMENT_URL)[1]["spec"]["replicas"] == 1,
                message="scale-up from the queued job",
            )
            wait_for(
                lambda: call("GET", cluster.url + HD_URL)[1]["status"].get("desiredReplicas") == 1,
                message="desiredReplicas in status",
            )

            # Git is still the truth: re-applying it finds nothing to change (Argo CD: Synced).
            reapplied = kubectl(cluster, "apply", "-k", "examples/gitops")
            assert "handlerdeployment.handlerops.dev/hello unchanged" in reapplied, reapplied
            in_git = [
                d
                for d in yaml.safe_load_all(kubectl(cluster, "kustomize", "examples/gitops"))
                if d["kind"] == "HandlerDeployment"
            ][0]
            assert call("GET", cluster.url + HD_URL)[1]["spec"] == in_git["spec"]
        assert runner.exception is None or isinstance(runner.exception, SystemExit)
    finally:
        gateway.terminate()
        gateway.wait(10)

    # Every call the operator made is granted by the ClusterRole the chart installed.
    installed = grants(get(cluster, "clusterrole", OPERATOR, "")["rules"])
    missing = sorted(cluster.api.operator_calls - installed)
    assert not missing, f"operator calls the chart's ClusterRole does not grant: {missing}"
