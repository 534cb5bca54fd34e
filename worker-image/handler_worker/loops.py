"""The worker's job loop in production: a taken job starts the moment it arrives, a finished
job's result post asks for the next job for its slot, a free slot takes at once (the runpod SDK's
loop polls its local queue every 0.1 s, so each warm job waited for that sleep). The SDK's own
functions do the rest: `get_job` takes (over HTTP where the gateway has no job channel,
`handler_worker.channels`), `handler_worker.results` runs jobs and posts results,
progress and stream chunks as the SDK's `handle_job` does, `get_stop_signals` long-polls
cancellations; `JobsProgress` and the SDK's ping loop (`handler_worker.heartbeats`: in a process
that dies with the worker) report the running jobs. runpod is
pinned; tests/worker/test_loops.py checks what we rely on.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from handler_worker.backoffs import backoff

log = logging.getLogger("handler_worker")

Fetch = Callable[[Any, int], Awaitable[list[dict[str, Any]] | None]]
# session, config, job, `finished(refresh)` (called once the handler is done, with whether it
# asked for a fresh worker: how many jobs to take with the result) -> the jobs handed over
Run = Callable[
    [Any, dict[str, Any], dict[str, Any], Callable[[bool], int]],
    Awaitable[list[dict[str, Any]] | None],
]
Stops = Callable[[Any], Awaitable[list[str]]]

TAKE_TIMEOUT_S = 90.0  # the SDK's: above the gateway's take hold
STOP_TIMEOUT_S = 90.0
ERROR_BACKOFF_S = 1.0  # after a failed take or stop poll: no tight loop on a gateway outage
MAX_BACKOFF_S = 15.0  # failed takes in a row back off up to this
THROTTLED_BACKOFF_S = 5.0  # after a 429, as the SDK does
STOP_POLL_FLOOR_S = 1.0  # the least time between two stop polls, as the SDK's floor
TAKE_POLL_FLOOR_S = 0.2  # the least time between two takes answered empty at once
MODIFIER_RETRY_S = 1.0  # a concurrency_modifier that answered 0 is asked again after this
LEAVE_ANSWER_S = 10.0  # how long the open take may take to answer once the leave was heard


class WorkerLoop:
    """Runs up to `capacity` jobs at a time (the config's `concurrency_modifier` may change it
    before each take, as in the SDK); `stop()` ends taking, lets running jobs finish."""

    def __init__(
        self,
        config: dict[str, Any],
        capacity: int,
        fetch: Fetch,
        run: Run,
        stops: Stops | None = None,
        progress: Any = None,
        leave: Callable[[], bool] | None = None,
    ):
        self.config = config
        self.capacity = max(1, capacity)
        self.fetch, self.run_job, self.stops = fetch, run, stops
        self.progress = progress
        self.leave = leave  # tells the gateway (blocking, bounded): True when it heard
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._posting: set[str] = set()  # jobs whose handler is done: results being posted
        self.takes = 0  # take requests made (tests count them)
        self._failures = 0  # takes failed in a row
        self._stopping: asyncio.Event | None = None
        self._slot_freed: asyncio.Event | None = None
        self._leaving = False
        self._announced: bool | None = None
        # A job asked for a fresh worker (its result's refresh_worker, or the module's): the
        # loop ends after it and `serve` starts the runtime afresh in this process.
        self.refresh = False

    # -- control ---------------------------------------------------------------------------
    def stop(self, leaving: bool = True) -> None:
        """Take nothing more; the jobs running finish, then `run()` returns. `leaving` (a
        signal, not a refresh): the gateway is told, so the open take is answered at once and
        anything it hands over in that answer still runs."""
        if self._stopping is not None and not self._stopping.is_set():
            self._leaving = leaving
            self._stopping.set()

    @property
    def leaving(self) -> bool:
        """The loop ended (or ends) on a signal: the worker goes away."""
        return self._leaving

    async def _announce(self) -> bool:
        if self._announced is None:
            self._announced = bool(
                self._leaving and self.leave is not None and await asyncio.to_thread(self.leave)
            )
        return self._announced

    def _free_slots(self) -> int:
        modifier = self.config.get("concurrency_modifier")
        if modifier is not None:
            self.capacity = max(0, int(modifier(self.capacity)))  # 0: take nothing for now
        return self.capacity - len(self.tasks)

    # -- the loop --------------------------------------------------------------------------
    async def run(self, session: Any) -> None:
        self._stopping, self._slot_freed = asyncio.Event(), asyncio.Event()
        watcher = asyncio.create_task(self._watch_stops(session)) if self.stops else None
        try:
            while not self._stopping.is_set():
                free = self._free_slots()
                if free <= 0:
                    # A job's end frees a slot; with none running (a modifier answered 0), ask
                    # it again after a while, as the SDK does.
                    freed = (
                        self._slot_freed.wait() if self.tasks else asyncio.sleep(MODIFIER_RETRY_S)
                    )
                    await self._until(freed)
                    self._slot_freed.clear()
                    continue
                jobs = await self._take(session, free)
                for job in jobs or []:
                    self._start(session, job)  # at once: nothing waits in a local queue
            await self._announce()
        finally:
            while self.tasks:  # a finishing job may start the next one it was handed
                await asyncio.gather(*list(self.tasks.values()), return_exceptions=True)
            if watcher is not None:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)

    async def _until(self, awaitable: Awaitable[Any]) -> Any:
        """`awaitable`'s result (a back-off sleep, the wait for a free slot), or None once
        stop() is called (the awaitable is cancelled)."""
        assert self._stopping is not None
        work = asyncio.ensure_future(awaitable)
        stopping = asyncio.ensure_future(self._stopping.wait())
        done, _ = await asyncio.wait({work, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            stopping.cancel()
            return work.result()
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        return None

    async def _take(self, session: Any, count: int) -> list[dict[str, Any]] | None:
        """One take long-poll. Stopped meanwhile: once the gateway has heard the leave it
        answers the take at once, and a job it handed over in that answer still runs (cancelling
        the take could lose a job already written to us); unheard, the take is abandoned."""
        assert self._stopping is not None
        self.takes += 1
        asked = asyncio.get_running_loop().time()
        take = asyncio.ensure_future(asyncio.wait_for(self.fetch(session, count), TAKE_TIMEOUT_S))
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({take, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not take.done() and await self._announce():
                await asyncio.wait({take}, timeout=LEAVE_ANSWER_S)
            if not take.done():
                take.cancel()
                await asyncio.gather(take, return_exceptions=True)
                return None
            jobs = take.result()
        except TimeoutError:
            return None
        except Exception as exc:  # noqa: BLE001 - the gateway's problem: log, back off, go on
            throttled = getattr(exc, "status", None) == 429
            self._failures += 1
            log.warning("taking a job failed (%d in a row): %s", self._failures, exc)
            await self._until(asyncio.sleep(self._backoff(throttled)))
            return None
        finally:
            stopping.cancel()
        self._failures = 0
        quick = asyncio.get_running_loop().time() - asked < TAKE_POLL_FLOOR_S
        if not jobs and quick and not self._stopping.is_set():
            # An empty answer that did not wait (a mark from a previous life): no tight loop.
            await self._until(asyncio.sleep(TAKE_POLL_FLOOR_S))
        return jobs

    def _backoff(self, throttled: bool) -> float:
        """The wait after a failed take: doubling with each failure in a row up to
        MAX_BACKOFF_S, jittered (workers of one endpoint do not retry in step during an
        outage); 5 s at least after a 429, as the SDK does."""
        delay = backoff(self._failures, ERROR_BACKOFF_S, MAX_BACKOFF_S)
        return max(delay, THROTTLED_BACKOFF_S) if throttled else delay

    def _start(self, session: Any, job: dict[str, Any]) -> None:
        if job["id"] in self.tasks:  # handed over again while it runs here: once is enough
            log.warning("job %s is already running here", job["id"])
            return
        if self.progress is not None:
            self.progress.add(job)
        self.tasks[job["id"]] = asyncio.create_task(self._handle(session, job))

    def _finished(self, job: dict[str, Any], refresh: bool = False) -> int:
        """The handler is done with `job` (its result is about to be posted; the heartbeat names
        it until the post returns, as the SDK's): stop signals no longer reach it (they would
        cancel a post that may carry jobs), and the post asks for one job for its slot, none
        once the loop stops or when the slots shrank below those in use."""
        assert self._stopping is not None
        self._posting.add(job["id"])
        if refresh or self.config.get("refresh_worker", False):
            self.refresh = True
        if self._stopping.is_set() or self.refresh:
            return 0
        return 1 if self._free_slots() >= 0 else 0

    async def _handle(self, session: Any, job: dict[str, Any]) -> None:
        handed: list[dict[str, Any]] = []
        try:
            finished = functools.partial(self._finished, job)
            handed = await self.run_job(session, self.config, job, finished) or []
            if self.refresh:
                # RunPod's worker refresh: end after this job and start afresh (not a
                # departure: the fresh runtime takes jobs under the same name at once).
                self.stop(leaving=False)
        except asyncio.CancelledError:
            log.info("job %s stopped", job["id"])
        except Exception:
            log.exception("job %s: handling failed", job["id"])
        finally:
            if self.progress is not None:
                self.progress.remove(job)
            self.tasks.pop(job["id"], None)
            self._posting.discard(job["id"])
            for next_job in handed:  # handed over with the result: it runs, stopping or not
                self._start(session, next_job)
            assert self._slot_freed is not None
            self._slot_freed.set()

    async def _watch_stops(self, session: Any) -> None:
        """Cancel the jobs the gateway says to stop (cancelled, timed out)."""
        assert self.stops is not None and self._stopping is not None
        clock = asyncio.get_running_loop().time
        # Until the last job ends, stopped or not: a cancel or a timeout during a drain still
        # reaches its job (a leaving worker's stop polls are answered at once, floor below).
        while not self._stopping.is_set() or self.tasks:
            asked = clock()
            try:
                ids = await asyncio.wait_for(self.stops(session), STOP_TIMEOUT_S)
            except TimeoutError:
                continue
            except Exception as exc:  # noqa: BLE001
                log.warning("polling job stops failed: %s", exc)
                await asyncio.sleep(ERROR_BACKOFF_S)
                continue
            for job_id in ids or []:
                task = self.tasks.get(job_id)
                if task is not None and job_id not in self._posting:
                    task.cancel()
            if not ids and clock() - asked < STOP_POLL_FLOOR_S:
                # An empty answer that did not wait (no stop channel, leaving): no tight loop.
                await asyncio.sleep(STOP_POLL_FLOOR_S - (clock() - asked))


def install_signals(loop: WorkerLoop) -> None:
    """SIGTERM/SIGINT stop the loop (take nothing more, finish what runs); a second one stops
    the running jobs too."""
    event_loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if loop._stopping is not None and loop._stopping.is_set():
            for task in list(loop.tasks.values()):
                task.cancel()
            return
        loop.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        event_loop.add_signal_handler(sig, on_signal)


def serve(
    config: dict[str, Any],
    capacity: int,
    announce_leaving: Callable[[], bool],
    take_capacity: int | None = None,
    channel: bool = True,
) -> bool:
    """The production worker: the SDK's fitness checks and heartbeat, then our loop on the
    SDK's HTTP session until SIGTERM (which also tells the gateway the worker leaves).
    `take_capacity`: the cap the gateway keeps for this worker, sent with each take; `channel`:
    takes and results over the gateway's job channel (HTTP where it has none). True when it
    ended because a job asked for a fresh worker (the caller starts the runtime afresh)."""
    from runpod.http_client import AsyncClientSession
    from runpod.serverless.modules import rp_http, rp_job
    from runpod.serverless.modules.rp_fitness import run_fitness_checks
    from runpod.serverless.modules.worker_state import JobsProgress, PingJobMirror

    from handler_worker import heartbeats
    from handler_worker.channels import JobChannel, channel_fetch, channel_url
    from handler_worker.results import runner
    from handler_worker.slots import with_query

    progress, mirror = JobsProgress(), PingJobMirror()
    progress.set_mirror(mirror)
    # This process's id with every take: the gateway redelivers at once what a predecessor
    # under the same name (a restarted container) still held.
    rp_job.JOB_GET_URL = with_query(rp_job.JOB_GET_URL, "instance", uuid.uuid4().hex[:16])
    url = channel_url(rp_job.JOB_GET_URL) if channel else None
    job_channel = JobChannel(url) if url else None

    loop = WorkerLoop(
        config,
        capacity,
        fetch=channel_fetch(job_channel, rp_job.get_job) if job_channel else rp_job.get_job,
        run=runner(rp_http.JOB_DONE_URL, take_capacity, job_channel),
        stops=rp_job.get_stop_signals,
        progress=progress,
        leave=announce_leaving,
    )

    async def main() -> None:
        await run_fitness_checks()
        # The SDK's ping loop, in a process that dies with this one (or, on a refresh, first).
        pinger = heartbeats.start(mirror)
        install_signals(loop)
        async with AsyncClientSession() as session:
            try:
                await loop.run(session)
            finally:
                if job_channel is not None:
                    await job_channel.close()
                if loop.refresh and pinger is not None:
                    pinger.kill()  # the fresh runtime starts its own
                    pinger.join(5)

    try:
        import uvloop  # libuv's event loop where installed (the worker extra brings it)
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
    # Not after a signal: the pod is going away (a fresh runtime would take jobs it cannot run).
    return loop.refresh and not loop.leaving
