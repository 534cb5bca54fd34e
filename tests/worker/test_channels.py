"""The worker's job channel against the real gateway app (memory backend, served in-process):
takes and results by seq, reconnection, a cancelled take handing nothing over, the HTTP fallback
for a gateway without the route, and result posts over it."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from handler_gateway.backends import open_backend
from handler_gateway.keys import Keys
from handler_gateway.operations import Timings
from handler_gateway.routes import GATEWAY, create_app
from handler_protocol.models import EndpointConfig, RunRequest
from handler_worker import channels, results
from handler_worker.channels import (
    ChannelRefused,
    ChannelUnavailable,
    ChannelUnsupported,
    JobChannel,
    channel_enabled,
    channel_fetch,
    channel_url,
)

TOKEN = "worker-token-0123456789"


@pytest.fixture
async def gateway():
    app = create_app(open_backend("memory://"), Keys.of(), Timings(take_hold=0.5))
    server = TestServer(app)
    await server.start_server()
    await app[GATEWAY].put_endpoint(EndpointConfig(id="ep", workerToken=TOKEN))
    yield server
    await server.close()


@pytest.fixture
async def session():
    async with aiohttp.ClientSession(headers={"Authorization": TOKEN}) as session:
        yield session


def url_of(server: TestServer, query: str = "") -> str:
    return str(server.make_url(f"/v2/ep/job-channel/w1{query}"))


async def submit(server: TestServer, job_input) -> str:
    return (await server.app[GATEWAY].submit("ep", RunRequest(input=job_input))).id


async def test_a_take_then_a_result_that_takes_the_next_job(gateway, session):
    channel = JobChannel(url_of(gateway))
    first, second = [await submit(gateway, {"n": n}) for n in range(2)]
    assert await channel.take(session, 1) == [{"id": first, "input": {"n": 0}, "delivery": 1}]
    handed = await channel.done(session, first, False, '{"output": "ä"}', 1)
    assert handed == [{"id": second, "input": {"n": 1}, "delivery": 1}]
    assert (await gateway.app[GATEWAY].job("ep", first)).output == "ä"
    await channel.close()


async def test_several_requests_share_one_socket(gateway, session):
    channel = JobChannel(url_of(gateway))
    takes = [asyncio.create_task(channel.take(session, 1)) for _ in range(3)]
    await asyncio.sleep(0.05)
    submitted = {await submit(gateway, {"n": n}) for n in range(3)}
    assert {job["id"] for take in takes for job in await take} == submitted
    assert len(channel._readers) == 1
    await channel.close()


async def test_a_refused_request_says_its_status(gateway, session):
    channel = JobChannel(url_of(gateway))
    with pytest.raises(ChannelRefused) as refused:
        await channel.take(session, 0)
    assert refused.value.status == 400
    await channel.close()


async def test_a_cancelled_take_closes_the_socket_and_nothing_is_handed_over(gateway, session):
    channel = JobChannel(url_of(gateway))
    take = asyncio.create_task(channel.take(session, 1))
    await asyncio.sleep(0.1)
    take.cancel()
    with pytest.raises(asyncio.CancelledError):
        await take
    job = await submit(gateway, {})
    await asyncio.sleep(0.1)
    assert (await gateway.app[GATEWAY].job("ep", job)).status == "IN_QUEUE"
    assert [taken["id"] for taken in await channel.take(session, 1)] == [job]  # connects again
    await channel.close()


async def test_requests_open_on_a_socket_that_closes_fail_and_the_next_one_reconnects(session):
    """A stand-in gateway closes the socket on the first request it reads."""
    opened = []

    async def handler(request):
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        opened.append(socket)
        async for message in socket:
            if len(opened) == 1:
                await socket.close()
            else:
                seq = json.loads(message.data)["seq"]
                await socket.send_json({"seq": seq, "jobs": []})
        return socket

    app = web.Application()
    app.router.add_get("/v2/ep/job-channel/w1", handler)
    async with TestServer(app) as server:
        channel = JobChannel(url_of(server))
        with pytest.raises(aiohttp.ClientError):
            await channel.take(session, 1)
        assert await channel.take(session, 1) == []
        assert len(opened) == 2
        await channel.close()


@pytest.mark.parametrize("refusal", [404, 405, 400])
async def test_a_gateway_without_the_channel_is_served_over_http(session, refusal):
    """An older gateway (404), RunPod's own API or a proxy that does not upgrade (400, 405)."""

    async def refuse(request):
        return web.Response(status=refusal)

    app = web.Application()
    app.router.add_route("*", "/v2/ep/job-channel/w1", refuse)
    async with TestServer(app) as server:
        channel = JobChannel(url_of(server))
        over_http = []

        async def fallback(session, count):
            over_http.append(count)
            return [{"id": "j", "input": {}}]

        fetch = channel_fetch(channel, fallback)
        assert await fetch(session, 2) == [{"id": "j", "input": {}}]
        assert (channel.usable(), over_http) == (False, [2])
        with pytest.raises(ChannelUnavailable):
            await channel.take(session, 1)
        await fetch(session, 1)
        assert over_http == [2, 1]


