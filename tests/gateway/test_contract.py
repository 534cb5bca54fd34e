"""The gateway contract, run against every backend: routes, status transitions, delivery rules."""

from __future__ import annotations

import asyncio
import time

import pytest

from handler_gateway import jobs
from tests.gateway.conftest import CLIENT_KEY, WORKER_TOKEN


async def test_run_take_done_completes(api):
    job_id = await api.run({"prompt": "cat"})
    assert (await api.status(job_id))["status"] == "IN_QUEUE"
    taken = await api.take("w1")
    assert taken == {"id": job_id, "input": {"prompt": "cat"}, "delivery": 1}
    view = await api.status(job_id)
    assert view["status"] == "IN_PROGRESS" and view["workerId"] == "w1"
    assert await api.done("w1", job_id, {"output": {"image": "x"}}) == {"result": "accepted"}
    view = await api.status(job_id)
    assert view["status"] == "COMPLETED"
    assert view["output"] == {"image": "x"}
    assert view["delayTime"] >= 0 and view["executionTime"] >= 0


async def test_failed_result(api):
    job_id = await api.run({"x": 1})
    await api.take("w1")
    await api.done("w1", job_id, {"error": '{"error_message": "boom"}'})
    view = await api.status(job_id)
    assert view["status"] == "FAILED" and "boom" in view["error"]


async def test_fifo_order(api):
    ids = [await api.run({"n": n}) for n in range(5)]
    assert [(await api.take("w1"))["id"] for _ in ids] == ids


async def test_take_long_polls_then_204(api):
    start = time.monotonic()
    assert await api.take("w1") is None
    assert time.monotonic() - start >= api.gateway.timings.take_hold * 0.9


async def test_take_wakes_when_a_job_arrives(api):
    waiter = asyncio.create_task(api.take("w1"))
    await asyncio.sleep(0.1)
    start = time.monotonic()
    job_id = await api.run({"late": True})
    taken = await waiter
    assert taken["id"] == job_id
    assert time.monotonic() - start < api.gateway.timings.take_hold / 2


async def test_take_batch(api):
    ids = [await api.run({"n": n}) for n in range(5)]
    first = await api.take("w1", batch=3)
    second = await api.take("w1", batch=3)
    assert [j["id"] for j in first] == ids[:3]
    assert [j["id"] for j in second] == ids[3:]


async def test_capacity_caps_what_a_worker_holds(api):
    first, second, third = [await api.run({"n": n}) for n in range(3)]
    url = f"/v2/{api.endpoint}/job-take-batch/w1?capacity=2&batch_size=5"
    taken = await (await api.client.get(url, headers=api.worker_headers())).json()
    assert [j["id"] for j in taken] == [first, second]
    # Full: the next take waits, and gets a job the moment one of the worker's jobs ends.
    waiter = asyncio.create_task(api.client.get(url, headers=api.worker_headers()))
    await asyncio.sleep(0.2)
    assert not waiter.done()
    await api.done("w1", first, {"output": 1})
    response = await asyncio.wait_for(waiter, 2)
    assert [j["id"] for j in await response.json()] == [third]


async def done_and_take(api, worker: str, job_id: str, query: str = "take=1") -> dict:
    return await api.done(worker, job_id, {"output": job_id}, query=query)


async def test_a_result_post_may_carry_the_next_take(api):
    first, second = [await api.run({"n": n}) for n in range(2)]
    await api.take("w1")
    answer = await done_and_take(api, "w1", first)
    assert answer == {
        "result": "accepted",
        "jobs": [{"id": second, "input": {"n": 1}, "delivery": 1}],
    }
    assert (await api.status(first))["output"] == first
    view = await api.status(second)
    assert (view["status"], view["workerId"]) == ("IN_PROGRESS", "w1")
    # Nothing queued: the take part long-polls as a take does, then answers no jobs.
    assert await done_and_take(api, "w1", second) == {"result": "accepted", "jobs": []}


async def test_a_result_posted_again_gets_the_jobs_its_unread_answer_carried(api):
    first, second = [await api.run({"n": n}) for n in range(2)]
    await api.take("w1")
    handed = (await done_and_take(api, "w1", first))["jobs"]
    assert [j["id"] for j in handed] == [second]
    # The worker never read that answer and posts the same result again.
    again = await done_and_take(api, "w1", first)
    assert again == {"result": "duplicate", "jobs": handed}
    # Once the handed job reports, a repeat no longer hands it over.
    await api.done("w1", second, {"output": 2})
    assert await done_and_take(api, "w1", first) == {"result": "duplicate", "jobs": []}


async def test_the_take_of_a_result_post_wakes_for_a_new_job_and_keeps_to_capacity(api):
    first = await api.run({"n": 0})
    await api.take("w1")
    waiter = asyncio.create_task(done_and_take(api, "w1", first, "take=2&capacity=1"))
    await asyncio.sleep(0.1)
    second, third = [await api.run({"n": n}) for n in (1, 2)]
    answer = await waiter
    assert [j["id"] for j in answer["jobs"]] == [second]  # capacity 1: one, not two
    assert (await api.status(third))["status"] == "IN_QUEUE"


