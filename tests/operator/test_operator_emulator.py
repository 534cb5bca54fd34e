"""The operator against the Kubernetes API emulator: kopf runs our handlers, a real gateway
(memory backend) receives the endpoint registrations."""

from __future__ import annotations

import time

import pytest
from kopf.testing import KopfRunner

from tests.operator.conftest import (
    ADMIN_KEY,
    EXAMPLES,
    HD_PATH,
    OPERATOR_ARGS,
    call,
    condition,
    deployment,
    hd,
    load_cr,
    wait_condition,
    wait_for,
    worker_token_secret,
)


def test_reconcile_update_crash_loop_and_delete(cluster, operator):
    body = load_cr(EXAMPLES / "hello" / "handlerdeployment.yaml")
    status, created = call("POST", cluster.url + HD_PATH.format(ns="default"), body)
    assert status in (200, 201), created

    worker = wait_for(lambda: deployment(cluster, "default", "hello"), message="worker Deployment")
    owner = worker["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "HandlerDeployment" and owner["uid"] == created["metadata"]["uid"]
    env = {
        e["name"]: e.get("value")
        for e in worker["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["HANDLER_MODULE"] == "handler"
    assert env["RUNPOD_WEBHOOK_GET_JOB"] == f"{cluster.gateway_url}/v2/default--hello/job-take/$ID?"

    ready = wait_for(lambda: condition(hd(cluster, "default", "hello"), "Ready"), message="Ready")
    assert ready["status"] == "True"
    current = hd(cluster, "default", "hello")
    assert current["status"]["endpointId"] == "default--hello"
    assert current["status"]["observedGeneration"] == 1
    assert (
        call("GET", f"{cluster.gateway_url}/admin/v1/endpoints/default--hello", key=ADMIN_KEY)[0]
        == 200
    )

    # Update: a new module reaches the Deployment, and the new generation is observed.
    call(
        "PATCH",
        cluster.url + HD_PATH.format(ns="default") + "/hello",
        {"spec": {"handler": {"module": "handlers.v2"}}},
        "application/merge-patch+json",
    )
    wait_for(
        lambda: (
            (d := deployment(cluster, "default", "hello"))
            and any(
                e.get("value") == "handlers.v2"
                for e in d["spec"]["template"]["spec"]["containers"][0]["env"]
            )
        ),
        message="module update",
    )
    wait_for(
        lambda: hd(cluster, "default", "hello")["status"].get("observedGeneration") == 2,
        message="generation 2 observed",
    )

    # A crash-looping worker: the loader's termination message lands in HandlerHealthy.
    message = "Cannot import handler module 'handlers.v2': ModuleNotFoundError: No module named 'handlers'"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "hello-abc",
            "namespace": "default",
            "labels": {
                "app.kubernetes.io/managed-by": "handler-operator",
                "app.kubernetes.io/instance": "hello",
            },
        },
        "spec": {"containers": [{"name": "worker", "image": "x"}]},
        "status": {
            "phase": "Running",
            "containerStatuses": [
                {
                    "name": "worker",
                    "ready": False,
                    "restartCount": 3,
                    "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
                    "lastState": {
                        "terminated": {"exitCode": 3, "reason": "Error", "message": message}
                    },
                }
            ],
        },
    }
    assert call("POST", cluster.url + "/api/v1/namespaces/default/pods", pod)[0] in (200, 201)
    healthy = wait_condition(cluster, "default", "hello", "HandlerHealthy", status="False")
    assert healthy["reason"] == "HandlerCrashLoop" and healthy["message"] == message
    # ... and the gateway tells clients waiting on the endpoint's queued jobs why they wait,
    # until a worker runs.
    problem = wait_for(
        lambda: cluster.run(cluster.gateway.problem("default--hello")), message="gateway told"
    )
    assert problem.reason == "HandlerCrashLoop" and problem.message == message
    running = {
        "name": "worker",
        "ready": True,
        "restartCount": 3,
        "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
    }
    patched = call(
        "PATCH",
        cluster.url + "/api/v1/namespaces/default/pods/hello-abc",
        {"status": {"containerStatuses": [running]}},
        content_type="application/merge-patch+json",
    )
    assert patched[0] == 200, patched
    wait_condition(cluster, "default", "hello", "HandlerHealthy", status="True")
    wait_for(
        lambda: cluster.run(cluster.gateway.problem("default--hello")) is None,
        message="gateway told the workers run",
    )

    # Delete: the finalizer deregisters the endpoint, then the CR goes.
    call("DELETE", cluster.url + HD_PATH.format(ns="default") + "/hello")
    wait_for(
        lambda: (
            hd(cluster, "default", "hello") is None
            or hd(cluster, "default", "hello").get("code") == 404
        ),
        message="CR deleted",
    )
    assert (
        call("GET", f"{cluster.gateway_url}/admin/v1/endpoints/default--hello", key=ADMIN_KEY)[0]
        == 404
    )


def test_invalid_spec_sets_ready_false_and_others_keep_reconciling(cluster, operator):
    bad = load_cr(EXAMPLES / "sdxl" / "handlerdeployment.yaml")
    bad["metadata"] = {"name": "mismatch", "namespace": "ml"}
    bad["spec"]["resources"]["gpu"]["vendor"] = "amd"
    bad["spec"]["imagePullSecrets"] = []
    call("POST", cluster.url + HD_PATH.format(ns="ml"), bad)
    good = load_cr(EXAMPLES / "typed" / "handlerdeployment.yaml")
    call("POST", cluster.url + HD_PATH.format(ns="ml"), good)
    ready = wait_for(
        lambda: condition(hd(cluster, "ml", "mismatch"), "Ready"), message="Ready on bad CR"
    )
    assert ready["status"] == "False" and ready["reason"] == "GpuProductMismatch"
    wait_for(lambda: deployment(cluster, "ml", "typed"), message="the good CR still reconciles")
    assert deployment(cluster, "ml", "mismatch") is None


def owned_writes(cluster) -> int:
    return sum(
        1
        for request in list(cluster.api._requests)
        if request.method.upper() in ("POST", "PATCH", "PUT")
        and request.resource is not None
        and request.resource.plural in ("deployments", "secrets", "serviceaccounts")
    )


def test_operator_restart_makes_no_duplicates_and_no_spurious_writes(cluster):
    names = [f"r{n}" for n in range(3)]
    with KopfRunner(OPERATOR_ARGS, timeout=60):
        for name in names:
            body = load_cr(EXAMPLES / "hello" / "handlerdeployment.yaml")
            body["metadata"]["name"] = name
            call("POST", cluster.url + HD_PATH.format(ns="default"), body)
        for name in names:
            wait_for(
                lambda n=name: (hd(cluster, "default", n).get("status") or {}).get("ready"),
                message=f"{name} reconciled",
            )
    before = owned_writes(cluster)
    objects = {
        kind: len(cluster.objects(kind)) for kind in ("deployments", "secrets", "serviceaccounts")
    }
    with KopfRunner(OPERATOR_ARGS, timeout=60):
        time.sleep(3)  # resume handlers run for every CR
    assert owned_writes(cluster) == before, "no writes for unchanged objects after a restart"
    assert (
        {kind: len(cluster.objects(kind)) for kind in objects}
        == objects
        # a worker token per CR, and the namespace's one calls key (made once, kept)
        == {"deployments": 3, "secrets": 4, "serviceaccounts": 3}
    )


def test_fifty_handler_deployments_reconcile(cluster, operator):
    for n in range(50):
        body = load_cr(EXAMPLES / "hello" / "handlerdeployment.yaml")
        body["metadata"] = {"name": f"hd{n:02d}", "namespace": f"team{n % 5}"}
        assert call("POST", cluster.url + HD_PATH.format(ns=f"team{n % 5}"), body)[0] in (200, 201)
    wait_for(
        lambda: len(cluster.objects("deployments")) == 50, timeout=60, message="50 Deployments"
    )
    for n in range(50):
        ready = wait_for(
            lambda n=n: condition(hd(cluster, f"team{n % 5}", f"hd{n:02d}"), "Ready"),
            message=f"hd{n:02d} Ready",
        )
        assert ready["status"] == "True", ready
    queues = call("GET", f"{cluster.gateway_url}/admin/v1/queues", key=ADMIN_KEY)[1]["endpoints"]
    assert len(queues) == 50


def test_recreated_handler_deployment_gets_a_new_worker_token(cluster, operator):
    """Delete + re-create rotates the endpoint's worker token; a plain update keeps it."""
    cr = load_cr(EXAMPLES / "hello" / "handlerdeployment.yaml")

    def token():
        secret = worker_token_secret(cluster, "default", "hello")
        if not secret or not (owners := secret["metadata"].get("ownerReferences")):
            return None
        owner = hd(cluster, "default", "hello") or {}
        if owners[0]["uid"] != (owner.get("metadata") or {}).get("uid"):
            return None  # still the previous CR's Secret
        return secret["data"]

    call("POST", cluster.url + HD_PATH.format(ns="default"), cr)
    first = wait_for(token, message="worker token Secret")
    call(
        "PATCH",
        cluster.url + HD_PATH.format(ns="default") + "/hello",
        {"spec": {"jobs": {"maxRetries": 5}}},
        content_type="application/merge-patch+json",
    )
    wait_for(lambda: hd(cluster, "default", "hello")["status"].get("observedGeneration") == 2)
    assert token() == first

    call("DELETE", cluster.url + HD_PATH.format(ns="default") + "/hello")
    wait_for(lambda: (hd(cluster, "default", "hello") or {}).get("code") == 404, message="gone")
    call("POST", cluster.url + HD_PATH.format(ns="default"), cr)
    second = wait_for(token, message="new worker token Secret")
    assert second != first
    # The operator created Secrets and never changed one; it read only those labelled as
    # holding client keys (this CR names none in spec.access).
    secret_calls = {
        verb for group, plural, verb in cluster.api.operator_calls if plural == "secrets"
    }
    assert secret_calls == {"create", "list", "watch"}, secret_calls
    selectors = {selector for plural, _, selector in cluster.api.reads if plural == "secrets"}
    assert selectors == {"handlerops.dev/client-keys"}, selectors


def test_worker_objects_are_watched_with_a_server_side_selector(cluster, operator):
    """Pods and Deployments are listed and watched with our label selector (unrelated ones never
    reach the operator), and the worker Deployment carries no kopf bookkeeping annotation."""
    unrelated = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "someone-else", "namespace": "default", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "web", "image": "nginx"}]},
    }
    assert call("POST", cluster.url + "/api/v1/namespaces/default/pods", unrelated)[0] in (200, 201)
    body = load_cr(EXAMPLES / "hello" / "handlerdeployment.yaml")
    assert call("POST", cluster.url + HD_PATH.format(ns="default"), body)[0] in (200, 201)
    wait_for(lambda: condition(hd(cluster, "default", "hello"), "Ready"), message="Ready")
    reads = [r for r in cluster.api.reads if r[0] in ("pods", "deployments")]
    assert {(plural, verb) for plural, verb, _ in reads} == {
        ("pods", "list"),
        ("pods", "watch"),
        ("deployments", "list"),
        ("deployments", "watch"),
    }
    assert {selector for *_, selector in reads} == {"app.kubernetes.io/managed-by=handler-operator"}
    annotations = deployment(cluster, "default", "hello")["metadata"].get("annotations") or {}
    assert not [key for key in annotations if key.startswith("kopf.zalando.org")], annotations