async def test_a_channel_that_cannot_be_opened_is_tried_again_later(session, monkeypatch):
    """A proxy's 503 at the handshake: HTTP serves this take, the channel the next one."""
    monkeypatch.setattr(channels, "RETRY_AFTER_FAILURE_S", 0.0)
    handshakes = []

    async def handler(request):
        handshakes.append(request)
        if len(handshakes) == 1:
            return web.Response(status=503)
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        async for message in socket:
            await socket.send_json({"seq": json.loads(message.data)["seq"], "jobs": []})
        return socket

    app = web.Application()
    app.router.add_get("/v2/ep/job-channel/w1", handler)
    async with TestServer(app) as server:
        channel = JobChannel(url_of(server))
        over_http = []

        async def fallback(session, count):
            over_http.append(count)
            return []

        fetch = channel_fetch(channel, fallback)
        assert (await fetch(session, 1), await fetch(session, 1)) == ([], [])
        assert (len(handshakes), over_http) == (2, [1])
        await channel.close()


async def test_a_result_unanswered_on_the_channel_goes_over_http(monkeypatch):
    monkeypatch.setattr(results, "RESULT_TIMEOUT_S", 0.05)
    posted = []

    async def never(body):
        await asyncio.sleep(3600)

    async def post(session, url, body, takes):
        posted.append(body)
        return []

    monkeypatch.setattr(results, "_post", post)
    assert await results.post_result(None, "http://gw/done", {"output": 1}, "j", True, never) == []
    assert posted == ['{"output": 1}']


async def test_refused_credentials_are_not_taken_for_a_missing_channel(gateway):
    async with aiohttp.ClientSession(headers={"Authorization": "wrong"}) as session:
        channel = JobChannel(url_of(gateway))
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await channel.take(session, 1)
        assert channel.usable()


@pytest.mark.parametrize(
    ("raised", "sends", "posts", "handed"),
    [
        (None, 1, 0, [{"id": "next"}]),
        (ChannelUnsupported("x"), 1, 1, [{"id": "over-http"}]),
        (ChannelUnavailable("x"), 1, 1, [{"id": "over-http"}]),
        (ChannelRefused(400, "bad"), 1, 0, []),
        (ChannelRefused(500, "bug"), 3, 0, []),
        (ChannelRefused(503, "no storage"), 5, 0, []),  # until RESULT_UNAVAILABLE_S is up
        (aiohttp.ServerDisconnectedError(), 1, 1, [{"id": "over-http"}]),  # then over HTTP
    ],
)
async def test_a_result_goes_over_the_channel_and_falls_back_or_retries_as_over_http(
    monkeypatch, raised, sends, posts, handed
):
    monkeypatch.setattr(results, "RESULT_BACKOFF_S", (0, 0))
    sent, posted = [], []

    async def send(body):
        sent.append(body)
        if len(sent) == 5:  # the gateway stayed away long enough
            monkeypatch.setattr(results, "RESULT_UNAVAILABLE_S", 0)
        if raised is not None:
            raise raised
        return [{"id": "next"}]

    async def post(session, url, body, takes):
        posted.append(body)
        return [{"id": "over-http"}]

    monkeypatch.setattr(results, "_post", post)
    answer = await results.post_result(None, "http://gw/done", {"output": 1}, "j", True, send)
    assert (len(sent), len(posted), answer) == (sends, posts, handed)
    assert set(sent + posted) == {'{"output": 1}'}


@pytest.mark.parametrize(
    ("take_url", "expected"),
    [
        ("http://gw/v2/ep/job-take/w1?capacity=2", "http://gw/v2/ep/job-channel/w1?capacity=2"),
        ("http://gw/v2/ep/job-take/w1", "http://gw/v2/ep/job-channel/w1"),
        ("https://api.runpod.ai/v2/ep/job-take/w1", "https://api.runpod.ai/v2/ep/job-channel/w1"),
        ("None", None),
    ],
)
def test_the_channel_url_comes_from_the_take_url(take_url, expected):
    assert channel_url(take_url) == expected


@pytest.mark.parametrize(
    ("value", "enabled"), [(None, True), ("1", True), ("0", False), ("off", False), ("no", False)]
)
def test_the_channel_can_be_turned_off(value, enabled):
    assert channel_enabled({} if value is None else {"HANDLER_JOB_CHANNEL": value}) is enabled
