"""Autoscaling end to end on the emulator: the operator's scaling loop, a real gateway, and
simulated worker pods (a ReplicaSet stand-in, workers speaking the gateway's worker API)."""

from __future__ import annotations

import base64
import threading
import time
import urllib.error
import urllib.request

from handler_operator import rbac
from handler_operator.builders import DELETION_COST
from handler_operator.scaling import policies
from tests.operator.conftest import (
    ADMIN_KEY,
    HD_PATH,
    call,
    condition,
    deployment,
    hd,
    wait_for,
    worker_pod,
    worker_token_secret,
)

NAME, NS = "auto", "default"
ENDPOINT = f"{NS}--{NAME}"
POD_PATH = f"/api/v1/namespaces/{NS}/pods"


def auto_hd(scaling: dict) -> dict:
    """The HandlerDeployment these tests scale, with 1 s heartbeats."""
    return {
        "apiVersion": "handlerops.dev/v1alpha1",
        "kind": "HandlerDeployment",
        "metadata": {"name": NAME, "namespace": NS},
        "spec": {
            "handler": {"module": "handler"},
            "scaling": scaling,
            "jobs": {"heartbeatIntervalSeconds": 1},
        },
    }


def replicas(cluster) -> int | None:
    found = deployment(cluster, NS, NAME)
    return None if found is None else found["spec"].get("replicas")


def worker_pods(cluster) -> set[str]:
    return {
        name
        for (namespace, name), pod in cluster.objects("pods").items()
        if namespace == NS and pod["metadata"]["labels"].get("app.kubernetes.io/instance") == NAME
    }