def test_a_refusal_seen_before_the_first_reconcile_is_not_overwritten(cluster, operator):
    """The worker Deployment's ReplicaSet was refused (Pod Security) before the reconcile's own
    Ready landed: whichever writer comes second, Ready ends False FailedCreate."""
    refused = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "hello",
            "namespace": "default",
            "labels": {
                "app.kubernetes.io/managed-by": "handler-operator",
                "app.kubernetes.io/instance": "hello",
            },
        },
        "spec": {"replicas": 1, "template": {"spec": {"containers": []}}},
        "status": {
            "conditions": [
                {
                    "type": "ReplicaFailure",
                    "status": "True",
                    "reason": "FailedCreate",
                    "message": 'pods "hello-1" is forbidden: violates PodSecurity',
                }
            ]
        },
    }
    deployments = "/apis/apps/v1/namespaces/default/deployments"
    assert call("POST", cluster.url + deployments, refused)[0] in (200, 201)
    body = load_cr(EXAMPLES / "hello" / "handlerdeployment.yaml")
    assert call("POST", cluster.url + HD_PATH.format(ns="default"), body)[0] in (200, 201)
    ready = wait_condition(cluster, "default", "hello", "Ready", reason="FailedCreate")
    assert ready["status"] == "False" and "violates PodSecurity" in ready["message"]


