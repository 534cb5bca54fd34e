"""Our result posting against the runpod SDK's own `handle_job`, both posting to one recording
server: the same requests (path, query, body) for every handler shape, plus the take our post
may carry and the jobs handed over in its answer."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from runpod.http_client import AsyncClientSession
from runpod.serverless.modules import rp_http, rp_job

from handler_worker import results
from tests.processes import free_port

JOB = {"id": "job-1", "input": {"n": 3}}


def plain(job):
    return {"twice": job["input"]["n"] * 2}


def failing(job):
    raise ValueError("boom")


def error_dict(job):
    return {"error": "handled badly"}


def streaming(job):
    for n in range(job["input"]["n"]):
        yield {"chunk": n}


def streaming_error(job):
    yield {"chunk": 0}
    yield {"error": "stream broke"}


async def async_plain(job):
    return [job["input"]["n"], "ä"]


HANDLERS = {
    "plain": ({}, plain),
    "failing": ({}, failing),
    "error-dict": ({}, error_dict),
    "async": ({}, async_plain),
    "stream": ({}, streaming),
    "stream-aggregate": ({"return_aggregate_stream": True}, streaming),
    "stream-error": ({}, streaming_error),
    "refresh": ({"refresh_worker": True}, plain),
}


class Recorder:
    def __init__(self, answer_jobs: list[dict] | None = None):
        self.requests: list[tuple[str, dict, object]] = []
        self.answer_jobs = answer_jobs or []

    async def handle(self, request: web.Request) -> web.Response:
        body = json.loads(await request.text())
        query = dict(parse_qsl(request.query_string))
        self.requests.append((request.path, query, body))
        if "take" in query:
            return web.json_response({"result": "accepted", "jobs": self.answer_jobs})
        return web.json_response({"result": "accepted"})


@pytest.fixture
async def recorder(monkeypatch):
    recorder = Recorder([{"id": "job-2", "input": {}}])
    app = web.Application()
    app.router.add_post("/{kind}/{job}", recorder.handle)
    server = TestServer(app)
    await server.start_server()
    base = str(server.make_url(""))
    monkeypatch.setattr(rp_http, "JOB_DONE_URL", f"{base}/done/$ID?gpu=x")
    monkeypatch.setattr(rp_http, "JOB_STREAM_URL", f"{base}/stream/$ID?gpu=x")
    yield recorder
    await server.close()


def without_take(requests):
    return [
        (path, {k: v for k, v in query.items() if k not in ("take", "capacity")}, body)
        for path, query, body in requests
    ]


@pytest.mark.parametrize("name", list(HANDLERS))
async def test_our_posts_are_the_sdks(recorder, name):
    extra, handler = HANDLERS[name]
    config = {"handler": handler, **extra}
    async with AsyncClientSession() as session:
        await rp_job.handle_job(session, config, dict(JOB))
        sdk = list(recorder.requests)
        recorder.requests.clear()
        run = results.runner(rp_http.JOB_DONE_URL, capacity=None)
        await run(session, config, dict(JOB), lambda refresh: 0)
    assert recorder.requests == sdk
    assert sdk[-1][0] == "/done/job-1"


async def test_chunks_name_the_delivery_they_are_of(recorder):
    """A chunk of a delivery the gateway no longer runs is told apart, as its result is."""
    async with AsyncClientSession() as session:
        run = results.runner(rp_http.JOB_DONE_URL, capacity=None)
        await run(session, {"handler": streaming}, {**JOB, "delivery": 2}, lambda refresh: 0)
    posted = [(path, query.get("delivery"), body) for path, query, body in recorder.requests]
    chunks = [("/stream/job-1", "2", {"output": {"chunk": n}}) for n in range(3)]
    assert posted == [*chunks, ("/done/job-1", "2", {"output": []})]


@pytest.mark.parametrize(
    ("take", "capacity", "query", "handed"),
    [
        (0, None, {"gpu": "x", "isStream": "false"}, []),
        (1, None, {"gpu": "x", "isStream": "false", "take": "1"}, ["job-2"]),
        (1, 4, {"gpu": "x", "isStream": "false", "take": "1", "capacity": "4"}, ["job-2"]),
    ],
    ids=["no-take", "take", "take-with-capacity"],
)
async def test_a_result_post_carries_the_take_and_returns_what_was_handed_over(
    recorder, take, capacity, query, handed
):
    async with AsyncClientSession() as session:
        run = results.runner(rp_http.JOB_DONE_URL, capacity)
        jobs = await run(session, {"handler": plain}, dict(JOB), lambda refresh: take)
    assert recorder.requests == [("/done/job-1", query, {"output": {"twice": 6}})]
    assert [job["id"] for job in jobs] == handed


async def test_a_result_that_is_not_json_is_logged_not_raised(recorder, caplog):
    async with AsyncClientSession() as session:
        jobs = await results.post_result(session, rp_http.JOB_DONE_URL, {"x": {1, 2}}, "j", True)
    assert jobs == [] and recorder.requests == []
    assert "not JSON" in caplog.text


async def post_to(handle) -> list[dict]:
    """A result posted (taking one job) to a gateway answering with `handle`."""
    app = web.Application()
    app.router.add_post("/done/{job}", handle)
    server = TestServer(app)
    await server.start_server()
    try:
        async with AsyncClientSession() as session:
            url = str(server.make_url("/done/j?x=1"))
            return await results.post_result(session, url, {"output": 1}, "j", True)
    finally:
        await server.close()


@pytest.mark.parametrize(("status", "posts"), [(500, 3), (501, 3), (400, 1), (401, 1)])
async def test_server_errors_are_retried_and_refusals_are_not(status, posts, monkeypatch):
    monkeypatch.setattr(results, "RESULT_BACKOFF_S", (0.0, 0.0))
    seen = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(await request.text())
        return web.json_response({"error": "no"}, status=status)

    assert await post_to(handle) == []
    assert len(seen) == posts


async def test_a_result_is_posted_again_while_the_gateway_answers_503(monkeypatch):
    """Fault table: a Redis restart outlasted the SDK's three tries in 1.5 s; the result was
    dropped and the job, presumed lost, ran again. 503 (and no answer) is retried for long."""
    monkeypatch.setattr(results, "RESULT_BACKOFF_S", (0.001, 0.001))
    seen = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(await request.text())
        if len(seen) <= 6:
            return web.json_response({"error": "unavailable"}, status=503)
        return web.json_response({"result": "accepted", "jobs": [{"id": "next", "input": {}}]})

    handed = await post_to(handle)
    assert (len(seen), [job["id"] for job in handed]) == (7, ["next"])


async def test_a_result_gives_up_once_the_gateway_stayed_away_long(monkeypatch, caplog):
    monkeypatch.setattr(results, "RESULT_BACKOFF_S", (0.001, 0.001))
    monkeypatch.setattr(results, "RESULT_UNAVAILABLE_S", 0.3)
    async with AsyncClientSession() as session:  # nothing listens there
        url = f"http://127.0.0.1:{free_port()}/done/j?x=1"
        assert await results.post_result(session, url, {"output": 1}, "j", True) == []
    assert "failed to return its result" in caplog.text


@pytest.mark.parametrize(("job", "suffix"), [({"id": "j", "delivery": 3}, "&delivery=3"),
                                             ({"id": "j"}, "&isStream=false"),
                                             ({"id": "j", "delivery": "3"}, "&isStream=false")])  # fmt: skip
def test_a_result_names_the_delivery_it_is_of(job, suffix):
    url = results.result_url(
        "http://gw/done/$ID?gpu=x", "j", False, 0, None, results.delivery_of(job)
    )
    assert url.endswith(suffix)
