"""`helm install` of the chart on the real control plane, then the operator as the chart's
ServiceAccount (a TokenRequest token, the chart's RBAC enforced) reconciling HandlerDeployments
in namespaces that enforce Pod Security `restricted`: Deployments, ReplicaSets and scheduled
pods on simulated GPU nodes, real worker processes taking jobs from the runpod client."""

from __future__ import annotations

import base64
import json
import signal
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import runpod
import yaml

from tests.cluster.conftest import (
    RESTRICTED,
    Kubectl,
    OperatorProcess,
    condition,
    make_namespace,
    service_account_kubeconfig,
    wait_for,
)
from tests.cluster.nodes import UNPULLABLE
from tests.conftest import REPO_ROOT
from tests.processes import GatewayProcess, http_json

RELEASE, SYSTEM = "handler-operator", "handler-system"
OPERATOR_SA = "handler-operator"
WORKER_IMAGE = "ghcr.io/handler-operator/handler-worker:0.1.0"


class ChartGateway(GatewayProcess):
    """The gateway as the chart runs it: its rendered args and env, the keys from the chart's
    Secret (mounted files in the pod, files here); on this machine, on a free port."""

    def __init__(self, kubectl: Kubectl, workdir: Path):
        super().__init__("memory://", workdir)
        deployment = kubectl.get("deployment", "handler-gateway", SYSTEM)
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        mount = next(m for m in container["volumeMounts"] if m["name"] == "keys")["mountPath"]
        keys = workdir / "keys"
        keys.mkdir(exist_ok=True)
        secret = kubectl.get("secret", "handler-gateway-keys", SYSTEM)
        self.keys = {k: base64.b64decode(v).decode().strip() for k, v in secret["data"].items()}
        for name, value in self.keys.items():
            (keys / name).write_text(value + "\n")
        self.args = [
            arg.replace(mount, str(keys))
            for arg in container["args"]
            if not arg.startswith("--port")
        ]
        self.env = {e["name"]: e["value"] for e in container["env"] if "value" in e}

    def command(self) -> list[str]:
        return [*self.args, f"--port={self.port}", "--host=127.0.0.1"]


class Installation:
    """The installed chart, the gateway on this machine, and the operator as the chart's SA."""

    def __init__(self, plane, kubectl: Kubectl, gateway: ChartGateway, workdir: Path):
        self.plane = plane
        self.kubectl = kubectl
        self.gateway = gateway
        self.workdir = workdir
        self.operator: OperatorProcess | None = None

    @property
    def api_key(self) -> str:
        return self.gateway.keys["api-key"]

    @property
    def admin_key(self) -> str:
        return self.gateway.keys["admin-key"]

    def operator_env(self) -> dict[str, str]:
        """The env of the chart's operator container, Secret references resolved."""
        deployment = self.kubectl.get("deployment", RELEASE, SYSTEM)
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        env = {}
        for item in container["env"]:
            if "valueFrom" in item:
                ref = item["valueFrom"]["secretKeyRef"]
                secret = self.kubectl.get("secret", ref["name"], SYSTEM)
                env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
            else:
                env[item["name"]] = item.get("value", "")
        return env

    def start_operator(self) -> OperatorProcess:
        kubeconfig = service_account_kubeconfig(
            self.kubectl, self.plane, SYSTEM, OPERATOR_SA, self.workdir / "operator.kubeconfig"
        )
        env = self.operator_env()
        # In the cluster the operator and the workers reach the gateway's Service; here they
        # reach the gateway process on this machine; the admin key is the chart's.
        for name in (
            "HANDLER_OPERATOR_GATEWAY_URL",
            "HANDLER_OPERATOR_METRICS_PORT",
            "HANDLER_OPERATOR_LIVENESS_PORT",
        ):
            env.pop(name, None)
        self.operator = OperatorProcess(kubeconfig, self.gateway.url, self.workdir, **env).start()
        return self.operator

    def stop_operator(self, sig: int = signal.SIGTERM) -> None:
        if self.operator is not None and self.operator.process is not None:
            if sig == signal.SIGKILL:
                self.operator.process.kill()
                self.operator.process.wait(10)
            self.operator.stop()
            self.operator = None


