"""Bad input and unknown endpoints (the auth matrix: test_access.py): every refusal is a JSON
{"error": ...} with the right status."""

from __future__ import annotations

import pytest

from tests.gateway.conftest import ADMIN_KEY, CLIENT_KEY, OTHER_TOKEN, WORKER_TOKEN

CREDENTIALS = {
    "none": None,
    "unknown": "Bearer not-a-key",
    "client": f"Bearer {CLIENT_KEY}",
    "admin": f"Bearer {ADMIN_KEY}",
    "worker": WORKER_TOKEN,
    "worker-bearer": f"Bearer {WORKER_TOKEN}",
    "other-worker": OTHER_TOKEN,
}


@pytest.fixture
def backend_kind() -> str:
    """HTTP-level checks do not depend on the backend: run them on memory only."""
    return "memory"


async def test_insecure_dev_accepts_everything(make_backend):
    from aiohttp.test_utils import TestClient, TestServer

    from handler_gateway.keys import Keys
    from handler_gateway.routes import create_app

    app = create_app(make_backend(), Keys.of(insecure=True))
    async with TestClient(TestServer(app)) as client:
        put = await client.put(
            "/admin/v1/endpoints/dev", json={"workerToken": "x" * 16, "runsCallerCode": True}
        )
        assert put.status == 201
        assert (await client.post("/v2/dev/run", json={"input": 1})).status == 200
        assert (await client.get("/v2/dev/ping/w1")).status == 200
        assert (await client.get("/v2/dev/job-take/w1")).status in (200, 204)
        assert (await client.get("/admin/v1/endpoints/dev/queue")).status == 200


def test_keys_are_required_without_insecure_dev():
    from handler_gateway.keys import KeyConfigError, Keys

    with pytest.raises(KeyConfigError, match="no admin key configured"):
        Keys.load(environ={})


BAD_INPUT = {
    "invalid json": ("POST", "/v2/ep/run", b"{not json", 400, "not valid JSON"),
    "empty body": ("POST", "/v2/ep/run", b"", 400, "body is empty"),
    "body not an object": ("POST", "/v2/ep/run", b"[1, 2]", 400, "must be a JSON object"),
    "missing input": ("POST", "/v2/ep/run", b'{"webhook": null}', 400, '"input" is required'),
    "null input": ("POST", "/v2/ep/runsync", b'{"input": null}', 400, "must not be null"),
    "bad webhook": (
        "POST",
        "/v2/ep/run",
        b'{"input": 1, "webhook": "ftp://x"}',
        400,
        "http(s) URL",
    ),
    "timeout too small": (
        "POST",
        "/v2/ep/run",
        b'{"input": 1, "policy": {"executionTimeout": 5}}',
        400,
        "policy.executionTimeout",
    ),
    "oversize body": (
        "POST",
        "/v2/ep/run",
        b'{"input": "' + b"x" * (1024 * 1024 + 10) + b'"}',
        413,
        "too large",
    ),
    "unknown endpoint": ("POST", "/v2/nope/run", b'{"input": 1}', 404, "endpoint 'nope' not found"),
    "unknown job": ("GET", "/v2/ep/status/nope", None, 404, "job 'nope' not found"),
    "unknown job cancel": ("POST", "/v2/ep/cancel/nope", None, 404, "not found"),
    "bad runsync wait": (
        "POST",
        "/v2/ep/runsync?wait=abc",
        b'{"input": 1}',
        400,
        "must be an integer",
    ),
    "bad stream cursor": ("GET", "/v2/ep/stream/x?cursor=-1", None, 400, "cursor"),
    "nested past the parser": (
        "POST",
        "/v2/ep/run",
        b'{"input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        400,
        "nested deeper than 200",
    ),
    "nested past the limit": (
        "POST",
        "/v2/ep/run",
        b'{"input": ' + b"[" * 201 + b"]" * 201 + b"}",
        400,
        "nested deeper than 200",
    ),
    "ttl beyond 30 days": (
        "POST",
        "/v2/ep/run",
        b'{"input": 1, "policy": {"ttl": 100000000000000000000}}',
        400,
        "policy.ttl",
    ),
    "execution timeout beyond 7 days": (
        "POST",
        "/v2/ep/run",
        b'{"input": 1, "policy": {"executionTimeout": 604800001}}',
        400,
        "policy.executionTimeout",
    ),
    "unknown route": ("GET", "/v2/ep/nothing-here", None, 404, "Not Found"),
    "wrong method": ("GET", "/v2/ep/run", None, 405, "Method Not Allowed"),
}


async def test_a_wide_input_is_not_taken_for_a_deep_one(api):
    response = await api.client.post(
        f"/v2/{api.endpoint}/run",
        json={"input": [{"a": [n]} for n in range(1000)]},
        headers=api.client_headers(),
    )
    assert response.status == 200, await response.text()


