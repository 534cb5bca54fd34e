"""The script pipe against a real redis-server: answers in order under concurrency, a lost script
loaded again, a script error failing only its call, and a connection given up when in doubt."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from handler_gateway.backends.pipes import ScriptPipe
from tests.gateway.conftest import redis_url
from tests.processes import RedisServer

ECHO = "return ARGV[1]"
FAIL = "return redis.error_reply('boom ' .. ARGV[1])"


@pytest.fixture
async def client():
    redis = aioredis.Redis.from_url(redis_url(), decode_responses=True)
    yield redis
    await redis.aclose()


@pytest.fixture
async def pipe(client):
    pipe = ScriptPipe(client)
    yield pipe
    await pipe.close()


async def test_concurrent_calls_each_get_their_own_answer(client, pipe):
    echo = client.register_script(ECHO)
    answers = await asyncio.gather(*(pipe.run(echo, [], [n]) for n in range(300)))
    assert answers == [str(n) for n in range(300)]


async def test_a_script_the_server_lost_is_loaded_again(client, pipe):
    echo = client.register_script(ECHO)
    assert await pipe.run(echo, [], ["a"]) == "a"
    await client.script_flush()
    assert await pipe.run(echo, [], ["b"]) == "b"


async def test_a_script_error_fails_its_call_alone(client, pipe):
    echo, fail = client.register_script(ECHO), client.register_script(FAIL)
    calls = [pipe.run(fail if n == 5 else echo, [], [n]) for n in range(10)]
    answers = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(answers[5], ResponseError) and "boom 5" in str(answers[5])
    assert [a for n, a in enumerate(answers) if n != 5] == [str(n) for n in range(10) if n != 5]
    assert await pipe.run(echo, [], ["after"]) == "after"


async def test_a_cancelled_call_leaves_the_order_of_the_others(client, pipe):
    echo = client.register_script(ECHO)
    await pipe.run(echo, [], ["loaded"])
    first = asyncio.ensure_future(pipe.run(echo, [], ["first"]))
    second = asyncio.ensure_future(pipe.run(echo, [], ["second"]))
    await asyncio.sleep(0)  # both written
    first.cancel()
    assert await second == "second"
    assert await pipe.run(echo, [], ["third"]) == "third"


async def test_no_answer_in_time_gives_the_connection_up_and_the_next_call_connects(client):
    pipe = ScriptPipe(client, timeout=0.2)
    echo = client.register_script(ECHO)
    try:
        assert await pipe.run(echo, [], ["before"]) == "before"
        await client.execute_command("CLIENT", "PAUSE", 600, "ALL")
        with pytest.raises(RedisTimeoutError):
            await pipe.run(echo, [], ["paused"])
        await asyncio.sleep(0.6)
        assert await pipe.run(echo, [], ["after"]) == "after"
    finally:
        await pipe.close()


async def test_a_connection_the_server_closed_fails_waiting_calls_and_the_next_connects(tmp_path):
    server = RedisServer(tmp_path, appendfsync="no").start()
    redis = aioredis.Redis.from_url(server.url, decode_responses=True)
    admin = aioredis.Redis.from_url(server.url, decode_responses=True)
    pipe = ScriptPipe(redis)
    echo = redis.register_script(ECHO)
    slow = redis.register_script("redis.call('SET', 'k', ARGV[1]) return ARGV[1]")
    try:
        assert await pipe.run(echo, [], ["before"]) == "before"
        await admin.execute_command("CLIENT", "PAUSE", 2000, "WRITE")  # holds the write script
        waiting = asyncio.ensure_future(pipe.run(slow, ["k"], ["held"]))
        await asyncio.sleep(0.1)
        await admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        with pytest.raises(RedisConnectionError):
            await waiting
        await admin.execute_command("CLIENT", "UNPAUSE")
        assert await pipe.run(echo, [], ["after"]) == "after"
    finally:
        await pipe.close()
        await redis.aclose()
        await admin.aclose()
        server.kill()


async def test_a_wait_written_behind_a_script_answers_with_it_and_is_no_stall(client, pipe):
    """A WAIT blocks the connection by design: calls written behind it waited for it, not
    for a stalled Redis (the shared Redis has no replica: WAIT runs to its timeout)."""
    echo = client.register_script(ECHO)
    waited = asyncio.ensure_future(pipe.run(echo, [], ["job"], then=("WAIT", 1, 700)))
    await asyncio.sleep(0)
    behind = await pipe.run(echo, [], ["behind"])
    assert (await waited, behind) == (("job", 0), "behind")
    assert pipe.stalled_until == 0.0


async def test_a_connection_given_up_goes_back_to_the_pool_with_its_read_timeout(client):
    pipe = ScriptPipe(client, timeout=0.2)
    echo = client.register_script(ECHO)
    await pipe.run(echo, [], ["x"])
    connection = pipe._connection
    assert connection.socket_timeout is None  # while the pipe holds it: its reads wait
    await pipe.close()
    assert connection.socket_timeout is not None