@pytest.fixture(scope="module")
def installation(control_plane, nodes, crd_installed, tmp_path_factory) -> Iterator[Installation]:
    assert crd_installed
    kubectl = Kubectl(control_plane.kubeconfig)
    make_system = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": SYSTEM, "labels": RESTRICTED},
    }
    kubectl.apply(make_system)
    installed = kubectl.helm(
        "install",
        RELEASE,
        str(REPO_ROOT / "charts" / "handler-operator"),
        "--namespace",
        SYSTEM,
        "--set",
        "redis.enabled=false",
        "--set",
        "gateway.replicas=1",
        "--wait",
        "--timeout",
        "120s",
    )
    assert installed.returncode == 0, installed.stderr
    workdir = tmp_path_factory.mktemp("installation")
    gateway = ChartGateway(kubectl, workdir).start()
    install = Installation(control_plane, kubectl, gateway, workdir)
    install.start_operator()
    yield install
    # Remove every endpoint while the operator and the gateway still run (purge, not drain:
    # some tests leave jobs queued), so no worker process outlives its gateway.
    # Best effort: what is left when the agent stops is killed with it.
    kubectl.run("annotate", "hd", "--all", "-A", "handlerops.dev/on-delete=purge", "--overwrite")
    kubectl.run("delete", "hd", "--all", "-A", "--wait=false")
    try:
        wait_for(lambda: not nodes.processes(), timeout=120, message="no worker process left")
    except TimeoutError:
        pass
    install.stop_operator()
    gateway.stop()


@pytest.fixture
def ns(installation) -> Iterator[str]:
    name = make_namespace(installation.kubectl, RESTRICTED)
    yield name
    installation.kubectl.run("delete", "namespace", name, "--wait=false")


def handler_deployment(name: str, module: str = "handlers.echo_async", **spec: Any) -> dict:
    body = {
        "apiVersion": "handlerops.dev/v1alpha1",
        "kind": "HandlerDeployment",
        "metadata": {"name": name},
        "spec": {"handler": {"module": module}, "image": WORKER_IMAGE, **spec},
    }
    return body


def token_secret_name(kubectl: Kubectl, ns: str, name: str) -> str:
    """The worker token Secret the endpoint's Deployment reads (its name is computed)."""
    container = kubectl.get("deployment", name, ns)["spec"]["template"]["spec"]["containers"][0]
    env = next(e for e in container["env"] if e["name"] == "RUNPOD_AI_API_KEY")
    return env["valueFrom"]["secretKeyRef"]["name"]


def hd(kubectl: Kubectl, ns: str, name: str) -> dict:
    return kubectl.get("hd", name, ns)


def pods(kubectl: Kubectl, ns: str, name: str) -> list[dict]:
    selector = f"app.kubernetes.io/name=handler-worker,app.kubernetes.io/instance={name}"
    return json.loads(kubectl("get", "pods", "-n", ns, "-l", selector, "-o", "json"))["items"]


def apply_gpu_endpoint(kubectl: Kubectl, ns: str, name: str, gpu: dict, **scaling: Any) -> None:
    body = handler_deployment(name, resources={"gpu": gpu}, scaling=scaling)
    kubectl.apply(body, ns)


def ready_pods(kubectl: Kubectl, ns: str, name: str) -> list[dict]:
    return [
        p
        for p in pods(kubectl, ns, name)
        if condition(p, "Ready").get("status") == "True"
        and not p["metadata"].get("deletionTimestamp")
    ]


def wait_condition(
    kubectl: Kubectl, ns: str, name: str, type_: str, timeout: float = 60, **expected: str
) -> dict:
    """The HandlerDeployment's condition `type_` once it has the `expected` fields."""

    def matches() -> dict | None:
        found = condition(hd(kubectl, ns, name), type_)
        return found if all(found.get(k) == v for k, v in expected.items()) else None

    return wait_for(matches, timeout=timeout, message=f"{type_} with {expected} on hd/{name}")