async def test_runsync_returns_the_result(api):
    async def worker():
        job = None
        while job is None:
            job = await api.take("w1")
        await api.done("w1", job["id"], {"output": job["input"]["v"] * 2})

    task = asyncio.create_task(worker())
    response = await api.client.post(
        f"/v2/{api.endpoint}/runsync", json={"input": {"v": 21}}, headers=api.client_headers()
    )
    await task
    body = await response.json()
    assert body["status"] == "COMPLETED" and body["output"] == 42


async def test_runsync_returns_in_queue_after_its_wait(api):
    start = time.monotonic()
    response = await api.client.post(
        f"/v2/{api.endpoint}/runsync?wait=300", json={"input": {}}, headers=api.client_headers()
    )
    body = await response.json()
    assert body["status"] == "IN_QUEUE" and set(body) == {"id", "status"}
    assert 0.25 <= time.monotonic() - start < 2


async def test_progress_is_shown_and_never_overwrites_the_result(api):
    job_id = await api.run({})
    await api.take("w1")
    assert (await api.done("w1", job_id, {"status": "IN_PROGRESS", "output": {"pct": 50}}))[
        "result"
    ] == "progress"
    assert (await api.status(job_id))["output"] == {"pct": 50}
    await api.done("w1", job_id, {"output": "final"})
    late = await api.done("w1", job_id, {"status": "IN_PROGRESS", "output": {"pct": 99}})
    assert late["result"] == "duplicate"
    assert (await api.status(job_id))["output"] == "final"


async def test_result_is_idempotent_per_job_and_worker(api):
    job_id = await api.run({})
    await api.take("w1")
    assert (await api.done("w1", job_id, {"output": 1}))["result"] == "accepted"
    assert (await api.done("w1", job_id, {"output": 1}))["result"] == "duplicate"
    health = await api.health()
    assert health["jobs"]["completed"] == 1


async def test_result_from_another_worker_is_ignored_and_counted(api):
    job_id = await api.run({})
    await api.take("w1")
    assert (await api.done("w2", job_id, {"output": "stolen"}))["result"] == "ignored"
    assert (await api.status(job_id))["status"] == "IN_PROGRESS"
    counters = await api.gateway.backend.counters(api.endpoint)
    assert counters["ignoredResults"] == 1


async def test_stream_chunks_once_per_cursor(api):
    job_id = await api.run({})
    await api.take("w1")
    for n in range(3):
        await api.chunk("w1", job_id, {"n": n})
    url = f"/v2/{api.endpoint}/stream/{job_id}"
    first = await (await api.client.get(url, headers=api.client_headers())).json()
    assert [c["output"] for c in first["stream"]] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert first["status"] == "IN_PROGRESS" and first["cursor"] == 3
    again = await (await api.client.get(url, headers=api.client_headers())).json()
    assert again["stream"] == []
    await api.chunk("w1", job_id, {"n": 3})
    await api.done("w1", job_id, {"output": []}, stream=True)
    last = await (await api.client.get(url, headers=api.client_headers())).json()
    assert [c["output"] for c in last["stream"]] == [{"n": 3}] and last["status"] == "COMPLETED"
    own = await (await api.client.get(url + "?cursor=1", headers=api.client_headers())).json()
    assert [c["output"]["n"] for c in own["stream"]] == [1, 2, 3] and own["cursor"] == 4
    final = await api.status(job_id)
    assert final["output"] == [{"n": 0}, {"n": 1}, {"n": 2}, {"n": 3}], "stream job output"


async def test_cancel_queued_job_is_never_delivered(api):
    job_id = await api.run({})
    other = await api.run({})
    response = await api.client.post(
        f"/v2/{api.endpoint}/cancel/{job_id}", headers=api.client_headers()
    )
    assert (await response.json())["status"] == "CANCELLED"
    assert (await api.take("w1"))["id"] == other
    assert await api.take("w1") is None
    health = await api.health()
    assert health["jobs"]["inQueue"] == 0 and health["jobs"]["cancelled"] == 1


async def test_cancel_in_progress_signals_the_worker_and_ignores_its_result(api):
    job_id = await api.run({})
    await api.take("w1")
    await api.client.post(f"/v2/{api.endpoint}/cancel/{job_id}", headers=api.client_headers())
    response = await api.client.get(f"/v2/{api.endpoint}/job-stop/w1", headers=api.worker_headers())
    assert (await response.json()) == {"jobsToStop": [job_id]}
    assert (await api.done("w1", job_id, {"output": "late"}))["result"] == "ignored"
    assert (await api.status(job_id))["status"] == "CANCELLED"
    stream = await api.client.get(
        f"/v2/{api.endpoint}/stream/{job_id}", headers=api.client_headers()
    )
    assert (await stream.json())["status"] == "FAILED", "runpod's stream() must see a final state"