class SimulatedWorkers:
    """Plays the ReplicaSet (pods follow the Deployment's replicas) and each pod's worker.

    A worker takes jobs as `<pod name>` and finishes them at once, except a job whose input
    says `hold`: that one runs (with heartbeats) until `release` is set.
    """

    def __init__(self, cluster, token: str):
        self.cluster, self.token = cluster, token
        self.release = threading.Event()
        self.stop = threading.Event()
        self.holder: str | None = None
        self.created = 0
        self.threads: list[threading.Thread] = []

    def start(self) -> SimulatedWorkers:
        self._spawn(self._replicaset)
        return self

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self.threads.append(thread)

    def _replicaset(self) -> None:
        while not self.stop.is_set():
            wanted, pods = replicas(self.cluster) or 0, worker_pods(self.cluster)
            # Like a ReplicaSet scaling down: the pods with the lowest deletion cost go first.
            for name in sorted(pods, key=self.deletion_cost)[: max(0, len(pods) - wanted)]:
                call("DELETE", f"{self.cluster.url}{POD_PATH}/{name}")
            for _ in range(wanted - len(pods)):
                self.created += 1
                name = f"{NAME}-pod{self.created}"
                pod = worker_pod(NS, NAME, name)
                call("POST", self.cluster.url + POD_PATH, pod)
                self._spawn(self._worker, name)
            time.sleep(0.05)

    def deletion_cost(self, name: str) -> int:
        pod = self.cluster.objects("pods").get((NS, name)) or {}
        annotations = pod.get("metadata", {}).get("annotations") or {}
        return int(annotations.get(DELETION_COST, 0))

    def _get(self, path: str, timeout: float = 30):
        request = urllib.request.Request(
            self.cluster.gateway_url + path, headers={"Authorization": self.token}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()

    def _worker(self, name: str) -> None:
        import json

        while not self.stop.is_set() and name in worker_pods(self.cluster):
            try:
                status, raw = self._get(f"/v2/{ENDPOINT}/job-take/{name}", timeout=40)
            except (OSError, urllib.error.URLError):
                time.sleep(0.1)
                continue
            if status != 200 or not raw:
                continue
            job = json.loads(raw)
            if job["input"].get("hold"):
                self.holder = name
                while not self.release.wait(0.3):
                    self._get(f"/v2/{ENDPOINT}/ping/{name}?job_id={job['id']}")
            request = urllib.request.Request(
                f"{self.cluster.gateway_url}/v2/{ENDPOINT}/job-done/{name}/{job['id']}",
                data=json.dumps({"output": {"by": name}}).encode(),
                headers={"Authorization": self.token, "Content-Type": "application/json"},
                method="POST",
            )
            urllib.request.urlopen(request, timeout=10).read()


def test_queue_scales_up_fast_drains_idle_workers_only_and_returns_to_zero(cluster, operator):
    drains: list[tuple[float, str, bool, list[str]]] = []
    original = cluster.gateway.drain

    async def recording_drain(endpoint_id, worker, draining):
        held = await original(endpoint_id, worker, draining)
        drains.append((time.monotonic(), worker, draining, held))
        return held

    cluster.gateway.drain = recording_drain
    body = auto_hd(
        {
            "minReplicas": 0,
            "maxReplicas": 5,
            "targetQueuePerWorker": 4,
            "scaleToZeroAfterSeconds": 3,
            "scaleDownStabilizationSeconds": 0,
            "maxScaleDownRate": 0,
        }
    )
    assert call("POST", cluster.url + HD_PATH.format(ns=NS), body)[0] in (200, 201)
    wait_for(lambda: (condition(hd(cluster, NS, NAME), "Ready") or {}).get("status") == "True")
    assert replicas(cluster) == 0
    secret = worker_token_secret(cluster, NS, NAME)
    token = base64.b64decode(secret["data"]["token"]).decode()
    workers = SimulatedWorkers(cluster, token)
    try:
        # 20 jobs on an endpoint at zero: 5 workers (ceil(20 / 4)). The pods (and their
        # workers) come once the count is reached, so that no job is taken before the queue is
        # seen whole; how fast is bench/autoscale_reaction.py's question.
        jobs = [{"hold": True}] + [{"n": n} for n in range(19)]
        for payload in jobs:
            call(
                "POST",
                f"{cluster.gateway_url}/v2/{ENDPOINT}/run",
                {"input": payload},
                key=ADMIN_KEY,
            )
        wait_for(lambda: replicas(cluster) == 5, timeout=30, message="scale-up to 5")
        workers.start()

        # 19 jobs finish at once, one is held: down to one worker, and it is the busy one.
        wait_for(lambda: workers.holder is not None, message="a worker holds a job")
        wait_for(
            lambda: replicas(cluster) == 1 and worker_pods(cluster) == {workers.holder},
            timeout=30,
            message="scale-down to the one busy worker",
        )
        released_at = time.monotonic()
        busy = workers.holder
        # Whatever else scales the ReplicaSet down (KEDA's HPA, kubectl scale) takes it last.
        wait_for(
            lambda: workers.deletion_cost(busy) == policies.BUSY_DELETION_COST,
            message="the busy worker's deletion cost",
        )
        assert all(worker != busy for _, worker, draining, _ in drains if draining)
        assert ("pods", NS, busy) not in cluster.api.deletions
        removed = {name for plural, _, name in cluster.api.deletions if plural == "pods"}
        # Exactly the 4 idle workers: replicas come down before a drained pod is deleted, and
        # the drained pods carry the lowest deletion cost, so no replacement is ever created.
        assert len(removed) == 4, removed
        assert workers.created == 5
        # Each removed pod was drained first (it may have finished a job after the drain).
        for name in removed:
            assert any(w == name and d for _, w, d, _ in drains), name
        wait_for(
            lambda: hd(cluster, NS, NAME)["status"].get("desiredReplicas") == 1,
            message="status.desiredReplicas follows (written right after the Deployment)",
        )

        # The last job finishes: idle for scaleToZeroAfterSeconds, then zero workers.
        workers.release.set()
        wait_for(lambda: replicas(cluster) == 0, timeout=30, message="scale to zero")
        # The replica count falls first; the drained pod goes right after.
        wait_for(lambda: not worker_pods(cluster), timeout=5, message="no worker pods left")
        assert all(t >= released_at for t, w, d, _ in drains if w == busy and d)
        wait_for(
            lambda: (
                (condition(hd(cluster, NS, NAME), "Scaling") or {}).get("reason") == "ScaledToZero"
            ),
            message="Scaling condition says ScaledToZero",
        )
        assert condition(hd(cluster, NS, NAME), "Scaling")["status"] == "True"
        events = [
            e
            for e in cluster.objects("events").values()
            if e.get("reason") in ("ScaledUp", "ScaledDown")
        ]
        assert {e["reason"] for e in events} == {"ScaledUp", "ScaledDown"}
    finally:
        workers.stop.set()
        workers.release.set()


def test_a_job_waiting_past_the_target_delay_brings_one_more_worker(cluster, operator):
    """RunPod's request-delay scaler: the queue's depth asks for no more workers (100 per
    worker), but a job has waited past targetQueueDelaySeconds while the one worker is busy."""
    body = auto_hd(
        {
            "minReplicas": 1,
            "maxReplicas": 3,
            "targetQueuePerWorker": 100,
            "targetQueueDelaySeconds": 1,
            "scaleDownStabilizationSeconds": 600,
        }
    )
    assert call("POST", cluster.url + HD_PATH.format(ns=NS), body)[0] in (200, 201)
    wait_for(lambda: replicas(cluster) == 1, message="minReplicas")
    secret = worker_token_secret(cluster, NS, NAME)
    workers = SimulatedWorkers(cluster, base64.b64decode(secret["data"]["token"]).decode())
    workers.start()
    try:
        run = f"{cluster.gateway_url}/v2/{ENDPOINT}/run"
        call("POST", run, {"input": {"hold": True}}, key=ADMIN_KEY)
        wait_for(lambda: workers.holder is not None, message="the one worker is busy")
        job = call("POST", run, {"input": {"n": 1}}, key=ADMIN_KEY)[1]["id"]
        wait_for(lambda: replicas(cluster) == 2, timeout=30, message="one more worker")
        events = [e for e in cluster.objects("events").values() if e.get("reason") == "ScaledUp"]
        assert any("over targetQueueDelaySeconds=1" in e["message"] for e in events), events
        done = lambda: call(  # noqa: E731
            "GET", f"{cluster.gateway_url}/v2/{ENDPOINT}/status/{job}", key=ADMIN_KEY
        )[1]
        assert wait_for(lambda: done()["status"] == "COMPLETED" and done(), timeout=30)
        assert done()["output"]["by"] != workers.holder  # the new worker ran it
        assert replicas(cluster) == 2  # one more, not one per pass
    finally:
        workers.stop.set()
        workers.release.set()


def keda_crd(kind: str, plural: str) -> dict:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.keda.sh"},
        "spec": {
            "group": "keda.sh",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
            "scope": "Namespaced",
            "versions": [
                {
                    "name": "v1alpha1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "x-kubernetes-preserve-unknown-fields": True,
                        }
                    },
                }
            ],
        },
    }