def test_the_chart_installs_in_a_restricted_namespace(installation):
    kubectl = installation.kubectl
    for name in ("handler-operator", "handler-gateway"):
        deployment = kubectl.get("deployment", name, SYSTEM)
        assert deployment["status"].get("readyReplicas") == 1, deployment["status"]
    # No pod of the chart was refused by the PodSecurity admission plugin.
    events = kubectl.get("events", namespace=SYSTEM)["items"]
    refused = [e["message"] for e in events if e["reason"] == "FailedCreate"]
    assert not refused, refused


def test_a_handler_deployment_reconciles_to_running_ready_workers(installation, ns):
    kubectl = installation.kubectl
    body = handler_deployment("echo", scaling={"minReplicas": 1, "maxReplicas": 2})
    kubectl.apply(body, ns)
    kubectl("wait", "--for=condition=Ready", "hd/echo", "-n", ns, "--timeout=60s")
    wait_for(lambda: kubectl.maybe("deployment", "echo", ns), message="Deployment")
    deployment = json.loads(
        kubectl("get", "deployment", "echo", "-n", ns, "-o", "json", "--show-managed-fields")
    )
    owner = deployment["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["blockOwnerDeletion"]) == (
        "HandlerDeployment",
        "echo",
        True,
    )
    managers = {
        m["manager"] for m in deployment["metadata"]["managedFields"] if m["operation"] == "Apply"
    }
    assert managers == {"handler-operator"}
    wait_for(lambda: len(ready_pods(kubectl, ns, "echo")) == 1, message="a Ready worker pod")
    replica_sets = kubectl.get("replicasets", namespace=ns)["items"]
    assert [rs["spec"]["replicas"] for rs in replica_sets] == [1]
    pod = pods(kubectl, ns, "echo")[0]
    assert pod["spec"]["nodeName"] == "cpu-1"  # no GPU asked: never on a tainted GPU node
    assert condition(pod, "handlerops.dev/heartbeat").get("status") == "True"
    row = wait_for(
        lambda: (
            (line := kubectl("get", "hd", "echo", "-n", ns).splitlines()[1].split())
            and line[3] == "1/1"
            and line
        ),
        message="READY 1/1 in kubectl get hd",
    )
    assert row[:2] == ["echo", "handlers.echo_async"]
    status = hd(kubectl, ns, "echo")["status"]
    assert status["observedGeneration"] == hd(kubectl, ns, "echo")["metadata"]["generation"]
    assert condition(hd(kubectl, ns, "echo"), "HandlerHealthy")["status"] == "True"


def test_workers_the_namespace_refuses_make_the_handler_deployment_not_ready(installation, ns):
    kubectl = installation.kubectl
    # A handler that asks for root in a namespace that enforces `restricted`.
    body = handler_deployment(
        "rooted",
        scaling={"minReplicas": 1, "maxReplicas": 1},
        podSecurityContext={"runAsNonRoot": False, "runAsUser": 0},
    )
    kubectl.apply(body, ns)
    refused = wait_condition(kubectl, ns, "rooted", "Ready", timeout=60, reason="FailedCreate")
    assert refused["status"] == "False"
    assert 'violates PodSecurity "restricted:latest"' in refused["message"], refused
    assert pods(kubectl, ns, "rooted") == []
    # The default security context passes: the same handler without it becomes Ready.
    body["spec"].pop("podSecurityContext")
    kubectl.apply(body, ns)
    kubectl("wait", "--for=condition=Ready", "hd/rooted", "-n", ns, "--timeout=90s")
    wait_for(lambda: ready_pods(kubectl, ns, "rooted"), timeout=90, message="a Ready worker")


def test_the_longest_names_reconcile(installation):
    """63 characters of namespace and of name: every label the operator writes still fits."""
    kubectl = installation.kubectl
    ns, name = f"t-{uuid.uuid4().hex[:8]}".ljust(63, "x"), "h" * 63
    kubectl.apply(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": RESTRICTED}}
    )
    try:
        kubectl.apply(handler_deployment(name, scaling={"minReplicas": 1, "maxReplicas": 1}), ns)
        kubectl("wait", "--for=condition=Ready", f"hd/{name}", "-n", ns, "--timeout=60s")
        wait_for(lambda: ready_pods(kubectl, ns, name), timeout=90, message="a Ready worker")
    finally:
        kubectl.run("delete", "namespace", ns, "--wait=false")