async def test_stop_is_resent_until_the_worker_lets_go(api):
    job_id = await api.run({})
    await api.take("w1")
    await api.client.post(f"/v2/{api.endpoint}/cancel/{job_id}", headers=api.client_headers())
    stop_url = f"/v2/{api.endpoint}/job-stop/w1"
    first = await api.client.get(stop_url, headers=api.worker_headers())
    assert (await first.json()) == {"jobsToStop": [job_id]}
    # Still running on the worker (its ping lists it): the stop comes again after a while.
    await api.client.get(
        f"/v2/{api.endpoint}/ping/w1?job_id={job_id}", headers=api.worker_headers()
    )
    again = await api.client.get(stop_url, headers=api.worker_headers())
    assert (await again.json()) == {"jobsToStop": [job_id]}
    # The worker let go of it (no longer in its pings): no more stops.
    await asyncio.sleep(api.gateway.timings.stop_resend)
    await api.client.get(f"/v2/{api.endpoint}/ping/w1", headers=api.worker_headers())
    last = await api.client.get(stop_url, headers=api.worker_headers())
    assert last.status == 204


async def test_cancel_of_a_finished_job_changes_nothing(api):
    job_id = await api.run({})
    await api.take("w1")
    await api.done("w1", job_id, {"output": 1})
    response = await api.client.post(
        f"/v2/{api.endpoint}/cancel/{job_id}", headers=api.client_headers()
    )
    assert (await response.json())["status"] == "COMPLETED"


async def test_job_stop_long_polls_then_204(api):
    response = await api.client.get(f"/v2/{api.endpoint}/job-stop/w1", headers=api.worker_headers())
    assert response.status == 204


async def test_execution_timeout_enforced_by_the_gateway(api):
    job_id = await api.run({}, policy={"executionTimeout": 1000})
    await api.take("w1")
    view = await api.wait_status(job_id, "TIMED_OUT", timeout=5)
    assert "execution timeout of 1 s" in view["error"]
    stops = await api.client.get(f"/v2/{api.endpoint}/job-stop/w1", headers=api.worker_headers())
    assert (await stops.json())["jobsToStop"] == [job_id]
    assert (await api.done("w1", job_id, {"output": "late"}))["result"] == "ignored"


async def test_endpoint_default_execution_timeout(api):
    await api.register(executionTimeoutSeconds=1)
    job_id = await api.run({})
    await api.take("w1")
    await api.wait_status(job_id, "TIMED_OUT", timeout=5)


async def test_retry_requeues_failed_jobs_only(api):
    job_id = await api.run({"try": 1})
    await api.take("w1")
    await api.done("w1", job_id, {"error": "flaky"})
    response = await api.client.post(
        f"/v2/{api.endpoint}/retry/{job_id}", headers=api.client_headers()
    )
    assert (await response.json()) == {"id": job_id, "status": "IN_QUEUE"}
    assert (await api.take("w2"))["id"] == job_id
    await api.done("w2", job_id, {"output": "ok"})
    response = await api.client.post(
        f"/v2/{api.endpoint}/retry/{job_id}", headers=api.client_headers()
    )
    assert response.status == 409
    assert "only FAILED, TIMED_OUT or CANCELLED" in (await response.json())["error"]
    assert (await api.health())["jobs"]["retried"] == 1


async def test_ttl_expires_queued_jobs_and_results(api, monkeypatch):
    queued = await api.run({}, policy={"ttl": 1000})
    view = await api.wait_status(queued, "TIMED_OUT", timeout=5)
    assert "expired in the queue" in view["error"]
    monkeypatch.setattr(jobs, "MIN_RESULT_RETENTION_S", 0.0)
    done = await api.run({}, policy={"ttl": 1000})
    await api.take("w1")
    await api.done("w1", done, {"output": 1})
    await asyncio.sleep(1.3)
    await api.gateway.sweep()
    response = await api.client.get(
        f"/v2/{api.endpoint}/status/{done}", headers=api.client_headers()
    )
    assert response.status == 404