def test_a_worker_token_secret_deleted_by_hand_is_created_again(cluster, operator):
    """The operator never reads its token Secrets: it learns of a missing one from the kubelet's
    CreateContainerConfigError on a worker pod, and creates it again (same name, same token)."""
    body = load_cr(EXAMPLES / "hello" / "handlerdeployment.yaml")
    assert call("POST", cluster.url + HD_PATH.format(ns="default"), body)[0] in (200, 201)
    secret = wait_for(lambda: worker_token_secret(cluster, "default", "hello"), message="Secret")
    name = secret["metadata"]["name"]
    secrets = "/api/v1/namespaces/default/secrets"
    assert call("DELETE", f"{cluster.url}{secrets}/{name}")[0] == 200
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "hello-abc12",
            "namespace": "default",
            "labels": {
                "app.kubernetes.io/managed-by": "handler-operator",
                "app.kubernetes.io/name": "handler-worker",
                "app.kubernetes.io/instance": "hello",
            },
        },
        "spec": {"containers": [{"name": "worker", "image": "x"}]},
        "status": {
            "phase": "Pending",
            "containerStatuses": [
                {
                    "name": "worker",
                    "state": {
                        "waiting": {
                            "reason": "CreateContainerConfigError",
                            "message": f'secret "{name}" not found',
                        }
                    },
                }
            ],
        },
    }
    assert call("POST", f"{cluster.url}/api/v1/namespaces/default/pods", pod)[0] in (200, 201)
    again = wait_for(
        lambda: worker_token_secret(cluster, "default", "hello"), message="the Secret again"
    )
    assert again["data"] == secret["data"]


