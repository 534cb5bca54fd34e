"""One Redis connection that carries the hot path's script calls pipelined: each caller writes
its EVALSHA at once and one reader answers them in order (redis-py's per-command path, with its
pool, retry and per-call timeout task, costs about twice the CPU per call)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

try:  # redis[hiredis]: packs a command in C, ~8x faster than redis-py's own packer
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - the gateway extra installs hiredis
    _hiredis_pack = None


# An answer that took longer than this means Redis was not answering (paused, swapping, a slow
# script): see `ScriptPipe.stalled_until`.
STALL_S = 0.5


class Waiting(NamedTuple):
    """A call written on the pipe: its answer to come, and when it was sent (None: it blocks
    by design, as WAIT does)."""

    answer: asyncio.Future[Any]
    sent: float | None


class ScriptPipe:
    """Runs registered scripts on one connection taken from `redis`'s pool and kept.

    Replies come back in the order the calls were written, so the connection is given up (and
    every call waiting on it fails with a connection error) as soon as its order is in doubt: a
    read failed, or a call got no answer within `timeout` seconds. The next call connects again.
    """

    def __init__(self, redis: aioredis.Redis, timeout: float = 10.0):
        self.redis = redis
        self.timeout = timeout
        self._connection: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: collections.deque[Waiting] = collections.deque()
        # When (time.time()) Redis last answered after not answering for STALL_S: until then
        # nothing that happened was seen (a worker's ping waited with the rest).
        self.stalled_until = 0.0
        self._opening = asyncio.Lock()

    async def run(self, script: Any, keys: list[Any], args: list[Any]) -> Any:
        """`script(keys=keys, args=args)`, as redis-py's Script would run it (loaded again
        when the server lost it: a restart, a failover, SCRIPT FLUSH)."""
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            return await self._call(command)
        except NoScriptError:
            pass
        await self.redis.script_load(script.script)
        return await self._call(command)

    async def command(self, *command: Any, blocks: bool = False) -> Any:
        """A plain command on the pipe's connection (WAIT: for the writes made on it; one that
        `blocks` by design is no sign of a stall)."""
        return await self._call(command, blocks)

    async def _call(self, command: tuple[Any, ...], blocks: bool = False) -> Any:
        connection = await self._open()
        packed = _hiredis_pack(command) if _hiredis_pack else connection.pack_command(*command)
        answer = asyncio.get_running_loop().create_future()
        self._waiting.append(Waiting(answer, None if blocks else time.monotonic()))
        try:  # written before the first suspension: `_waiting` is in the order on the wire
            await connection.send_packed_command(packed, check_health=False)
        except BaseException as exc:
            answer.cancel()
            self._give_up(connection, exc if isinstance(exc, Exception) else RedisConnectionError())
            raise
        try:
            async with asyncio.timeout(self.timeout):
                return await answer
        except TimeoutError:
            self._give_up(connection, RedisTimeoutError("no answer from Redis in time"))
            raise RedisTimeoutError(f"no answer from Redis in {self.timeout:g} s") from None

    async def _open(self) -> Any:
        if self._connection is not None:
            return self._connection
        async with self._opening:
            if self._connection is None:
                connection = await self.redis.connection_pool.get_connection()
                # Sends are never suspended past the write (the caller's timeout covers the
                # answer), so no per-send timeout task; reads wait for as long as calls do.
                connection.socket_timeout = None
                self._connection = connection
                self._reader = asyncio.get_running_loop().create_task(self._read(connection))
        return self._connection

    async def _read(self, connection: Any) -> None:
        try:
            while True:
                try:
                    reply: Any = await connection.read_response()  # no socket timeout: waits
                except ResponseError as exc:  # the script failed: its caller raises it
                    reply = exc
                if not self._waiting:  # an answer nobody asked for: the order is lost
                    raise RedisConnectionError("unexpected reply from Redis")
                answer, sent = self._waiting.popleft()
                if sent is not None and time.monotonic() - sent > STALL_S:
                    self.stalled_until = time.time()
                if answer.done():  # its caller was cancelled or timed out
                    continue
                if isinstance(reply, ResponseError):
                    answer.set_exception(reply)
                else:
                    answer.set_result(reply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every waiting call fails with it
            self._give_up(connection, exc)

    def _give_up(self, connection: Any, error: Exception) -> None:
        if connection is not self._connection:
            return
        self._connection = None
        waiting, self._waiting = self._waiting, collections.deque()
        for answer, _ in waiting:
            if not answer.done():
                answer.set_exception(
                    error
                    if isinstance(error, (RedisConnectionError, RedisTimeoutError))
                    else RedisConnectionError(f"{type(error).__name__}: {error}")
                )
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        asyncio.get_running_loop().create_task(self._release(connection))

    async def _release(self, connection: Any) -> None:
        with contextlib.suppress(Exception):
            await connection.disconnect(nowait=True)
        with contextlib.suppress(Exception):
            await self.redis.connection_pool.release(connection)

    async def close(self) -> None:
        connection = self._connection
        if connection is not None:
            self._give_up(connection, RedisConnectionError("closed"))
            await self._release(connection)