async def test_silent_worker_job_is_requeued_then_dead_lettered(api):
    await api.register(heartbeatIntervalSeconds=0.2, heartbeatMisses=2, maxRetries=1)
    job_id = await api.run({"gpu": True})
    await api.take("w1")
    view = await api.wait_status(job_id, "IN_QUEUE", timeout=5)
    assert view.get("retries") is None or view["retries"] >= 1
    assert (await api.take("w2"))["id"] == job_id
    view = await api.wait_status(job_id, "FAILED", timeout=5)
    assert "lost 2 times (maxRetries=1)" in view["error"]
    dlq = await api.client.get(
        f"/admin/v1/endpoints/{api.endpoint}/dlq", headers=api.admin_headers()
    )
    assert [j["id"] for j in (await dlq.json())["jobs"]] == [job_id]
    health = await api.health()
    assert health["jobs"]["retried"] == 1 and health["jobs"]["failed"] == 1
    replay = await api.client.post(
        f"/admin/v1/endpoints/{api.endpoint}/dlq/replay", json={}, headers=api.admin_headers()
    )
    assert (await replay.json()) == {"replayed": [job_id]}
    assert (await api.take("w3"))["id"] == job_id
    await api.done("w3", job_id, {"output": "finally"})
    assert (await api.status(job_id))["status"] == "COMPLETED"
    dlq = await api.client.get(
        f"/admin/v1/endpoints/{api.endpoint}/dlq", headers=api.admin_headers()
    )
    assert (await dlq.json())["jobs"] == []


async def test_heartbeats_keep_a_long_job_alive(api):
    await api.register(heartbeatIntervalSeconds=0.2, heartbeatMisses=2)
    job_id = await api.run({})
    await api.take("w1")
    for _ in range(8):
        await api.client.get(
            f"/v2/{api.endpoint}/ping/w1?job_id={job_id}&runpod_version=1.12.0",
            headers=api.worker_headers(),
        )
        await asyncio.sleep(0.1)
    assert (await api.status(job_id))["status"] == "IN_PROGRESS"


async def test_replay_unknown_id_is_404(api):
    response = await api.client.post(
        f"/admin/v1/endpoints/{api.endpoint}/dlq/replay",
        json={"ids": ["nope"]},
        headers=api.admin_headers(),
    )
    assert response.status == 404


async def test_purge_queue(api):
    ids = [await api.run({"n": n}) for n in range(3)]
    running = await api.run({"n": "running"})
    ids.remove(ids[0]) if False else None
    await api.take("w1")  # takes ids[0]
    response = await api.client.post(
        f"/v2/{api.endpoint}/purge-queue", headers=api.client_headers()
    )
    assert await response.json() == {"removed": 3, "status": "completed"}
    assert (await api.status(running))["status"] == "CANCELLED"
    assert (await api.status(ids[0]))["status"] == "IN_PROGRESS"
    assert await api.take("w2") is None


async def test_drained_worker_gets_no_new_jobs(api):
    job_id = await api.run({})
    response = await api.client.post(
        f"/admin/v1/endpoints/{api.endpoint}/workers/w1/drain", headers=api.admin_headers()
    )
    assert (await response.json()) == {
        "endpoint": api.endpoint,
        "worker": "w1",
        "draining": True,
        "jobs": [],
    }
    assert await api.take("w1") is None
    assert (await api.take("w2"))["id"] == job_id
    response = await api.client.post(
        f"/admin/v1/endpoints/{api.endpoint}/workers/w2/drain", headers=api.admin_headers()
    )
    assert (await response.json())["jobs"] == [job_id], "still busy: not safe to remove"
    await api.done("w2", job_id, {"output": 1})  # a draining worker finishes what it has
    assert (await api.status(job_id))["status"] == "COMPLETED"
    await api.client.delete(
        f"/admin/v1/endpoints/{api.endpoint}/workers/w1/drain", headers=api.admin_headers()
    )
    second = await api.run({})
    assert (await api.take("w1"))["id"] == second


async def test_health_and_queue_figures(api):
    for n in range(3):
        await api.run({"n": n})
    await api.take("w1")
    await api.take("w2")
    await api.client.get(f"/v2/{api.endpoint}/ping/w3", headers=api.worker_headers())
    health = await api.health()
    assert health["jobs"]["inQueue"] == 1 and health["jobs"]["inProgress"] == 2
    assert health["workers"] == {"idle": 1, "running": 2, "draining": 0, "refreshes": 0}
    response = await api.client.get("/admin/v1/queues", headers=api.admin_headers())
    figures = (await response.json())["endpoints"][api.endpoint]
    assert figures["inQueue"] == 1 and figures["inProgress"] == 2
    assert figures["workerStates"] == {"w1": "running", "w2": "running", "w3": "idle"}
    assert figures["workerJobs"] == {"w1": 1, "w2": 1, "w3": 0}
    assert figures["load"] == 3
    assert figures["lastActivity"] > time.time() - 10


async def test_queue_delay_is_how_long_the_next_normal_job_has_waited(api):
    """RunPod's request-delay figure: the head of the normal queue's age on the gateway's
    clock (low-priority jobs do not count: they bring no worker)."""

    async def delay() -> float:
        response = await api.client.get("/admin/v1/queues", headers=api.admin_headers())
        return (await response.json())["endpoints"][api.endpoint]["queueDelaySeconds"]

    start = 1_800_000_000.0
    api.gateway.clock = lambda: start
    assert await delay() == 0
    await api.run("low", policy={"lowPriority": True})
    assert await delay() == 0
    first = await api.run("first")
    api.gateway.clock = lambda: start + 30
    await api.run("second")
    api.gateway.clock = lambda: start + 42
    assert await delay() == 42  # the first job, queued at start
    assert (await api.take("w1"))["id"] == first
    assert await delay() == 12  # now the second, queued 12 s ago


