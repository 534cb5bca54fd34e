"""A loopback stub of the gateway's worker routes, just enough for the real runpod worker loop.

Serves job-take / job-take-batch / job-stop / job-done / job-stream / ping from PROTOCOL.md on
127.0.0.1 in a background thread and records every request the worker makes.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from handler_protocol.urls import worker_webhook_env


@dataclass
class Recorded:
    done: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    done_query: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    stream: dict[str, list[Any]] = field(default_factory=dict)
    takes: list[str] = field(default_factory=list)
    pings: list[dict[str, str]] = field(default_factory=list)
    auth: set[str] = field(default_factory=set)


class StubGateway:
    def __init__(self, endpoint: str = "ep", token: str = "worker-token"):
        self.endpoint = endpoint
        self.token = token
        self.jobs: deque[dict[str, Any]] = deque()
        self.recorded = Recorded()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> StubGateway:
        ready = threading.Event()
        threading.Thread(target=self._serve, args=(ready,), daemon=True).start()
        if not ready.wait(10):
            raise RuntimeError("stub gateway did not start")
        return self

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        base = f"/v2/{self.endpoint}"
        app.router.add_get(base + "/job-take/{worker}", self._take)
        app.router.add_get(base + "/job-take-batch/{worker}", self._take)
        app.router.add_get(base + "/job-stop/{worker}", self._stop)
        app.router.add_post(base + "/job-done/{worker}/{job}", self._done)
        app.router.add_post(base + "/job-stream/{worker}/{job}", self._stream)
        app.router.add_get(base + "/ping/{worker}", self._ping)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)

    def worker_env(self, worker_id: str = "worker-1") -> dict[str, str]:
        """The env a pod gets (PROTOCOL.md), pointing at this stub."""
        return {
            **worker_webhook_env(f"http://127.0.0.1:{self.port}", self.endpoint),
            "RUNPOD_POD_ID": worker_id,
            "RUNPOD_AI_API_KEY": self.token,
            "RUNPOD_PING_INTERVAL": "1000",
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
            "RUNPOD_LOG_LEVEL": "INFO",
        }

    # -- test API ----------------------------------------------------------------------------
    def enqueue(self, job_id: str, job_input: Any) -> None:
        with self._lock:
            self.jobs.append({"id": job_id, "input": job_input})

    def wait_done(self, job_id: str, timeout: float = 30.0) -> dict[str, Any]:
        """The final (non-progress) result body posted for `job_id`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                final = [
                    body
                    for body in self.recorded.done.get(job_id, [])
                    if body.get("status") != "IN_PROGRESS"
                ]
            if final:
                return final[0]
            time.sleep(0.05)
        raise TimeoutError(f"no result for {job_id} within {timeout}s: {self.recorded}")

    # -- routes ------------------------------------------------------------------------------
    async def _take(self, request: web.Request) -> web.Response:
        self.recorded.auth.add(request.headers.get("Authorization", ""))
        self.recorded.takes.append(request.path_qs)
        batch = int(request.query.get("batch_size", "1"))
        for _ in range(10):  # hold the poll up to ~0.5 s, like the gateway's long-poll
            with self._lock:
                taken = [self.jobs.popleft() for _ in range(min(batch, len(self.jobs)))]
            if taken:
                return web.json_response(taken if "job-take-batch" in request.path else taken[0])
            await asyncio.sleep(0.05)
        return web.Response(status=204)

    async def _stop(self, request: web.Request) -> web.Response:
        await asyncio.sleep(0.5)
        return web.Response(status=204)

    async def _done(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())  # Content-Type claims form-urlencoded: JSON anyway
        job = request.match_info["job"]
        with self._lock:
            self.recorded.done.setdefault(job, []).append(body)
            self.recorded.done_query.setdefault(job, []).append(dict(request.query))
        return web.json_response({})

    async def _stream(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        with self._lock:
            self.recorded.stream.setdefault(request.match_info["job"], []).append(body["output"])
        return web.json_response({})

    async def _ping(self, request: web.Request) -> web.Response:
        self.recorded.auth.add(request.headers.get("Authorization", ""))
        self.recorded.pings.append(dict(request.query))
        return web.json_response({})
