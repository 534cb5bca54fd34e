"""spec.access through the operator and a real gateway: the keys of named and namespace
Secrets reach the endpoint, a changed Secret rotates them without touching the CR, a missing
one is a condition, a worker token rotation keeps the old token until no pod reads it."""

from __future__ import annotations

import base64

from handler_operator import handlers
from tests.conftest import EXAMPLES
from tests.operator.conftest import (
    ADMIN_KEY,
    HD_PATH,
    call,
    condition,
    hd,
    load_cr,
    wait_for,
    worker_token_secret,
)
from tests.operator.conftest import worker_pod as running_pod

NS = "default"
SECRETS = f"/api/v1/namespaces/{NS}/secrets"
ENDPOINT = "default--hello"


def encoded(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


def put_secret(cluster, name: str, data: dict[str, str], scope: str | None = "endpoint") -> None:
    labels = {"handlerops.dev/client-keys": scope} if scope else {}
    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "data": {key: encoded(value) for key, value in data.items()},
    }
    if call("GET", f"{cluster.url}{SECRETS}/{name}")[0] == 200:
        url, merge = f"{cluster.url}{SECRETS}/{name}", "application/merge-patch+json"
        assert call("PATCH", url, body, content_type=merge)[0] == 200
    else:
        assert call("POST", f"{cluster.url}{SECRETS}", body)[0] in (200, 201)


def create_hello(cluster, access: dict) -> None:
    body = load_cr(EXAMPLES / "hello" / "handlerdeployment.yaml")
    body["spec"]["access"] = access
    assert call("POST", cluster.url + HD_PATH.format(ns=NS), body)[0] in (200, 201)


def run_status(cluster, key: str) -> int:
    return call("POST", f"{cluster.gateway_url}/v2/{ENDPOINT}/run", {"input": {}}, key=key)[0]


def ping_status(cluster, token: str) -> int:
    url = f"{cluster.gateway_url}/v2/{ENDPOINT}/ping/w1"
    return call("GET", url, key=token)[0]


# The namespace's key for calls between its endpoints, which the operator makes (a namespace key).
CALLS_KEY_ID = f"{NS}/handler-calls/key"


def test_named_and_namespace_keys_reach_the_endpoint_and_rotate_without_touching_it(
    cluster, operator
):
    put_secret(cluster, "team-keys", {"ci": "team-key-one-0123456789"}, scope="endpoint")
    create_hello(cluster, {"secrets": [{"name": "team-keys"}]})
    wait_for(
        lambda: (
            (hd(cluster, NS, "hello").get("status") or {}).get("clientKeys")
            == ["default/team-keys/ci", CALLS_KEY_ID]
        ),
        message="the key registered",
    )
    assert run_status(cluster, "team-key-one-0123456789") == 200
    # The Secret's value changes: the new key works, the old one is gone; the CR is untouched.
    generation = hd(cluster, NS, "hello")["metadata"]["generation"]
    put_secret(cluster, "team-keys", {"ci": "team-key-two-0123456789"}, scope="endpoint")
    wait_for(lambda: run_status(cluster, "team-key-two-0123456789") == 200, message="new key")
    assert run_status(cluster, "team-key-one-0123456789") == 401
    assert hd(cluster, NS, "hello")["metadata"]["generation"] == generation
    # A namespace's key reaches it without being named.
    put_secret(cluster, "everyone", {"k": "namespace-key-0123456789"}, scope="namespace")
    wait_for(lambda: run_status(cluster, "namespace-key-0123456789") == 200, message="ns key")
    status = hd(cluster, NS, "hello")["status"]
    assert status["clientKeys"] == ["default/team-keys/ci", CALLS_KEY_ID, "default/everyone/k"]
    # The gateway holds digests only.
    code, summary = call(
        "GET", f"{cluster.gateway_url}/admin/v1/endpoints/{ENDPOINT}", key=ADMIN_KEY
    )
    assert code == 200 and summary["clientKeys"] == status["clientKeys"]
    assert summary["namespace"] == NS and not summary["runsCallerCode"]


def ready(cluster) -> dict:
    return condition(hd(cluster, NS, "hello") or {}, "Ready") or {}


def test_a_missing_access_secret_is_a_condition_until_it_appears(cluster, operator, monkeypatch):
    monkeypatch.setattr(handlers, "ACCESS_RECHECK_SECONDS", 1)  # the operator runs in-process
    create_hello(cluster, {"secrets": [{"name": "later"}]})
    wait_for(lambda: ready(cluster).get("reason") == "AccessSecretMissing", message="refusal")
    assert "'later'" in ready(cluster)["message"]
    put_secret(cluster, "later", {"k": "later-key-0123456789"}, scope=None)  # not labelled
    wait_for(lambda: "not labelled" in ready(cluster).get("message", ""), message="again")
    put_secret(cluster, "later", {"k": "later-key-0123456789"})  # labelled: looked for again
    wait_for(
        lambda: ready(cluster).get("status") == "True",
        timeout=60,
        message="Ready once the Secret exists",
    )
    assert run_status(cluster, "later-key-0123456789") == 200


def worker_pod(name: str, secret: str) -> dict:
    """A worker pod of hello reading its token from Secret `secret`."""
    ref = {"secretKeyRef": {"name": secret, "key": "token"}}
    return running_pod(NS, "hello", name, [{"name": "RUNPOD_AI_API_KEY", "valueFrom": ref}])