def test_engine_keda_renders_a_scaled_object_and_leaves_replicas_alone(cluster, operator):
    for kind, plural in (
        ("ScaledObject", "scaledobjects"),
        ("TriggerAuthentication", "triggerauthentications"),
    ):
        call(
            "POST",
            cluster.url + "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            keda_crd(kind, plural),
        )
    body = {
        "apiVersion": "handlerops.dev/v1alpha1",
        "kind": "HandlerDeployment",
        "metadata": {"name": "kd", "namespace": NS},
        "spec": {
            "handler": {"module": "handler"},
            "scaling": {"engine": "keda", "maxReplicas": 4, "targetQueuePerWorker": 2},
        },
    }
    call("POST", cluster.url + HD_PATH.format(ns=NS), body)
    scaled = wait_for(
        lambda: cluster.objects("scaledobjects").get((NS, "kd")), message="ScaledObject"
    )
    assert scaled["spec"]["maxReplicaCount"] == 4
    assert scaled["metadata"]["ownerReferences"][0]["kind"] == "HandlerDeployment"
    assert (NS, "kd-gateway") in cluster.objects("triggerauthentications")
    assert "replicas" not in deployment(cluster, NS, "kd")["spec"]
    # Jobs queue up: the builtin loop does not touch a KEDA-scaled Deployment.
    for n in range(5):
        call("POST", f"{cluster.gateway_url}/v2/{NS}--kd/run", {"input": {"n": n}}, key=ADMIN_KEY)
    time.sleep(1.5)
    assert "replicas" not in deployment(cluster, NS, "kd")["spec"]
    # Back to the builtin engine: the ScaledObject goes, the loop scales.
    call(
        "PATCH",
        cluster.url + HD_PATH.format(ns=NS) + "/kd",
        {"spec": {"scaling": {"engine": "builtin"}}},
        "application/merge-patch+json",
    )
    wait_for(
        lambda: (NS, "kd") not in cluster.objects("scaledobjects"), message="ScaledObject gone"
    )
    wait_for(
        lambda: deployment(cluster, NS, "kd")["spec"].get("replicas") == 3,
        message="builtin scale-up",
    )


# Verbs a real apiserver checks that no request names: a server-side apply that creates an
# object needs `create`, an owner reference with blockOwnerDeletion needs `update` on the
# owner's finalizers (OwnerReferencesPermissionEnforcement). The cluster tier enforces them.
IMPLIED = {
    ("apps", "deployments", "create"),
    ("", "serviceaccounts", "create"),
    ("policy", "poddisruptionbudgets", "create"),
    ("keda.sh", "scaledobjects", "create"),
    ("keda.sh", "triggerauthentications", "create"),
    ("handlerops.dev", "handlerdeployments/finalizers", "update"),
}


def patch_spec(cluster, spec: dict) -> None:
    status, body = call(
        "PATCH",
        cluster.url + HD_PATH.format(ns=NS) + f"/{NAME}",
        {"spec": spec},
        "application/merge-patch+json",
    )
    assert status == 200, body


