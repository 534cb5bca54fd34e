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
    read failed, or a call got no answer within `timeout` seconds. The next call connects again;
    callers that waited for a connect that failed meanwhile fail with it at once.
    """

    def __init__(self, redis: aioredis.Redis, timeout: float = 10.0):
        self.redis = redis
        self.timeout = timeout
        self._connection: Any = None
        self._socket_timeout: Any = None  # the connection's own, restored when given back
        self._reader: asyncio.Task[None] | None = None
        self._waiting: collections.deque[Waiting] = collections.deque()
        self._last_reply = 0.0  # time.monotonic() of the latest reply
        # When (time.time()) Redis last answered after not answering for STALL_S: until then
        # nothing that happened was seen (a worker's ping waited with the rest).
        self.stalled_until = 0.0
        self._opening = asyncio.Lock()
        self._open_failed: tuple[float, Exception] | None = None  # (when, why)
        self._releases: set[asyncio.Task[None]] = set()

    async def run(
        self, script: Any, keys: list[Any], args: list[Any], then: tuple[Any, ...] | None = None
    ) -> Any:
        """`script(keys=keys, args=args)`, as redis-py's Script would run it (loaded again
        when the server lost it: a restart, a failover, SCRIPT FLUSH). With `then` (a command
        that blocks by design, as WAIT), that command is written right behind the script on the
        same connection, and the answer is (the script's, `then`'s or the error it met)."""
        commands = [("EVALSHA", script.sha, len(keys), *keys, *args)]
        if then is not None:
            commands.append(then)
        for attempt in (1, 2):
            replies = await self._call(commands, blocking_last=then is not None)
            if isinstance(replies[0], NoScriptError) and attempt == 1:
                await self.redis.script_load(script.script)
                continue
            if isinstance(replies[0], Exception):
                raise replies[0]
            return replies[0] if then is None else (replies[0], replies[1])
        raise AssertionError("unreachable")  # pragma: no cover

    async def _call(self, commands: list[tuple[Any, ...]], blocking_last: bool) -> list[Any]:
        """The replies to `commands`, written together (an error reply as its exception)."""
        connection = await self._open()
        loop = asyncio.get_running_loop()
        answers = []
        packed = []
        for number, command in enumerate(commands, 1):
            blocks = blocking_last and number == len(commands)
            answers.append(loop.create_future())
            self._waiting.append(Waiting(answers[-1], None if blocks else time.monotonic()))
            packed.append(
                _hiredis_pack(command)
                if _hiredis_pack
                else b"".join(connection.pack_command(*command))
            )
        try:  # written before the first suspension: `_waiting` is in the order on the wire
            await connection.send_packed_command(b"".join(packed), check_health=False)
        except BaseException as exc:
            for answer in answers:
                answer.cancel()
            self._give_up(connection, exc if isinstance(exc, Exception) else RedisConnectionError())
            raise
        try:
            async with asyncio.timeout(self.timeout):
                return list(await asyncio.gather(*answers, return_exceptions=True))
        except TimeoutError:
            self._give_up(connection, RedisTimeoutError("no answer from Redis in time"))
            raise RedisTimeoutError(f"no answer from Redis in {self.timeout:g} s") from None

    async def _open(self) -> Any:
        if self._connection is not None:
            return self._connection
        asked = time.monotonic()
        async with self._opening:
            if self._connection is not None:
                return self._connection
            if self._open_failed is not None and self._open_failed[0] >= asked:
                raise self._open_failed[1]  # the connect this caller waited for failed
            try:
                async with asyncio.timeout(self.timeout):
                    connection = await self.redis.connection_pool.get_connection()
            except TimeoutError:
                error = RedisTimeoutError(f"no connection to Redis in {self.timeout:g} s")
                self._open_failed = (time.monotonic(), error)
                raise error from None
            except Exception as exc:
                self._open_failed = (time.monotonic(), exc)
                raise
            # Sends are never suspended past the write (the caller's timeout covers the
            # answer), so no per-send timeout task; reads wait for as long as calls do.
            self._socket_timeout, connection.socket_timeout = connection.socket_timeout, None
            self._connection = connection
            self._reader = asyncio.get_running_loop().create_task(self._read(connection))
        return self._connection

    async def _read(self, connection: Any) -> None:
        try:
            while True:
                try:
                    reply: Any = await connection.read_response()  # no socket timeout: waits
                except ResponseError as exc:  # the command failed: its caller gets it
                    reply = exc
                if not self._waiting:  # an answer nobody asked for: the order is lost
                    raise RedisConnectionError("unexpected reply from Redis")
                answer, sent = self._waiting.popleft()
                now = time.monotonic()
                # Late only counts from the reply before it: calls behind a WAIT waited for it.
                if sent is not None and now - max(sent, self._last_reply) > STALL_S:
                    self.stalled_until = time.time()
                self._last_reply = now
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

    def _give_up(self, connection: Any, error: Exception) -> asyncio.Task[None] | None:
        """Fail every call waiting on `connection` and give it back (the task doing so)."""
        if connection is not self._connection:
            return None
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
        release = asyncio.get_running_loop().create_task(
            self._release(connection, self._socket_timeout)
        )
        self._releases.add(release)
        release.add_done_callback(self._releases.discard)
        return release

    async def _release(self, connection: Any, socket_timeout: Any) -> None:
        with contextlib.suppress(Exception):
            await connection.disconnect(nowait=True)
        connection.socket_timeout = socket_timeout  # as the pool's other connections have it
        with contextlib.suppress(Exception):
            await self.redis.connection_pool.release(connection)

    async def close(self) -> None:
        connection = self._connection
        if connection is not None:
            release = self._give_up(connection, RedisConnectionError("closed"))
            if release is not None:
                await release