async def test_queues_long_poll_answers_when_a_job_is_queued(api):
    first = await (await api.client.get("/admin/v1/queues", headers=api.admin_headers())).json()
    poll = asyncio.ensure_future(
        api.client.get(
            f"/admin/v1/queues?wait=20&since={first['time']}", headers=api.admin_headers()
        )
    )
    await asyncio.sleep(0.2)
    assert not poll.done(), "nothing was queued: the poll is held"
    await api.run({"wake": True})
    response = await asyncio.wait_for(poll, 10)
    assert (await response.json())["endpoints"][api.endpoint]["inQueue"] == 1


async def test_queues_long_poll_answers_at_once_for_a_job_queued_since(api):
    await api.run({"queued": "between two polls"})
    response = await api.client.get(
        f"/admin/v1/queues?wait=20&since={time.time() - 60}", headers=api.admin_headers()
    )
    assert (await response.json())["endpoints"][api.endpoint]["inQueue"] == 1


async def test_queues_long_poll_times_out_with_fresh_figures(api):
    response = await api.client.get(
        f"/admin/v1/queues?wait=0.3&since={time.time()}", headers=api.admin_headers()
    )
    body = await response.json()
    assert response.status == 200 and body["endpoints"][api.endpoint]["inQueue"] == 0


@pytest.mark.parametrize(
    ("query", "message"),
    [("wait=soon", "must be a number"), ("wait=31", "between 0 and 30"), ("since=-1", "since")],
)
async def test_queues_bad_parameters(api, query, message):
    response = await api.client.get(f"/admin/v1/queues?{query}", headers=api.admin_headers())
    assert response.status == 400 and message in (await response.json())["error"]


@pytest.mark.parametrize(
    ("credential", "status"),
    [
        ("admin", 200),
        ("Bearer " + WORKER_TOKEN, 200),
        (WORKER_TOKEN, 200),
        ("Bearer " + CLIENT_KEY, 403),
        (None, 401),
    ],
)
async def test_endpoint_queue_for_keda(api, credential, status):
    await api.run({})
    headers = (
        api.admin_headers()
        if credential == "admin"
        else ({"Authorization": credential} if credential else {})
    )
    response = await api.client.get(f"/admin/v1/endpoints/{api.endpoint}/queue", headers=headers)
    body = await response.json()
    assert response.status == status, body
    if status == 200:
        assert body["load"] == 1 and body["inQueue"] == 1
    else:
        assert "error" in body


async def test_token_rotation_and_endpoint_delete(api):
    await api.register(workerToken="rotated-token-0123456789")
    response = await api.client.get(f"/v2/{api.endpoint}/ping/w1", headers=api.worker_headers())
    assert response.status == 401
    response = await api.client.get(
        f"/v2/{api.endpoint}/ping/w1", headers=api.worker_headers("rotated-token-0123456789")
    )
    assert response.status == 200
    response = await api.client.delete(
        f"/admin/v1/endpoints/{api.endpoint}", headers=api.admin_headers()
    )
    assert response.status == 200
    response = await api.client.post(
        f"/v2/{api.endpoint}/run", json={"input": {}}, headers=api.client_headers()
    )
    assert response.status == 404


async def test_webhook_is_posted_on_completion(api):
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    received: asyncio.Queue = asyncio.Queue()

    async def hook(request):
        await received.put(await request.json())
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/hook", hook)
    server = TestServer(app)
    await server.start_server()
    try:
        job_id = await api.run({}, webhook=str(server.make_url("/hook")))
        await api.take("w1")
        await api.done("w1", job_id, {"output": {"ok": True}})
        body = await asyncio.wait_for(received.get(), 5)
        assert (
            body["id"] == job_id
            and body["status"] == "COMPLETED"
            and body["output"] == {"ok": True}
        )
    finally:
        await server.close()


async def test_metrics_and_health_routes(api):
    job_id = await api.run({})
    await api.take("w1")
    await api.done("w1", job_id, {"output": 1})
    text = await (await api.client.get("/metrics")).text()
    assert (
        f'handler_gateway_jobs_finished_total{{endpoint="{api.endpoint}",status="COMPLETED"}} 1.0'
        in text
    )
    assert f'handler_gateway_queue_depth{{endpoint="{api.endpoint}"}} 0.0' in text
    assert "handler_gateway_job_delay_seconds_bucket" in text
    assert (await api.client.get("/healthz")).status == 200
    assert (await api.client.get("/readyz")).status == 200


