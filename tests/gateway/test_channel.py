"""The job channel (ours; handler_worker's loop uses it): takes and results over one WebSocket,
each request answered once under its `seq`, on every backend."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from tests.gateway.conftest import OTHER_TOKEN, WORKER_TOKEN


async def open_channel(api, worker: str = "w1", query: str = "", token: str = WORKER_TOKEN):
    return await api.client.ws_connect(
        f"/v2/{api.endpoint}/job-channel/{worker}{query}", headers=api.worker_headers(token)
    )


class Channel:
    """A worker's side of the channel: requests by seq, answers matched as they come."""

    def __init__(self, socket):
        self.socket = socket
        self.seq = 0

    async def send(self, **message) -> int:
        self.seq += 1
        await self.socket.send_str(json.dumps({"seq": self.seq, **message}))
        return self.seq

    async def answer(self, timeout: float = 5.0) -> dict:
        return json.loads((await self.socket.receive(timeout)).data)

    async def request(self, **message) -> dict:
        seq = await self.send(**message)
        answer = await self.answer()
        assert answer.pop("seq") == seq
        return answer


@pytest.fixture
async def channel(api):
    socket = await open_channel(api)
    yield Channel(socket)
    await socket.close()


async def test_a_take_and_a_result_with_the_next_take(api, channel):
    first, second = [await api.run({"n": n}) for n in range(2)]
    assert await channel.request(take=1) == {
        "jobs": [{"id": first, "input": {"n": 0}, "delivery": 1}]
    }
    answer = await channel.request(done=first, result={"output": "one"}, take=1)
    assert answer == {
        "result": "accepted",
        "jobs": [{"id": second, "input": {"n": 1}, "delivery": 1}],
    }
    assert (await api.status(first))["output"] == "one"
    view = await api.status(second)
    assert (view["status"], view["workerId"]) == ("IN_PROGRESS", "w1")
    # Nothing queued: the take long-polls for the gateway's hold, then answers no jobs.
    assert await channel.request(done=second, result={"output": 2}, take=1) == {
        "result": "accepted",
        "jobs": [],
    }


async def test_requests_run_at_once_and_are_answered_by_seq(api, channel):
    """A take long-polls while a result on the same socket is answered first."""
    job = await api.run({})
    await channel.request(take=1)
    waiting = await channel.send(take=1)
    posted = await channel.send(done=job, result={"output": 1})
    assert await channel.answer() == {"seq": posted, "result": "accepted", "jobs": []}
    later = await api.run({"n": 2})
    assert await channel.answer() == {
        "seq": waiting,
        "jobs": [{"id": later, "input": {"n": 2}, "delivery": 1}],
    }


async def test_a_result_sent_again_gets_the_jobs_its_unread_answer_carried(api, channel):
    first, second = [await api.run({"n": n}) for n in range(2)]
    await channel.request(take=1)
    handed = (await channel.request(done=first, result={"output": 1}, take=1))["jobs"]
    again = await channel.request(done=first, result={"output": 1}, take=1)
    assert again == {"result": "duplicate", "jobs": handed}


async def test_the_channel_keeps_to_the_capacity_it_was_opened_with(api):
    channel = Channel(await open_channel(api, query="?capacity=1"))
    try:
        first, second = [await api.run({"n": n}) for n in range(2)]
        assert [job["id"] for job in (await channel.request(take=2))["jobs"]] == [first]
        waiting = await channel.send(take=1)  # full: waits until its job ends
        await asyncio.sleep(0.1)
        assert (await api.status(second))["status"] == "IN_QUEUE"
        await api.done("w1", first, {"output": 1})
        assert await channel.answer() == {
            "seq": waiting,
            "jobs": [{"id": second, "input": {"n": 1}, "delivery": 1}],
        }
    finally:
        await channel.socket.close()


async def test_a_closed_channel_claims_nothing_more(api, channel):
    """Its waiting take ends with the socket: a job submitted after is there for others."""
    await channel.send(take=1)
    await asyncio.sleep(0.1)
    await channel.socket.close()
    await asyncio.sleep(0.1)
    job = await api.run({})
    await asyncio.sleep(0.2)
    assert (await api.status(job))["status"] == "IN_QUEUE"
    assert (await api.take("w2"))["id"] == job


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ("not json", "not valid JSON"),
        ("[1]", "must be a JSON object"),
        ('{"seq": 7}', 'carries "done"'),
        ('{"seq": 7, "take": -1}', "take must be an integer"),
        ('{"seq": 7, "take": "1"}', "take must be an integer"),
        ('{"seq": 7, "done": "", "result": {}}', "done must be a job id"),
        ('{"seq": 7, "done": "j", "result": [1]}', "result must be a JSON object"),
        ('{"seq": 7, "done": "j", "result": {}, "delivery": "1"}', "delivery must be an integer"),
    ],
)
async def test_a_bad_request_is_answered_with_an_error_and_the_channel_stays(
    api, channel, message, error
):
    await channel.socket.send_str(message)
    answer = await channel.answer()
    assert answer["status"] == 400 and error in answer["error"]
    assert answer["seq"] == (7 if message.startswith('{"seq": 7') else None)
    job = await api.run({})
    assert (await channel.request(take=1))["jobs"][0]["id"] == job