def test_gpu_workers_land_on_nodes_with_the_requested_product(installation, ns):
    kubectl = installation.kubectl
    body = handler_deployment(
        "h100",
        resources={"gpu": {"count": 1, "product": "NVIDIA-H100-80GB-HBM3"}},
        scaling={"minReplicas": 2, "maxReplicas": 2},
    )
    kubectl.apply(body, ns)
    scheduled = wait_for(
        lambda: (
            [p for p in pods(kubectl, ns, "h100") if p["spec"].get("nodeName")]
            if len([p for p in pods(kubectl, ns, "h100") if p["spec"].get("nodeName")]) == 2
            else None
        ),
        message="two scheduled GPU pods",
    )
    assert {p["spec"]["nodeName"] for p in scheduled} == {"gpu-h100-1"}
    limits = scheduled[0]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"


def test_a_list_of_products_falls_back_to_the_next_one(installation, ns):
    """Three 1-GPU workers, H100 preferred, A100 accepted: one node has 2 GPUs, so both GPU
    nodes are used, and never the CPU node."""
    kubectl = installation.kubectl
    products = ["NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-80GB"]
    body = handler_deployment(
        "fallback",
        resources={"gpu": {"count": 1, "products": products}},
        scaling={"minReplicas": 3, "maxReplicas": 3},
    )
    kubectl.apply(body, ns)

    def scheduled():
        placed = [p for p in pods(kubectl, ns, "fallback") if p["spec"].get("nodeName")]
        return placed if len(placed) == 3 else None

    nodes = [p["spec"]["nodeName"] for p in wait_for(scheduled, message="three scheduled pods")]
    assert set(nodes) == {"gpu-h100-1", "gpu-a100-1"}, nodes


def test_the_keda_engine_without_keda_says_so_without_a_retry_storm(installation, ns):
    kubectl = installation.kubectl
    kubectl.apply(handler_deployment("kedaless", scaling={"engine": "keda"}), ns)
    ready = wait_condition(kubectl, ns, "kedaless", "Ready", reason="KedaNotInstalled")
    assert ready["status"] == "False" and "KEDA is not installed" in ready["message"]
    assert not pods(kubectl, ns, "kedaless")
    time.sleep(5)  # a retry storm would post more events meanwhile
    events = [
        e
        for e in kubectl.get("events", namespace=ns)["items"]
        if e.get("reason") == "KedaNotInstalled"
    ]
    assert len(events) == 1 and (events[0].get("count") or 1) == 1, events


def test_endpoints_that_keep_workers_get_a_disruption_budget(installation, ns):
    kubectl = installation.kubectl
    kubectl.apply(handler_deployment("kept", scaling={"minReplicas": 1, "maxReplicas": 2}), ns)
    budget = wait_for(
        lambda: kubectl.maybe("poddisruptionbudget", "kept", ns), message="PodDisruptionBudget"
    )
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["metadata"]["ownerReferences"][0]["kind"] == "HandlerDeployment"
    kubectl(
        "patch",
        "hd",
        "kept",
        "-n",
        ns,
        "--type=merge",
        "-p",
        '{"spec":{"scaling":{"minReplicas":0}}}',
    )
    wait_for(
        lambda: kubectl.maybe("poddisruptionbudget", "kept", ns) is None,
        message="the budget removed at minReplicas 0",
    )


def test_a_product_no_node_has_is_said_at_once_and_nothing_piles_up(installation, ns):
    kubectl = installation.kubectl
    gpu = {"count": 1, "product": "NVIDIA-B200"}
    # A pending timeout of an hour: only the scheduler's words can make it say so at once.
    apply_gpu_endpoint(kubectl, ns, "b200", gpu, minReplicas=1, pendingTimeoutSeconds=3600)
    scaling = wait_condition(kubectl, ns, "b200", "Scaling", reason="Unschedulable")
    assert scaling["status"] == "False"
    assert "didn't match Pod's node affinity/selector" in scaling["message"]
    assert len(pods(kubectl, ns, "b200")) == 1