async def test_openapi_document_is_valid(api):
    from openapi_spec_validator import validate

    document = await (await api.client.get("/openapi.json")).json()
    validate(document)
    assert "/v2/{endpoint}/run" in document["paths"]
    assert "RunRequest" in document["components"]["schemas"]
    # What the server answers, documented (the fuzz found these missing).
    put = document["paths"]["/admin/v1/endpoints/{endpoint}"]["put"]["responses"]
    assert {"200", "201"} <= set(put)
    for route in ("job-take/{worker}", "job-take-batch/{worker}", "job-stop/{worker}"):
        assert "204" in document["paths"][f"/v2/{{endpoint}}/{route}"]["get"]["responses"]
    figures = document["components"]["schemas"]["QueueFigures"]
    assert "lastActivity" not in figures.get("required", [])  # absent while nothing ran


async def test_purge_racing_takes_cancels_no_running_job(api):
    """Issue: purge cancelled jobs that takes started while it ran. Only queued jobs go, and
    it says how many."""
    queued = [await api.run({"n": n}) for n in range(40)]

    async def take(worker: str) -> list[str]:
        taken = []
        while (job := await api.take(worker)) is not None:
            taken.append(job["id"])
        return taken

    takers = [asyncio.create_task(take(f"w{n}")) for n in range(4)]
    await asyncio.sleep(0)
    response = await api.client.post(
        f"/v2/{api.endpoint}/purge-queue", headers=api.client_headers()
    )
    removed = (await response.json())["removed"]
    taken = [job for taker in takers for job in await taker]
    states = {job: (await api.status(job))["status"] for job in queued}
    assert all(states[job] == "IN_PROGRESS" for job in taken)
    assert sorted(states.values()).count("CANCELLED") == removed == len(queued) - len(taken)


async def test_a_job_requeued_after_its_worker_was_lost_goes_to_the_head(api):
    """Issue: redelivery waited behind every job queued since (17-45 s observed)."""
    await api.register(heartbeatIntervalSeconds=0.2, heartbeatMisses=2)
    lost = await api.run({"n": "lost"})
    await api.take("w1")  # w1 never reports again
    later = [await api.run({"n": n}) for n in range(3)]
    await api.wait_status(lost, "IN_QUEUE")
    assert [(await api.take("w2"))["id"] for _ in range(4)] == [lost, *later]


async def test_concurrent_stream_readers_get_each_chunk_once(api):
    """Issue: the shared cursor could hand a chunk to two readers at once."""
    job_id = await api.run({})
    await api.take("w1")
    url = f"/v2/{api.endpoint}/stream/{job_id}"

    async def read() -> list[int]:
        got = []
        for _ in range(30):
            response = await api.client.get(url, headers=api.client_headers())
            got += [chunk["output"] for chunk in (await response.json())["stream"]]
        return got

    async def write() -> None:
        for n in range(60):
            await api.chunk("w1", job_id, n)

    *reads, _ = await asyncio.gather(*(read() for _ in range(6)), write())
    leftover = await read()
    delivered = sorted(n for got in [*reads, leftover] for n in got)
    assert delivered == list(range(60))


async def test_a_stream_reader_that_lost_the_race_hands_out_no_chunk_twice(api, monkeypatch):
    """Reader 1 reads chunks 0-1 and stalls; chunk 2 arrives; reader 2 reads 0-2 and stalls;
    reader 1 moves the cursor to 2. Reader 2 must not hand out 0-1 again."""
    job_id = await api.run({})
    await api.take("w1")
    for n in range(2):
        await api.chunk("w1", job_id, n)
    backend = api.gateway.backend
    original, gates, reads = backend.read_chunks, [asyncio.Event(), asyncio.Event()], []

    async def stalled(endpoint, job, start):
        chunks = await original(endpoint, job, start)
        gate = gates[len(reads)]
        reads.append(chunks)
        await gate.wait()
        return chunks

    monkeypatch.setattr(backend, "read_chunks", stalled)
    url = f"/v2/{api.endpoint}/stream/{job_id}"

    async def read() -> list:
        response = await api.client.get(url, headers=api.client_headers())
        return [chunk["output"] for chunk in (await response.json())["stream"]]

    async def until(count: int) -> None:
        while len(reads) < count:
            await asyncio.sleep(0.01)

    first = asyncio.create_task(read())
    await until(1)
    await api.chunk("w1", job_id, 2)
    second = asyncio.create_task(read())
    await until(2)
    gates[0].set()
    assert await first == [0, 1]
    gates[1].set()
    assert await second == []
    monkeypatch.setattr(backend, "read_chunks", original)
    assert await read() == [2]


async def take_as(api, worker: str, instance: str):
    response = await api.client.get(
        f"/v2/{api.endpoint}/job-take/{worker}?instance={instance}", headers=api.worker_headers()
    )
    return None if response.status == 204 else await response.json()


