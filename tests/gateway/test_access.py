"""Who may call what, on both backends: every route of the gateway against every kind of
credential, on an endpoint like any other and on one that runs its callers' code; and the
per-caller rate limit."""

from __future__ import annotations

import asyncio

import pytest

from handler_gateway.routes import ADMIN_ROUTES, CLIENT_ROUTES, WORKER_ROUTES
from handler_protocol.models import digest
from tests.gateway.conftest import ADMIN_KEY, CLIENT_KEY, OTHER_TOKEN, WORKER_TOKEN

GENERIC_TOKEN = "generic-worker-token-0123"
KEYS = {"ep": "key-of-ep", "gen": "key-of-gen", "other": "key-of-other", "team": "team-a-key"}
ENDPOINTS = {
    "ep": ("team-a", WORKER_TOKEN, False),
    "gen": ("team-a", GENERIC_TOKEN, True),  # handler_worker.generic: runs callers' code
    "other": ("team-b", OTHER_TOKEN, False),
}
OK = "ok"  # anything but 401 and 403 (the route may then say 404 for an unknown job, ...)


def registration(endpoint: str) -> dict:
    namespace, token, runs_caller_code = ENDPOINTS[endpoint]
    keys = [{"id": f"{namespace}/keys/{endpoint}", "sha256": digest(KEYS[endpoint])}]
    if namespace == "team-a":
        keys.append({"id": "team-a/ns", "sha256": digest(KEYS["team"]), "scope": "namespace"})
    return {
        "workerToken": token,
        "namespace": namespace,
        "runsCallerCode": runs_caller_code,
        "clientKeys": keys,
    }


def credentials(target: str) -> dict[str, str | None]:
    """The issue's columns, for a route of endpoint `target`."""
    own_token = ENDPOINTS[target][1]
    return {
        "no key": None,
        "wrong key": "Bearer not-a-key-at-all",
        "key of another endpoint": f"Bearer {KEYS['other']}",
        "namespace key": f"Bearer {KEYS['team']}",
        "endpoint key": f"Bearer {KEYS[target]}",
        "global key": f"Bearer {CLIENT_KEY}",
        "admin key": f"Bearer {ADMIN_KEY}",
        "worker token": own_token,
        "worker token (Bearer)": f"Bearer {own_token}",
        "another endpoint's worker token": OTHER_TOKEN,
    }


def expected(audience: str, path: str, credential: str, target: str) -> int | str:
    if credential in ("no key", "wrong key"):
        return 401
    worker = credential in ("worker token", "worker token (Bearer)")
    if audience == "client":
        if credential in ("namespace key", "endpoint key"):
            return OK
        if credential in ("global key", "admin key"):
            return 403 if target == "gen" else OK
        return 403
    if audience == "worker":
        return OK if worker else 403
    if credential == "admin key" or (worker and path == "endpoints/{endpoint}/queue"):
        return OK
    return 403


def routes() -> list[tuple[str, str, str]]:
    found = [("client", r.method, r.path) for r in CLIENT_ROUTES]
    found += [("worker", r.method, r.path) for r in WORKER_ROUTES]
    return found + [("admin", r.method, r.path) for r in ADMIN_ROUTES]


def url(audience: str, path: str, target: str) -> str:
    path = path.format(endpoint=target, job="no-such-job", worker="w1")
    if audience == "admin":
        return f"/admin/v1/{path}"
    wait = "?wait=0" if path.split("/")[0] in ("runsync", "status-sync") else ""
    return f"/v2/{target}/{path}{wait}"


ROUTES = routes()


@pytest.mark.parametrize(
    ("audience", "method", "path"), ROUTES, ids=[f"{m} {p}" for _, m, p in ROUTES]
)
async def test_every_route_against_every_credential(api, audience, method, path):
    targets = ["ep", "gen"] if "{endpoint}" in path or audience != "admin" else ["ep"]
    got, wanted = {}, {}
    for target in targets:
        for name, header in credentials(target).items():
            for endpoint in ENDPOINTS:  # again each time: an admin call may have changed one
                await api.register(endpoint, **registration(endpoint))
            body = registration(target) if method == "PUT" else {"input": {}}
            response = await api.client.request(
                method,
                url(audience, path, target),
                json=body if method in ("POST", "PUT") else None,
                headers={"Authorization": header} if header else {},
            )
            status = response.status
            if status not in (401, 403):
                assert status < 500, await response.text()
                status = OK
            else:
                assert "error" in await response.json()
            got[(target, name)] = status
            wanted[(target, name)] = expected(audience, path, name, target)
    assert got == wanted


async def test_refusals_say_why(api):
    for endpoint in ENDPOINTS:
        await api.register(endpoint, **registration(endpoint))
    generic = await api.client.post(
        "/v2/gen/run", json={"input": {}}, headers=api.client_headers(CLIENT_KEY)
    )
    assert generic.status == 403
    message = (await generic.json())["error"]
    assert "runs code its callers send" in message and "spec.access" in message
    foreign = await api.client.post(
        "/v2/ep/run", json={"input": {}}, headers=api.client_headers(KEYS["other"])
    )
    assert "'team-b/keys/other' may not call this route" in (await foreign.json())["error"]
    assert KEYS["other"] not in (await foreign.text())