def test_more_gpus_than_exist_stay_pending_and_nothing_piles_up(installation, ns):
    kubectl = installation.kubectl
    # No node has 4 A100s: every worker pod is unschedulable.
    gpu = {"count": 4, "product": "NVIDIA-A100-SXM4-80GB"}
    apply_gpu_endpoint(kubectl, ns, "big", gpu, maxReplicas=5, pendingTimeoutSeconds=10)
    kubectl("wait", "--for=condition=Ready", "hd/big", "-n", ns, "--timeout=60s")
    for _ in range(2):
        status, _ = http_json(
            "POST",
            f"{installation.gateway.url}/v2/{ns}--big/run",
            {"input": {}},
            key=installation.api_key,
        )
        assert status == 200
    wait_for(
        lambda: (
            len(pods(kubectl, ns, "big")) == 2
            and all(
                condition(p, "PodScheduled").get("reason") == "Unschedulable"
                for p in pods(kubectl, ns, "big")
            )
        ),
        message="two unschedulable pods",
    )
    message = condition(pods(kubectl, ns, "big")[0], "PodScheduled")["message"]
    assert "Insufficient nvidia.com/gpu" in message or "didn't match" in message, message
    waiting = wait_condition(kubectl, ns, "big", "Scaling", timeout=60, reason="WaitingForCapacity")
    assert waiting["status"] == "False"
    # The need is 2: pending pods count as capacity on the way, no more are added.
    time.sleep(3)
    assert kubectl.get("deployment", "big", ns)["spec"]["replicas"] == 2
    assert len(pods(kubectl, ns, "big")) == 2


def test_a_crash_looping_handler_shows_in_the_status(installation, ns):
    kubectl = installation.kubectl
    kubectl.apply(
        handler_deployment(
            "broken", module="handlers.does_not_exist", scaling={"minReplicas": 1, "maxReplicas": 1}
        ),
        ns,
    )
    unhealthy = wait_condition(kubectl, ns, "broken", "HandlerHealthy", timeout=90, status="False")
    assert unhealthy["reason"] == "HandlerCrashLoop"
    assert "Cannot import handler module 'handlers.does_not_exist'" in unhealthy["message"]
    pod = pods(kubectl, ns, "broken")[0]
    terminated = pod["status"]["containerStatuses"][0]["lastState"]["terminated"]
    assert terminated["exitCode"] == 3


def test_an_image_that_cannot_be_pulled_shows_in_the_status(installation, ns):
    kubectl = installation.kubectl
    body = handler_deployment("nopull", scaling={"minReplicas": 1, "maxReplicas": 1})
    body["spec"]["image"] = UNPULLABLE + "nothing:1"
    kubectl.apply(body, ns)
    unhealthy = wait_condition(kubectl, ns, "nopull", "HandlerHealthy", timeout=60, status="False")
    assert unhealthy["reason"] in ("ErrImagePull", "ImagePullBackOff"), unhealthy
    assert UNPULLABLE + "nothing:1" in unhealthy["message"]