async def test_a_restarted_worker_gets_what_its_predecessor_held_back_at_once(api):
    """Issue: a container restarting under the same name waited for its predecessor's held
    jobs to time out. A new instance redelivers them (to the head: it takes them first)."""
    held = await api.run({"n": "held"})
    assert (await take_as(api, "w1", "first"))["id"] == held
    queued = await api.run({"n": "queued"})
    assert (await take_as(api, "w1", "first"))["id"] == queued  # same process: nothing moves
    assert (await api.status(held))["status"] == "IN_PROGRESS"
    later = await api.run({"n": "later"})
    # A new process under the same name: both go back, ahead of the job queued meanwhile.
    again = [(await take_as(api, "w1", "second"))["id"] for _ in range(3)]
    assert sorted(again[:2]) == sorted([held, queued]) and again[2] == later
    assert [(await api.status(job)).get("retries") for job in (held, queued)] == [1, 1]


async def test_a_restarted_worker_is_served_though_its_predecessor_said_it_left(api):
    await take_as(api, "w1", "first")
    response = await api.client.post(
        f"/v2/{api.endpoint}/leave/w1", json={}, headers=api.worker_headers()
    )
    assert response.status == 200
    job = await api.run({})
    assert await take_as(api, "w1", "first") is None  # the leaving process gets nothing
    assert (await take_as(api, "w1", "second"))["id"] == job


async def test_status_sync_waits_for_the_end_of_the_job(api):
    """runpod's JavaScript client polls `status-sync/{job}?wait=ms` past runsync's wait."""
    job_id = await api.run({"v": 1})
    url = f"/v2/{api.endpoint}/status-sync/{job_id}"
    waited = await api.client.get(url + "?wait=100", headers=api.client_headers())
    assert (waited.status, (await waited.json())["status"]) == (200, "IN_QUEUE")
    waiting = asyncio.create_task(api.client.post(url + "?wait=5000", headers=api.client_headers()))
    await api.take("w1")
    await api.done("w1", job_id, {"output": 2})
    response = await waiting
    assert (await response.json())["output"] == 2
    missing = await api.client.get(
        f"/v2/{api.endpoint}/status-sync/nope", headers=api.client_headers()
    )
    assert missing.status == 404


async def test_a_result_of_an_earlier_delivery_to_the_same_worker_is_ignored(api):
    """Issue: a late result from a delivery presumed lost was taken for the current one's. Our
    worker echoes the delivery id it was handed; a result without one (the SDK's) still counts."""
    await api.register(heartbeatIntervalSeconds=0.2, heartbeatMisses=2)
    job_id = await api.run({})
    assert (await api.take("w1"))["delivery"] == 1
    await api.wait_status(job_id, "IN_QUEUE")  # w1 went silent: presumed lost
    assert (await api.take("w1"))["delivery"] == 2  # the same name takes it again
    late = await api.done("w1", job_id, {"output": "stale"}, query="delivery=1")
    assert late == {"result": "ignored"}
    assert (await api.status(job_id))["status"] == "IN_PROGRESS"
    assert await api.done("w1", job_id, {"output": "fresh"}, query="delivery=2") == {
        "result": "accepted"
    }
    assert (await api.status(job_id))["output"] == "fresh"


async def test_chunks_and_progress_of_an_earlier_delivery_are_ignored_and_counted(api):
    """Issue: a delivery presumed lost that still runs on the same worker name interleaved its
    stream chunks and progress with the current delivery's. handler_worker names the delivery
    on its chunks (the SDK's chunks and progress name none: they still count)."""
    await api.register(heartbeatIntervalSeconds=0.2, heartbeatMisses=2)
    job_id = await api.run({})
    await api.take("w1")
    await api.wait_status(job_id, "IN_QUEUE")  # w1 went silent: presumed lost
    assert (await api.take("w1"))["delivery"] == 2
    stale = {"status": "IN_PROGRESS", "output": "stale 50%"}
    assert await api.chunk("w1", job_id, "stale", query="delivery=1") == {"result": "ignored"}
    assert await api.done("w1", job_id, stale, query="delivery=1") == {"result": "ignored"}
    assert await api.chunk("w1", job_id, "fresh", query="delivery=2") == {"result": "accepted"}
    assert await api.chunk("w1", job_id, "sdk") == {"result": "accepted"}
    fresh = {"status": "IN_PROGRESS", "output": "fresh 50%"}
    assert await api.done("w1", job_id, fresh, query="delivery=2") == {"result": "progress"}
    assert (await api.gateway.backend.get_job(api.endpoint, job_id)).progress == "fresh 50%"
    await api.done("w1", job_id, {"output": None}, stream=True, query="delivery=2")
    assert (await api.status(job_id))["output"] == ["fresh", "sdk"]
    counters = await api.gateway.backend.counters(api.endpoint)
    assert counters["ignoredResults"] == 2