async def test_requests_count_by_key_id_never_the_key(api):
    await api.register("ep", **registration("ep"))
    await api.client.post("/v2/ep/run", json={"input": {}}, headers=api.client_headers(KEYS["ep"]))
    await api.client.post("/v2/ep/run", json={"input": {}}, headers=api.client_headers("wrong"))
    text = await (await api.client.get("/metrics")).text()
    assert 'handler_gateway_requests_total{code="200",endpoint="ep",key="team-a/keys/ep"} 1.0' in (
        text
    )
    assert 'code="401",endpoint="",key="unknown"' in text  # no label per made-up endpoint
    assert KEYS["ep"] not in text


async def test_made_up_endpoints_add_no_metric_series(api):
    for n in range(5):
        await api.client.post(f"/v2/made-up-{n}/run", json={"input": {}}, headers={"X": "y"})
        await api.client.get(f"/v2/made-up-{n}/health", headers=api.client_headers(CLIENT_KEY))
    text = await (await api.client.get("/metrics")).text()
    assert "made-up" not in text


async def test_a_key_removed_from_the_registration_stops_working(api):
    await api.register("ep", **registration("ep"))
    headers = api.client_headers(KEYS["ep"])
    assert (await api.client.post("/v2/ep/run", json={"input": {}}, headers=headers)).status == 200
    await api.register("ep", **{**registration("ep"), "clientKeys": []})
    refused = await api.client.post("/v2/ep/run", json={"input": {}}, headers=headers)
    assert refused.status == 401  # the key is known nowhere now


async def test_both_worker_tokens_work_while_one_rotates(api):
    new = "new-worker-token-0123456789"
    await api.register("ep", workerToken=new, workerTokenSha256=[digest(WORKER_TOKEN)])
    for token in (new, WORKER_TOKEN):
        assert (await api.client.get("/v2/ep/ping/w1", headers={"Authorization": token})).ok
    await api.register("ep", workerToken=new)  # the rollout is over: the old one goes
    old = await api.client.get("/v2/ep/ping/w1", headers={"Authorization": WORKER_TOKEN})
    assert old.status == 401


async def test_the_registration_keeps_digests_only(api):
    await api.register("ep", **registration("ep"))
    stored = (await api.gateway.backend.get_endpoint("ep")).model_dump_json()
    assert WORKER_TOKEN not in stored and KEYS["ep"] not in stored
    summary = await api.client.get("/admin/v1/endpoints/ep", headers=api.admin_headers())
    body = await summary.json()
    assert body["clientKeys"] == ["team-a/keys/ep", "team-a/ns"] and body["workerTokens"] == 1
    assert "sha256" not in await summary.text()


async def test_each_caller_has_its_own_bucket(api):
    """Burst 2, then 429 with Retry-After; another key still has its own burst; the bucket
    refills at the rate (0.5/s here: a token in 2 s)."""
    limit = {"requestsPerSecond": 0.5, "burst": 2}
    await api.register("ep", **registration("ep"), rateLimit=limit)

    async def run(key: str):
        return await api.client.post(
            "/v2/ep/run", json={"input": {}}, headers=api.client_headers(key)
        )

    statuses = [(await run(KEYS["ep"])).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    refused = await run(KEYS["ep"])
    assert refused.status == 429 and int(refused.headers["Retry-After"]) in (1, 2)
    assert "'team-a/keys/ep' is over endpoint 'ep''s rate limit" in (await refused.json())["error"]
    assert [(await run(KEYS["team"])).status for _ in range(2)] == [200, 200]
    await asyncio.sleep(2.1)
    assert (await run(KEYS["ep"])).status == 200
    # Every client route counts; a read is answered at once and counted meanwhile, so the
    # caller's refusal shows on a read that follows.
    reads = [
        (await api.client.get("/v2/ep/health", headers=api.client_headers(KEYS["ep"]))).status
        for _ in range(5)
    ]
    assert reads[0] == 200 and 429 in reads


async def test_refused_requests_create_nothing(api):
    await api.register("ep", **registration("ep"), rateLimit={"requestsPerSecond": 1, "burst": 1})
    headers = api.client_headers(KEYS["ep"])
    await api.client.post("/v2/ep/run", json={"input": {}}, headers=headers)
    await api.client.post("/v2/ep/run", json={"input": {}}, headers=headers)  # 429
    figures = await api.gateway.queue("ep")
    assert figures.inQueue == 1


async def test_a_key_may_hold_several_grants(api):
    """The admin key also scoped to an endpoint running callers' code (as `handlerctl dev`
    registers its one key): it calls that endpoint's client routes and the admin routes."""
    scoped = registration("gen")
    scoped["clientKeys"].append({"id": "dev", "sha256": digest(ADMIN_KEY)})
    await api.register("gen", **scoped)
    headers = api.admin_headers()
    assert (await api.client.post("/v2/gen/run", json={"input": {}}, headers=headers)).ok
    assert (await api.client.get("/admin/v1/endpoints/gen/queue", headers=headers)).ok
    assert (await api.client.get("/admin/v1/queues", headers=headers)).ok