def test_a_job_scales_real_workers_from_zero_and_back(installation, ns, monkeypatch):
    kubectl = installation.kubectl
    kubectl.apply(
        handler_deployment(
            "zero",
            scaling={"minReplicas": 0, "maxReplicas": 2, "scaleToZeroAfterSeconds": 3},
        ),
        ns,
    )
    kubectl("wait", "--for=condition=Ready", "hd/zero", "-n", ns, "--timeout=60s")
    assert kubectl.get("deployment", "zero", ns)["spec"]["replicas"] == 0
    monkeypatch.setattr(runpod, "endpoint_url_base", installation.gateway.url + "/v2")
    monkeypatch.setattr(runpod, "api_key", installation.api_key)
    endpoint = runpod.Endpoint(f"{ns}--zero")
    job = endpoint.run({"input": {"n": 7}})
    output = job.output(timeout=120)
    assert output["echo"] == {"n": 7}
    status_url = f"{installation.gateway.url}/v2/{ns}--zero/status/{job.job_id}"
    worker = http_json("GET", status_url, key=installation.api_key)[1]["workerId"]
    assert worker.startswith("zero-"), worker  # the pod's name, from the downward API
    # Idle past scaleToZeroAfterSeconds: drained, replicas 0, the pod and its process gone.
    wait_for(
        lambda: kubectl.get("deployment", "zero", ns)["spec"]["replicas"] == 0,
        timeout=90,
        message="scale to zero",
    )
    wait_for(lambda: not pods(kubectl, ns, "zero"), timeout=60, message="worker pod removed")
    assert condition(hd(kubectl, ns, "zero"), "Ready")["reason"] == "ScaledToZero"


def test_kubectl_scale_fixes_the_replicas(installation, ns):
    kubectl = installation.kubectl
    kubectl.apply(handler_deployment("fixed", scaling={"minReplicas": 0, "maxReplicas": 3}), ns)
    kubectl("wait", "--for=condition=Ready", "hd/fixed", "-n", ns, "--timeout=60s")
    kubectl("scale", "hd", "fixed", "-n", ns, "--replicas=2")
    assert hd(kubectl, ns, "fixed")["spec"]["scaling"]["replicas"] == 2
    wait_for(
        lambda: len(ready_pods(kubectl, ns, "fixed")) == 2, timeout=90, message="2 Ready workers"
    )
    assert kubectl.get("deployment", "fixed", ns)["spec"]["replicas"] == 2
    scale = json.loads(
        kubectl(
            "get",
            "--raw",
            f"/apis/handlerops.dev/v1alpha1/namespaces/{ns}/handlerdeployments/fixed/scale",
        )
    )
    assert scale["spec"]["replicas"] == 2


def test_delete_cascades_and_the_finalizer_completes(installation, ns):
    kubectl = installation.kubectl
    kubectl.apply(handler_deployment("gone", scaling={"minReplicas": 1, "maxReplicas": 1}), ns)
    kubectl("wait", "--for=condition=Ready", "hd/gone", "-n", ns, "--timeout=60s")
    wait_for(lambda: len(ready_pods(kubectl, ns, "gone")) == 1, timeout=60, message="a worker")
    assert f"{ns}--gone" in [
        e["id"]
        for e in http_json(
            "GET", f"{installation.gateway.url}/admin/v1/endpoints", key=installation.admin_key
        )[1]["endpoints"]
    ]
    secret = token_secret_name(kubectl, ns, "gone")
    kubectl("delete", "hd", "gone", "-n", ns, "--timeout=60s")
    wait_for(
        lambda: all(
            kubectl.maybe(kind, name, ns) is None
            for kind, name in (
                ("deployment", "gone"),
                ("secret", secret),
                ("serviceaccount", "gone-worker"),
            )
        ),
        timeout=60,
        message="the garbage collector removed the owned objects",
    )
    wait_for(lambda: not pods(kubectl, ns, "gone"), timeout=60, message="the worker pod removed")
    endpoints = http_json(
        "GET", f"{installation.gateway.url}/admin/v1/endpoints", key=installation.admin_key
    )[1]["endpoints"]
    assert f"{ns}--gone" not in [e["id"] for e in endpoints]