def token_of(secret: dict) -> str:
    return base64.b64decode(secret["data"]["token"]).decode()


def test_a_worker_token_rotation_keeps_the_old_token_until_no_pod_reads_it(cluster, operator):
    create_hello(cluster, {})
    old_secret = wait_for(lambda: worker_token_secret(cluster, NS, "hello"), message="Secret")
    old = token_of(old_secret)
    pods = f"/api/v1/namespaces/{NS}/pods"
    pod = worker_pod("hello-old", old_secret["metadata"]["name"])
    assert call("POST", f"{cluster.url}{pods}", pod)[0] in (200, 201)  # a worker still on it
    assert ping_status(cluster, old) == 200

    patch = {"spec": {"access": {"workerTokenRotation": "2026-12"}}}
    path = cluster.url + HD_PATH.format(ns=NS) + "/hello"
    call("PATCH", path, patch, content_type="application/merge-patch+json")
    wait_for(
        lambda: (
            (hd(cluster, NS, "hello").get("status") or {}).get("workerTokenRotation") == "2026-12"
        ),
        message="the rotation registered",
    )
    new_secret = wait_for(
        lambda: (s := worker_token_secret(cluster, NS, "hello")) and token_of(s) != old and s,
        message="the Deployment on the new Secret",
    )
    new = token_of(new_secret)
    assert hd(cluster, NS, "hello")["status"]["retiringWorkerTokenRotations"] == [""]
    assert ping_status(cluster, new) == 200
    assert ping_status(cluster, old) == 200  # the old pod still works

    assert call("DELETE", f"{cluster.url}{pods}/hello-old")[0] == 200
    wait_for(lambda: ping_status(cluster, old) == 401, message="the old token retired")
    assert ping_status(cluster, new) == 200
    status = hd(cluster, NS, "hello")["status"]
    assert status.get("retiringWorkerTokenRotations") is None


def rotate(cluster, rotation: str, before: dict) -> dict:
    """Rotate the worker token; the Secret the Deployment reads then (not `before`)."""
    patch = {"spec": {"access": {"workerTokenRotation": rotation}}}
    path = cluster.url + HD_PATH.format(ns=NS) + "/hello"
    call("PATCH", path, patch, content_type="application/merge-patch+json")
    wait_for(
        lambda: (
            (hd(cluster, NS, "hello").get("status") or {}).get("workerTokenRotation") == rotation
        ),
        message=f"rotation {rotation} registered",
    )
    return wait_for(
        lambda: (
            (s := worker_token_secret(cluster, NS, "hello"))
            and s["metadata"]["name"] != before["metadata"]["name"]
            and s
        ),
        message="the Deployment on the new Secret",
    )


def test_two_rotations_in_one_rollout_retire_each_token_when_its_last_pod_goes(cluster, operator):
    create_hello(cluster, {})
    first = wait_for(lambda: worker_token_secret(cluster, NS, "hello"), message="Secret")
    pods = f"{cluster.url}/api/v1/namespaces/{NS}/pods"
    assert call("POST", pods, worker_pod("on-first", first["metadata"]["name"]))[0] in (200, 201)
    second = rotate(cluster, "1", first)
    assert call("POST", pods, worker_pod("on-second", second["metadata"]["name"]))[0] in (
        200,
        201,
    )
    third = rotate(cluster, "2", second)
    status = hd(cluster, NS, "hello")["status"]
    assert status["retiringWorkerTokenRotations"] == ["", "1"]
    tokens = [token_of(secret) for secret in (first, second, third)]
    assert [ping_status(cluster, token) for token in tokens] == [200, 200, 200]

    assert call("DELETE", f"{pods}/on-first")[0] == 200
    wait_for(lambda: ping_status(cluster, tokens[0]) == 401, message="the first retired")
    assert [ping_status(cluster, token) for token in tokens[1:]] == [200, 200]
    assert call("DELETE", f"{pods}/on-second")[0] == 200
    wait_for(lambda: ping_status(cluster, tokens[1]) == 401, message="the second retired")
    assert ping_status(cluster, tokens[2]) == 200
    assert hd(cluster, NS, "hello")["status"].get("retiringWorkerTokenRotations") is None


def test_a_namespace_key_relabelled_for_endpoints_only_stops_reaching_others(cluster, operator):
    put_secret(cluster, "everyone", {"k": "namespace-key-0123456789"}, scope="namespace")
    create_hello(cluster, {})
    wait_for(lambda: run_status(cluster, "namespace-key-0123456789") == 200, message="ns key")
    put_secret(cluster, "everyone", {"k": "namespace-key-0123456789"}, scope="endpoint")
    wait_for(lambda: run_status(cluster, "namespace-key-0123456789") == 401, message="revoked")


def test_a_gateway_that_cannot_take_the_registration_is_a_condition(cluster, operator, monkeypatch):
    """An older gateway (during an upgrade) refuses fields it does not know: Ready=False with
    reason GatewayRefused and the gateway's words, tried again until it takes it."""
    from handler_protocol.clients import GatewayAdmin, Refused

    async def older_gateway(self, endpoint, config):
        raise Refused(422, "gateway PUT: HTTP 422: clientKeys: Extra inputs are not permitted")

    monkeypatch.setattr(GatewayAdmin, "put_endpoint", older_gateway)
    create_hello(cluster, {})
    wait_for(lambda: ready(cluster).get("reason") == "GatewayRefused", message="GatewayRefused")
    assert "Extra inputs are not permitted" in ready(cluster)["message"]