@pytest.mark.parametrize("case", BAD_INPUT, ids=list(BAD_INPUT))
async def test_bad_client_input(api, case):
    method, path, body, status, message = BAD_INPUT[case]
    response = await api.client.request(method, path, data=body, headers=api.client_headers())
    assert response.status == status, await response.text()
    assert message in (await response.json())["error"]
    if status == 405:
        assert response.headers["Allow"] == "POST"


WORKER_BAD_INPUT = {
    "bad batch size": ("GET", "/v2/ep/job-take-batch/w1?batch_size=0", None, 400, "batch_size"),
    "result not json": ("POST", "/v2/ep/job-done/w1/j1", b"oops", 400, "not valid JSON"),
    "result not object": ("POST", "/v2/ep/job-done/w1/j1", b'"x"', 400, "JSON object"),
    "chunk without output": ("POST", "/v2/ep/job-stream/w1/j1", b"{}", 400, '"output"'),
    "result nested too deep": (
        "POST",
        "/v2/ep/job-done/w1/j1",
        b'{"output": ' + b'{"a": ' * 300 + b"1" + b"}" * 300 + b"}",
        400,
        "nested deeper",
    ),
}


@pytest.mark.parametrize("case", WORKER_BAD_INPUT, ids=list(WORKER_BAD_INPUT))
async def test_bad_worker_input(api, case):
    method, path, body, status, message = WORKER_BAD_INPUT[case]
    response = await api.client.request(method, path, data=body, headers=api.worker_headers())
    assert response.status == status, await response.text()
    assert message in (await response.json())["error"]


async def test_result_for_unknown_job_is_accepted_and_ignored(api):
    assert (await api.done("w1", "never-existed", {"output": 1}))["result"] == "ignored"


ADMIN_BAD_INPUT = {
    "short token": ("PUT", "/admin/v1/endpoints/x", {"workerToken": "short"}, 400, "workerToken"),
    "unknown field": (
        "PUT",
        "/admin/v1/endpoints/x",
        {"workerToken": "t" * 16, "bogus": 1},
        400,
        "bogus",
    ),
    "id mismatch": (
        "PUT",
        "/admin/v1/endpoints/x",
        {"id": "y", "workerToken": "t" * 16},
        400,
        "does not match",
    ),
    "bad endpoint id": (
        "PUT",
        "/admin/v1/endpoints/-bad-",
        {"workerToken": "t" * 16},
        400,
        "is invalid",
    ),
    "negative retries": (
        "PUT",
        "/admin/v1/endpoints/x",
        {"workerToken": "t" * 16, "maxRetries": -1},
        400,
        "maxRetries",
    ),
    "delete unknown": ("DELETE", "/admin/v1/endpoints/nope", None, 404, "not found"),
    "drain unknown endpoint": (
        "POST",
        "/admin/v1/endpoints/nope/workers/w/drain",
        None,
        404,
        "not found",
    ),
    "replay bad body": ("POST", "/admin/v1/endpoints/ep/dlq/replay", {"ids": "x"}, 400, "ids"),
}


@pytest.mark.parametrize("case", ADMIN_BAD_INPUT, ids=list(ADMIN_BAD_INPUT))
async def test_bad_admin_input(api, case):
    method, path, body, status, message = ADMIN_BAD_INPUT[case]
    response = await api.client.request(method, path, json=body, headers=api.admin_headers())
    assert response.status == status, await response.text()
    assert message in (await response.json())["error"]


UNKNOWN_ENDPOINT_ROUTES = {
    "client": ("POST", "/v2/nope/run", {"input": {}}),
    "worker": ("GET", "/v2/nope/ping/w1", None),
    "keda": ("GET", "/admin/v1/endpoints/nope/queue", None),
}
# credential -> status on an endpoint that does not exist: credentials first, then existence
UNKNOWN_ENDPOINT = {"none": 401, "unknown": 401, "client": 404, "admin": 404, "worker": 404}
UNKNOWN_CASES = [(route, cred) for route in UNKNOWN_ENDPOINT_ROUTES for cred in UNKNOWN_ENDPOINT]


@pytest.mark.parametrize(("route", "credential"), UNKNOWN_CASES)
async def test_an_unknown_endpoint_cannot_be_probed_without_credentials(api, route, credential):
    method, path, body = UNKNOWN_ENDPOINT_ROUTES[route]
    headers = {"Authorization": CREDENTIALS[credential]} if CREDENTIALS[credential] else {}
    response = await api.client.request(method, path, json=body, headers=headers)
    assert response.status == UNKNOWN_ENDPOINT[credential], await response.text()
    assert "error" in await response.json()