def test_an_operator_restart_mid_reconcile_converges_without_duplicates(installation, ns):
    kubectl = installation.kubectl
    installation.stop_operator()
    names = [f"r{i}" for i in range(6)]
    kubectl.apply(
        [handler_deployment(n, scaling={"minReplicas": 1, "maxReplicas": 1}) for n in names], ns
    )
    installation.start_operator()
    wait_for(
        lambda: kubectl.maybe("deployment", names[0], ns), timeout=60, message="the first reconcile"
    )
    installation.stop_operator(signal.SIGKILL)  # mid-reconcile: no cleanup at all
    installation.start_operator()
    for name in names:
        kubectl("wait", "--for=condition=Ready", f"hd/{name}", "-n", ns, "--timeout=90s")
    wait_for(
        lambda: all(len(ready_pods(kubectl, ns, n)) == 1 for n in names),
        timeout=120,
        message="one Ready worker per HandlerDeployment",
    )
    deployments = kubectl.get("deployments", namespace=ns)["items"]
    assert sorted(d["metadata"]["name"] for d in deployments) == names
    assert sorted(len(pods(kubectl, ns, n)) for n in names) == [1] * len(names)
    secrets = [s["metadata"]["name"] for s in kubectl.get("secrets", namespace=ns)["items"]]
    # a worker token per HandlerDeployment, and the namespace's one calls key
    expected = [token_secret_name(kubectl, ns, n) for n in names] + ["handler-calls"]
    assert sorted(secrets) == sorted(expected)


def test_a_spec_change_rolls_out_new_workers_and_stops_the_old_ones_gracefully(
    installation, ns, nodes
):
    kubectl = installation.kubectl
    kubectl.apply(handler_deployment("roll", scaling={"minReplicas": 1, "maxReplicas": 1}), ns)
    first = wait_for(lambda: ready_pods(kubectl, ns, "roll"), timeout=60, message="a worker")[0]
    kubectl(
        "patch",
        "hd",
        "roll",
        "-n",
        ns,
        "--type=merge",
        "-p",
        '{"spec": {"handler": {"module": "handlers.progress"}}}',
    )

    def module(pod: dict) -> str:
        env = pod["spec"]["containers"][0]["env"]
        return next(e["value"] for e in env if e["name"] == "HANDLER_MODULE")

    new = wait_for(
        lambda: [p for p in ready_pods(kubectl, ns, "roll") if module(p) == "handlers.progress"],
        timeout=90,
        message="a Ready worker with the new module",
    )[0]
    assert new["metadata"]["name"] != first["metadata"]["name"]
    wait_for(
        lambda: (
            [p["metadata"]["name"] for p in pods(kubectl, ns, "roll")] == [new["metadata"]["name"]]
        ),
        timeout=90,
        message="the old worker removed",
    )
    replica_sets = {
        rs["metadata"]["name"]: rs["spec"]["replicas"]
        for rs in kubectl.get("replicasets", namespace=ns)["items"]
    }
    assert sorted(replica_sets.values()) == [0, 1], replica_sets
    # The old worker's process is gone with its pod (SIGTERM first: see tests/README.md).
    old = [what for pod, _, what in nodes.events if pod == first["metadata"]["name"]]
    assert old and old[-1].startswith(("exited", "killed")), old
    assert first["metadata"]["name"] not in nodes.processes(ns)


def test_deleting_a_busy_worker_pod_lets_its_job_finish_once(installation, ns, nodes):
    """A pod deleted mid-job (scale-down, drain, eviction all end this way): SIGTERM, the job
    completes on that worker once, nothing is redelivered, and the process exits by itself
    (exit 0) instead of being killed at the end of the grace period."""
    kubectl = installation.kubectl
    kubectl.apply(handler_deployment("busy", scaling={"minReplicas": 1, "maxReplicas": 1}), ns)
    name = wait_for(lambda: ready_pods(kubectl, ns, "busy"), timeout=60, message="a worker")[0][
        "metadata"
    ]["name"]
    base, key = f"{installation.gateway.url}/v2/{ns}--busy", installation.api_key
    job = http_json("POST", f"{base}/run", {"input": {"sleep": 4, "n": 1}}, key=key)[1]["id"]

    def status() -> dict:
        return http_json("GET", f"{base}/status/{job}", key=key)[1]

    wait_for(lambda: status()["status"] == "IN_PROGRESS", timeout=60, message="the job running")
    kubectl("delete", "pod", name, "-n", ns, "--wait=false")
    done = wait_for(
        lambda: (view := status())["status"] not in ("IN_QUEUE", "IN_PROGRESS") and view,
        timeout=60,
        message="the job's end",
    )
    assert done["status"] == "COMPLETED" and done["workerId"] == name, done
    assert done["output"]["echo"] == {"sleep": 4, "n": 1}
    jobs = http_json("GET", f"{base}/health", key=key)[1]["jobs"]
    assert jobs.get("retried", 0) == 0 and jobs["completed"] == 1, jobs
    # The agent records how the process ended (a kubelet's container status) just after it ends.
    ended = wait_for(
        lambda: [e for p, _, e in nodes.events if p == name and e.startswith(("exited", "killed"))],
        timeout=60,
        message="the worker's exit",
    )
    assert ended[0] == "exited 0", ended