async def test_a_result_for_an_unknown_job_is_ignored(api, channel):
    answer = await channel.request(done="nope", result={"output": 1})
    assert answer == {"result": "ignored", "jobs": []}


async def test_a_binary_frame_is_answered_with_an_error(api, channel):
    await channel.socket.send_bytes(b"{}")
    answer = await channel.answer()
    assert (answer["status"], answer["seq"]) == (400, None)


@pytest.mark.parametrize(
    ("endpoint", "token", "status"),
    [("ep", None, 401), ("ep", "wrong-token-0123456789", 401), ("nope", WORKER_TOKEN, 404)],
)
async def test_the_handshake_is_refused_with_a_json_error(api, endpoint, token, status):
    headers = {} if token is None else api.worker_headers(token)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await api.client.ws_connect(f"/v2/{endpoint}/job-channel/w1", headers=headers)
    assert refused.value.status == status


async def test_another_endpoints_worker_token_is_forbidden(api):
    await api.register("other", workerToken=OTHER_TOKEN)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await open_channel(api, token=OTHER_TOKEN)
    assert refused.value.status == 403


async def test_a_plain_request_is_told_to_upgrade(api):
    response = await api.client.get(
        f"/v2/{api.endpoint}/job-channel/w1", headers=api.worker_headers()
    )
    assert response.status == 400
    assert "WebSocket" in (await response.json())["error"]


async def test_a_result_sent_just_before_the_socket_closes_is_stored(api, channel):
    """Closing does not cancel work under way: the result is stored and observed."""
    job = await api.run({})
    await channel.request(take=1)
    await channel.send(done=job, result={"output": "kept"}, take=1)
    await channel.socket.close()
    view = await api.wait_status(job, "COMPLETED")
    assert view["output"] == "kept"
    assert (await api.health())["jobs"]["completed"] == 1


async def test_closing_ends_the_channels_waiting_takes(api, channel):
    await channel.send(take=1)
    await asyncio.sleep(0.05)
    assert [t.worker for t in api.gateway._takers.get(api.endpoint, [])] == ["w1"]
    await channel.socket.close()
    for _ in range(50):
        if not api.gateway._takers.get(api.endpoint):
            break
        await asyncio.sleep(0.01)
    assert not api.gateway._takers.get(api.endpoint)


async def test_a_result_over_the_size_limit_is_refused_and_the_channel_stays(api, channel):
    job = await api.run({})
    await channel.request(take=1)
    big = "x" * (1024 * 1024 + 8192)  # the app's body limit is 1 MiB
    answer = await channel.request(done=job, result={"output": big})
    assert answer["status"] == 413 and "too large" in answer["error"]
    assert (await channel.request(done=job, result={"output": 1}))["result"] == "accepted"


@pytest.mark.parametrize("over", ["http", "channel"])
async def test_nan_and_infinity_in_a_result_read_back_as_null(api, channel, over):
    """Python writes them into JSON; the gateway stores null, so clients get valid JSON."""
    job = await api.run({})
    await channel.request(take=1)
    output = {"loss": float("nan"), "bound": float("inf"), "low": float("-inf"), "n": 1.5}
    if over == "http":
        await api.done("w1", job, {"output": output})
    else:
        await channel.socket.send_str(
            json.dumps({"seq": 1, "done": job, "result": {"output": output}})
        )
        await channel.answer()
    response = await api.client.get(
        f"/v2/{api.endpoint}/status/{job}", headers=api.client_headers()
    )
    assert json.loads(await response.text(), parse_constant=pytest.fail)["output"] == {
        "loss": None,
        "bound": None,
        "low": None,
        "n": 1.5,
    }


async def test_shutting_down_closes_the_channels_as_going_away(api, channel):
    await api.client.app.shutdown()
    message = await channel.socket.receive(5)
    assert (message.type, message.data) == (aiohttp.WSMsgType.CLOSE, aiohttp.WSCloseCode.GOING_AWAY)


async def test_a_result_of_another_delivery_is_ignored(api, channel):
    job = await api.run({})
    assert (await channel.request(take=1))["jobs"][0]["delivery"] == 1
    stale = await channel.request(done=job, result={"output": 0}, delivery=7)
    assert stale["result"] == "ignored"
    current = await channel.request(done=job, result={"output": 1}, delivery=1)
    assert current["result"] == "accepted"