def test_the_operator_uses_every_verb_it_is_granted_and_no_other(cluster, operator):
    """One life of an endpoint through every feature: the calls the operator made, plus the
    verbs the apiserver implies, are exactly `rbac.RULES` (each grant is needed, none missing)."""
    for kind, plural in (
        ("ScaledObject", "scaledobjects"),
        ("TriggerAuthentication", "triggerauthentications"),
    ):
        call("POST", f"{cluster.url}/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
             keda_crd(kind, plural))  # fmt: skip
    body = auto_hd(
        {
            "minReplicas": 1,
            "maxReplicas": 2,
            "scaleToZeroAfterSeconds": 1,
            "scaleDownStabilizationSeconds": 0,
        }
    )
    # Client keys in a labelled Secret it names (list and watch), an image pull Secret (get).
    secrets = f"{cluster.url}/api/v1/namespaces/{NS}/secrets"
    keys = {
        "metadata": {"name": "team-keys", "labels": {"handlerops.dev/client-keys": "endpoint"}},
        "data": {"ci": "dGVhbS1rZXktMDEyMzQ1Njc4OWFiY2RlZg=="},
    }
    pull = {"metadata": {"name": "registry"}, "type": "kubernetes.io/dockerconfigjson",
            "data": {".dockerconfigjson": "e30="}}  # fmt: skip
    for secret in (keys, pull):
        assert call("POST", secrets, secret)[0] in (200, 201)
    body["spec"]["access"] = {"secrets": [{"name": "team-keys"}]}
    body["spec"]["imagePullSecrets"] = [{"name": "registry"}]
    assert call("POST", cluster.url + HD_PATH.format(ns=NS), body)[0] in (200, 201)
    wait_for(lambda: (NS, NAME) in cluster.objects("poddisruptionbudgets"), message="the PDB")
    token = base64.b64decode(worker_token_secret(cluster, NS, NAME)["data"]["token"]).decode()
    workers = SimulatedWorkers(cluster, token).start()
    try:
        # A worker holds a job: it becomes Ready (pods/status) and costly to delete (pods).
        call("POST", f"{cluster.gateway_url}/v2/{ENDPOINT}/run", {"input": {"hold": True}},
             key=ADMIN_KEY)  # fmt: skip
        wait_for(lambda: workers.holder is not None, message="a worker holds a job")
        wait_for(
            lambda: workers.deletion_cost(workers.holder) == policies.BUSY_DELETION_COST,
            message="the busy worker's deletion cost",
        )
        workers.release.set()
        # Down to zero: the PDB goes, the idle worker is drained and its pod deleted.
        patch_spec(cluster, {"scaling": {"minReplicas": 0}})
        wait_for(lambda: (NS, NAME) not in cluster.objects("poddisruptionbudgets"),
                 message="the PDB removed")  # fmt: skip
        wait_for(lambda: replicas(cluster) == 0 and not worker_pods(cluster), timeout=30,
                 message="scaled to zero")  # fmt: skip
    finally:
        workers.stop.set()
    # KEDA and back: its objects are applied, then removed.
    patch_spec(cluster, {"scaling": {"engine": "keda"}})
    wait_for(lambda: (NS, NAME) in cluster.objects("scaledobjects"), message="ScaledObject")
    patch_spec(cluster, {"scaling": {"engine": "builtin"}})
    wait_for(lambda: (NS, NAME) not in cluster.objects("scaledobjects"), message="SO removed")
    # A crash-looping worker: HandlerHealthy and a Warning event.
    crashed = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{NAME}-crash", "namespace": NS, "labels": {
            "app.kubernetes.io/managed-by": "handler-operator",
            "app.kubernetes.io/name": "handler-worker", "app.kubernetes.io/instance": NAME}},
        "spec": {"containers": [{"name": "worker", "image": "x"}]},
        "status": {"phase": "Running", "containerStatuses": [{"name": "worker", "state": {
            "waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}},
            "lastState": {"terminated": {"exitCode": 3, "message": "bad module"}}}]},
    }  # fmt: skip
    assert call("POST", cluster.url + POD_PATH, crashed)[0] in (200, 201)
    wait_for(lambda: (condition(hd(cluster, NS, NAME), "HandlerHealthy") or {}).get("status")
             == "False", message="HandlerHealthy False")  # fmt: skip
    # Deleted: the finalizer deregisters the endpoint and lets go.
    call("DELETE", cluster.url + HD_PATH.format(ns=NS) + f"/{NAME}")
    wait_for(lambda: (hd(cluster, NS, NAME) or {}).get("code") == 404, message="gone")
    granted = {(rule.group, rule.resource, verb) for rule in rbac.RULES for verb in rule.verbs}
    used = set(cluster.api.operator_calls)
    assert used <= granted, sorted(used - granted)
    assert used | IMPLIED == granted, f"granted, never used: {sorted(granted - used - IMPLIED)}"