def test_the_gitops_example_reconciles_scales_and_stays_in_sync(installation, monkeypatch):
    kubectl = installation.kubectl
    kubectl("apply", "-k", "examples/gitops")
    kubectl("wait", "--for=condition=Ready", "hd/hello", "-n", "ml", "--timeout=60s")
    assert kubectl.get("deployment", "hello", "ml")["spec"]["replicas"] == 0
    # A client with the chart's generated API key: the endpoint scales up, the job completes.
    monkeypatch.setattr(runpod, "endpoint_url_base", installation.gateway.url + "/v2")
    monkeypatch.setattr(runpod, "api_key", installation.api_key)
    output = runpod.Endpoint("ml--hello").run_sync({"input": {"name": "Git"}}, timeout=120)
    assert output == {"greeting": "Hello, Git!"}
    assert kubectl.get("deployment", "hello", "ml")["spec"]["replicas"] >= 1
    # Git is still the truth while the endpoint scales: nothing to change (Argo CD: Synced).
    assert "handlerdeployment.handlerops.dev/hello unchanged" in kubectl(
        "apply", "-k", "examples/gitops"
    )
    rendered = [
        d
        for d in yaml.safe_load_all(kubectl("kustomize", "examples/gitops"))
        if d["kind"] == "HandlerDeployment"
    ][0]
    assert contains(kubectl.get("hd", "hello", "ml")["spec"], rendered["spec"])


def contains(stored: Any, wanted: Any) -> bool:
    """`stored` holds everything in `wanted` (the apiserver adds the schema's defaults)."""
    if isinstance(wanted, dict):
        return isinstance(stored, dict) and all(
            k in stored and contains(stored[k], v) for k, v in wanted.items()
        )
    return stored == wanted


def status_of(url: str, key: str) -> int:
    """The gateway's answer to `key` on `url` (a status code: refusals too)."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_keys_of_a_labelled_secret_reach_their_endpoint_and_rotate(installation, ns):
    """With the chart's RBAC and the apiserver's label-selector watch: the keys of the Secret a
    HandlerDeployment names call it; editing the Secret rotates them, the CR untouched."""
    kubectl = installation.kubectl
    first, second = "team-key-one-0123456789", "team-key-two-0123456789"

    def secret(value: str) -> dict:
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "team-keys", "labels": {"handlerops.dev/client-keys": "endpoint"}},
            "stringData": {"ci": value},
        }

    kubectl.apply(secret(first), ns)
    kubectl.apply(
        handler_deployment(
            "scoped",
            access={"secrets": [{"name": "team-keys"}]},
            scaling={"minReplicas": 0, "maxReplicas": 1},
        ),
        ns,
    )
    kubectl("wait", "--for=condition=Ready", "hd/scoped", "-n", ns, "--timeout=60s")
    # the named key, and the namespace's calls key the operator made
    assert hd(kubectl, ns, "scoped")["status"]["clientKeys"] == [
        f"{ns}/team-keys/ci",
        f"{ns}/handler-calls/key",
    ]
    health = f"{installation.gateway.url}/v2/{ns}--scoped/health"
    assert status_of(health, first) == 200
    kubectl.apply(secret(second), ns)
    wait_for(lambda: status_of(health, second) == 200, timeout=60, message="the new key")
    assert status_of(health, first) == 401
    assert status_of(health, installation.api_key) == 200  # the global key, on a plain endpoint
