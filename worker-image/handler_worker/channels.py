"""The job channel: one WebSocket to the gateway (its `job-channel` route) carrying this worker's
takes and results, a frame each way per job instead of an HTTP request. While it cannot be
opened (no such route: an older gateway, RunPod's own API; a proxy's refusal; no answer), HTTP
serves as the SDK's, and the channel is tried again later; HANDLER_JOB_CHANNEL=0 turns it off.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from handler_worker.loader import env_flag

log = logging.getLogger("handler_worker")

CHANNEL_ENV = "HANDLER_JOB_CHANNEL"
TAKE_PATH, CHANNEL_PATH = "/job-take/", "/job-channel/"
CONNECT_TIMEOUT_S = 10.0
RETRY_AFTER_FAILURE_S = 30.0  # HTTP serves this long after the channel could not be opened
RETRY_AFTER_NO_ROUTE_S = 300.0  # ... or after the server said it has no such route
HEARTBEAT_S = 20.0  # pings on an idle channel: a vanished gateway is noticed


class ChannelUnavailable(Exception):
    """No job channel for now (it could not be opened): the HTTP routes serve this worker until
    the channel is tried again."""


class ChannelUnsupported(ChannelUnavailable):
    """The server has no job channel route (an older gateway, RunPod's own API)."""


class ChannelRefused(Exception):
    """The gateway answered a request with an error; `status` is the HTTP status it stands for
    (the loop backs off longer on 429, the result post gives up on a 4xx)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def channel_url(take_url: str) -> str | None:
    """The job channel of the worker whose take URL (`{base}/v2/{endpoint}/job-take/{worker}?
    ...`, its query kept: `capacity`) this is; None when that URL is not a gateway's."""
    if TAKE_PATH not in take_url:
        return None
    return take_url.replace(TAKE_PATH, CHANNEL_PATH, 1)


def channel_enabled(env: Mapping[str, str]) -> bool:
    return env_flag(env, CHANNEL_ENV, default=True)


class JobChannel:
    """Requests over one WebSocket, each answered by the frame that echoes its `seq`; several
    are in flight at once (one per slot). Connected on first use and again after it closes;
    the requests open on a socket that closes fail with a connection error (their callers
    retry: a result posted again is answered as a duplicate, with the jobs handed over again)."""

    def __init__(self, url: str):
        self.url = url
        self._unavailable_until = 0.0  # monotonic: HTTP serves until then
        self._socket: aiohttp.ClientWebSocketResponse | None = None
        self._connecting: asyncio.Lock | None = None
        self._readers: set[asyncio.Task[None]] = set()
        self._pending: dict[int, tuple[Any, asyncio.Future[dict[str, Any]]]] = {}
        self._seq = 0

    def usable(self) -> bool:
        """Whether to use the channel now (not while HTTP serves after a failed opening)."""
        return asyncio.get_running_loop().time() >= self._unavailable_until

    async def take(self, session: aiohttp.ClientSession, count: int) -> list[dict[str, Any]]:
        """A take long-poll for up to `count` jobs ([] when the gateway's hold ends)."""
        answer = await self._request(session, lambda seq: json.dumps({"seq": seq, "take": count}))
        return list(answer.get("jobs") or [])

    async def done(
        self,
        session: aiohttp.ClientSession,
        job_id: str,
        is_stream: bool,
        result: str,
        take: int,
        delivery: int | None = None,
    ) -> list[dict[str, Any]]:
        """Post a result (already JSON) of `delivery` and take up to `take` jobs with it."""

        def frame(seq: int) -> str:
            stream = "true" if is_stream else "false"
            head = f'{{"seq":{seq},"done":{json.dumps(job_id)},"isStream":{stream},"take":{take}'
            if delivery is not None:
                head += f',"delivery":{delivery}'
            return f'{head},"result":{result}}}'

        answer = await self._request(session, frame)
        return list(answer.get("jobs") or [])

    async def close(self) -> None:
        if self._socket is not None:
            await self._socket.close()
        for reader in list(self._readers):
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)

    # -- the socket --------------------------------------------------------------------------
    async def _request(
        self, session: aiohttp.ClientSession, frame: Callable[[int], str]
    ) -> dict[str, Any]:
        socket = await self._connect(session)
        self._seq += 1
        seq = self._seq
        answered = asyncio.get_running_loop().create_future()
        self._pending[seq] = (socket, answered)
        try:
            await socket.send_str(frame(seq))
            answer = await answered
        except asyncio.CancelledError:
            # What the gateway hands over in the answer would have nowhere to go: a closed
            # socket makes it give those jobs back (the socket's other requests are retried).
            await socket.close()
            raise
        finally:
            self._pending.pop(seq, None)
        if "error" in answer:
            raise ChannelRefused(int(answer.get("status") or 500), str(answer["error"]))
        return answer

    async def _connect(self, session: aiohttp.ClientSession) -> aiohttp.ClientWebSocketResponse:
        if self._socket is not None and not self._socket.closed:
            return self._socket
        if not self.usable():
            raise ChannelUnavailable(self.url)
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._socket is None or self._socket.closed:
                if not self.usable():  # another request's opening just failed
                    raise ChannelUnavailable(self.url)
                socket = await self._open(session)
                self._socket = socket
                reader = asyncio.create_task(self._read(socket))
                self._readers.add(reader)
                reader.add_done_callback(self._readers.discard)
        assert self._socket is not None
        return self._socket

    async def _open(self, session: aiohttp.ClientSession) -> aiohttp.ClientWebSocketResponse:
        """A new socket; ChannelUnavailable (HTTP serves for a while) when it cannot be had but
        HTTP may work: no such route, a proxy's or an overloaded server's refusal, no answer."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                return await session.ws_connect(
                    self.url, heartbeat=HEARTBEAT_S, max_msg_size=0, compress=0
                )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (401, 403):  # the credentials: HTTP would be refused as well
                raise
            if exc.status < 500 and exc.status not in (408, 429):  # a route it does not have
                self._unavailable_until = loop.time() + RETRY_AFTER_NO_ROUTE_S
                log.info("the gateway has no job channel: takes and results use HTTP")
                raise ChannelUnsupported(self.url) from None
            failure: Exception = exc
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            failure = exc
        self._unavailable_until = loop.time() + RETRY_AFTER_FAILURE_S
        log.warning("the job channel could not be opened (%s): HTTP for now", failure)
        raise ChannelUnavailable(self.url) from failure

    async def _read(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        try:
            async for message in socket:
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                answer = json.loads(message.data)
                entry = self._pending.get(answer.get("seq")) if isinstance(answer, dict) else None
                if entry is not None and not entry[1].done():
                    entry[1].set_result(answer)
                elif isinstance(answer, dict) and answer.get("error"):
                    log.warning("the job channel: %s", answer["error"])
        except (ValueError, aiohttp.ClientError) as exc:
            log.warning("the job channel failed: %s", exc)
        finally:
            await socket.close()
            for owner, answered in list(self._pending.values()):
                if owner is socket and not answered.done():
                    answered.set_exception(aiohttp.ServerDisconnectedError("job channel closed"))


def channel_fetch(channel: JobChannel, fallback: Any) -> Callable[..., Any]:
    """The loop's `fetch`: a take over the channel, over HTTP (`fallback`, the SDK's get_job)
    while the channel cannot be had."""

    async def fetch(session: aiohttp.ClientSession, count: int) -> list[dict[str, Any]] | None:
        if channel.usable():
            try:
                return await channel.take(session, count)
            except ChannelUnavailable:
                pass
        return await fallback(session, count)

    return fetch