@pytest.fixture
def quick_deregister_timeout(monkeypatch):
    monkeypatch.setenv("HANDLER_OPERATOR_DEREGISTER_TIMEOUT_SECONDS", "2")


def test_an_uninstall_that_removes_the_gateway_first_does_not_hang(
    cluster, quick_deregister_timeout, operator
):
    """`helm uninstall` may delete the gateway before the CRs go: the finalizer retries the
    unreachable gateway for the deregister timeout, then lets the CR go with a Warning event."""
    body = load_cr(EXAMPLES / "hello" / "handlerdeployment.yaml")
    assert call("POST", cluster.url + HD_PATH.format(ns="default"), body)[0] in (200, 201)
    wait_for(lambda: condition(hd(cluster, "default", "hello"), "Ready"), message="Ready")
    cluster.stop_gateway()
    call("DELETE", cluster.url + HD_PATH.format(ns="default") + "/hello")
    wait_for(
        lambda: (found := hd(cluster, "default", "hello")) is None or found.get("code") == 404,
        message="the CR removed",
    )
    events = [
        e for e in cluster.objects("events").values() if e.get("reason") == "GatewayUnreachable"
    ]
    assert len(events) == 1
    assert "removing the HandlerDeployment anyway" in events[0]["message"]
    assert events[0]["involvedObject"]["name"] == "hello"