@pytest.mark.parametrize("route", ["run", "runsync"])
async def test_a_full_queue_answers_429_and_keeps_nothing_of_the_refused_job(api, route):
    """jobs.maxQueued: beyond it a submit gets 429 with Retry-After, and nothing of it is
    stored (counted, queued or findable); once a worker takes one, submits are served again."""
    await api.register(maxQueued=2)
    queued = [await api.run({"n": n}) for n in range(2)]
    refused = await api.client.post(
        f"/v2/{api.endpoint}/{route}?wait=0", json={"input": {}}, headers=api.client_headers()
    )
    assert (refused.status, refused.headers["Retry-After"]) == (429, "1")
    assert "jobs.maxQueued" in (await refused.json())["error"]
    assert (await api.health())["jobs"]["inQueue"] == 2
    assert await api.gateway.backend.queued_job_ids(api.endpoint, 10) == queued
    await api.take("w1")
    assert await api.run({"n": 3})
    assert (await api.health())["jobs"]["inQueue"] == 2


async def test_a_submit_over_the_endpoints_input_limit_answers_413(api):
    await api.register(maxInputBytes=200)
    assert await api.run({"text": "x" * 100})
    refused = await api.client.post(
        f"/v2/{api.endpoint}/run", json={"input": {"text": "x" * 300}}, headers=api.client_headers()
    )
    assert refused.status == 413
    assert "jobs.maxInputBytes" in (await refused.json())["error"]
    assert (await api.health())["jobs"]["inQueue"] == 1


async def queue_figures(api) -> dict:
    response = await api.client.get(
        f"/admin/v1/endpoints/{api.endpoint}/queue", headers=api.admin_headers()
    )
    assert response.status == 200
    return await response.json()


async def test_a_low_priority_job_runs_only_when_no_other_job_waits(api):
    """policy.lowPriority, as RunPod documents it: queued apart, taken once no normal job
    waits, counted in inQueue but not in the load the autoscalers scale on."""
    low = [await api.run({"n": n}, policy={"lowPriority": True}) for n in range(2)]
    normal = [await api.run({"n": n}) for n in range(2)]
    figures = await queue_figures(api)
    assert (figures["inQueue"], figures["lowPriorityQueued"], figures["load"]) == (4, 2, 2)
    taken = [(await api.take("w1"))["id"] for _ in range(3)]
    assert taken == [*normal, low[0]]
    figures = await queue_figures(api)
    assert (figures["inQueue"], figures["lowPriorityQueued"], figures["load"]) == (1, 1, 3)
    assert await api.gateway.backend.queued_job_ids(api.endpoint, 10) == [low[1]]
    purged = await api.client.post(f"/v2/{api.endpoint}/purge-queue", headers=api.client_headers())
    assert (await purged.json())["removed"] == 1
    assert (await queue_figures(api))["lowPriorityQueued"] == 0


async def test_a_lost_low_priority_job_goes_back_to_the_head_of_its_own_queue(api):
    await api.register(heartbeatIntervalSeconds=0.2, heartbeatMisses=2)
    low = await api.run({}, policy={"lowPriority": True})
    assert (await api.take("w1"))["id"] == low
    later = await api.run({}, policy={"lowPriority": True})
    await api.wait_status(low, "IN_QUEUE")  # w1 went silent
    normal = await api.run({})
    assert (await queue_figures(api))["lowPriorityQueued"] == 2
    assert [(await api.take("w2"))["id"] for _ in range(3)] == [normal, low, later]


async def list_jobs(api, query: str = "", status: int = 200) -> dict:
    response = await api.client.get(f"/v2/{api.endpoint}/jobs{query}", headers=api.client_headers())
    assert response.status == status, await response.text()
    return await response.json()


async def test_the_jobs_listing_pages_newest_first_and_filters_by_status(api):
    submitted = [await api.run({"n": n}) for n in range(5)]
    for _ in range(2):
        job = await api.take("w1")
        await api.done("w1", job["id"], {"output": "ok"})
    everything = await list_jobs(api)
    assert [j["id"] for j in everything["jobs"]] == submitted[::-1]
    assert "nextCursor" not in everything
    done = (await list_jobs(api, "?status=COMPLETED"))["jobs"]
    assert [(j["id"], j["workerId"]) for j in done] == [(i, "w1") for i in submitted[1::-1]]
    assert all(j["executionTime"] >= 0 and j["createdAt"] > 0 for j in done)
    pages, query = [], "?limit=2"
    while True:
        page = await list_jobs(api, query)
        pages.append([j["id"] for j in page["jobs"]])
        if "nextCursor" not in page:
            break
        query = f"?limit=2&cursor={page['nextCursor']}"
    assert [i for page in pages for i in page] == submitted[::-1]
    assert max(len(page) for page in pages) == 2


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("?status=DONE", "status must be one of"),
        ("?limit=0", "limit must be between"),
        ("?cursor=bm90LWEtY3Vyc29y", "cursor is not one this gateway gave out"),
    ],
    ids=["status", "limit", "cursor"],
)
async def test_a_bad_jobs_listing_query_is_a_400(api, query, message):
    assert message in (await list_jobs(api, query, status=400))["error"]
