"""The gateway's operations on endpoints, jobs and workers, shared by every backend.

Routes call these; they pick the pure transition (`jobs.py`), let the backend store it
atomically, and do what follows (metrics, webhooks, long-poll waits). The sweeper enforces
execution timeouts, re-queues jobs of silent workers, expires queued jobs and old results.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from handler_gateway import jobs
from handler_gateway.backends import (
    ENQUEUED_CHANNEL,
    Admission,
    Backend,
    BackendUnavailable,
    RateRefused,
    WorkerRecord,
    job_channel,
    queue_channel,
    stop_channel,
    worker_channel,
)
from handler_gateway.errors import Conflict, NotFound, RateLimited, TooLarge
from handler_gateway.jobs import Change, JobRecord, JobStatus
from handler_protocol.models import (
    EndpointConfig,
    HandlerProblem,
    Health,
    HealthJobs,
    HealthWorkers,
    QueueFigures,
    RateLimit,
    RunRequest,
)

log = logging.getLogger("handler_gateway")
# Hand-overs in answers to result posts kept until a job of theirs reports (oldest dropped).
KEPT_HAND_OVERS = 4096
# Worker processes (instances) remembered per replica, so a take checks the backend only for a
# new one (oldest dropped).
KEPT_INSTANCES = 10_000
# A leaving worker's mark outlives its longest long-poll by this much.
LEAVING_MARGIN_S = 10.0


# A replica takes a busy caller's tokens up to LEASE_S's worth of its rate at a time (at most a
# quarter of the burst; 1 at low rates, where each request asks the shared bucket), and uses
# them for up to LEASE_HOLD_S: beyond the bucket, a caller gets at most that many per replica.
LEASE_S = 0.05
LEASE_HOLD_S = 0.5
KEPT_LEASES = 10_000


def lease_size(limit: RateLimit) -> int:
    return max(1, min(int(limit.requestsPerSecond * LEASE_S), limit.burst // 4))


# A job listing page reads the backend LIST_PAGE jobs at a time, LIST_SCAN at most.
LIST_PAGE = 200
LIST_SCAN = 2000


@dataclass
class Timings:
    """Long-poll and sweep timings (seconds)."""

    take_hold: float = 25.0  # below the SDK's 90 s job-take timeout
    stop_hold: float = 25.0
    runsync_wait: float = 30.0
    runsync_wait_max: float = 300.0
    recheck: float = 1.0  # long-polls re-check storage at least this often
    sweep_interval: float = 0.5
    heartbeat_write_interval: float = 1.0
    stop_resend: float = 3.0  # a pending stop is sent again after this long
    endpoint_cache: float = 1.0  # endpoint configs are re-read from the backend this often


@dataclass(frozen=True)
class ResultPost:
    """A worker's result as posted: the job, the body, whether it streamed, and the delivery
    it is of (handler_worker says; the SDK does not)."""

    job_id: str
    body: dict[str, Any]
    is_stream: bool = False
    delivery: int | None = None


@dataclass
class Taker:
    """A take waiting on this replica: a submit may start jobs for it and hand them over."""

    worker: str
    count: int
    capacity: int | None
    jobs: asyncio.Future[list[JobRecord]]
    claimed: bool = False  # a submit is storing a job for it: it waits for that answer

    def hand(self, started: list[JobRecord]) -> bool:
        """Give `started` to the waiting take; False when it no longer waits."""
        if self.jobs.done():
            return False
        self.jobs.set_result(started)
        return True

    async def wait(self, woken: Awaitable[bool]) -> None:
        """Until jobs are handed over or `woken` (the queue's notification or its timeout)."""
        other = asyncio.ensure_future(woken)
        try:
            await asyncio.wait({self.jobs, other}, return_when=asyncio.FIRST_COMPLETED)
            if self.claimed:  # woken meanwhile: the submit answers in one round trip
                await asyncio.wait({self.jobs})
        finally:
            other.cancel()

    def close(self) -> list[JobRecord]:
        """Stop waiting: what was handed over (nothing can be handed over after)."""
        if self.jobs.done():
            return [] if self.jobs.cancelled() else self.jobs.result()
        self.jobs.cancel()
        return []


class Gateway:
    def __init__(
        self,
        backend: Backend,
        timings: Timings | None = None,
        observers: list[Any] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.backend = backend
        self.timings = timings or Timings()
        self.observers = observers or []  # metrics, webhooks: on_change(change), on_ignored(ep)
        self.clock = clock
        self.replica = uuid.uuid4().hex[:12]
        self.stopping = False
        self._endpoints: dict[str, tuple[EndpointConfig, float]] = {}
        self._problems: dict[str, tuple[HandlerProblem | None, float]] = {}  # endpoint -> read at
        # (endpoint, caller) -> [tokens leased from its rate-limit bucket, used until, size]
        self._rate_leases: dict[tuple[str, str], list[float]] = {}
        self._refused_until: dict[tuple[str, str], float] = {}  # (endpoint, caller) -> time
        # Digests of every endpoint's credentials -> their ids, and when that was read.
        self._owners: tuple[dict[str, str], float] | None = None
        self._owners_built: asyncio.Future[dict[str, str]] | None = None
        self._awaited: set[tuple[str, str]] = set()  # jobs a runsync waits for here
        self._results: dict[tuple[str, str], JobRecord] = {}  # those ended here, not yet read
        self._tasks: set[asyncio.Task[Any]] = set()
        # (endpoint, worker, job whose result post took them) -> jobs handed over in its answer
        self._handed: dict[tuple[str, str, str], list[JobRecord]] = {}
        self._handed_in: dict[tuple[str, str], tuple[str, str, str]] = {}  # job -> that key
        self._emptied: dict[str, tuple[int, float]] = {}  # endpoint -> (queue version, when)
        self._takers: dict[str, list[Taker]] = {}  # endpoint -> takes waiting here, oldest first
        self._instances: dict[tuple[str, str], str] = {}  # (endpoint, worker) -> process seen
        # Heartbeats are judged from this time on: the start, then the end of each outage.
        self._seen_from = clock()
        self._blind = False  # the backend failed since the last sweep

    # -- endpoints -------------------------------------------------------------------------
    async def set_problem(self, endpoint_id: str, problem: HandlerProblem | None) -> None:
        """Why the endpoint's workers fail (None: they do not); `since` kept while it lasts."""
        await self.endpoint(endpoint_id)
        if problem is not None:
            known = await self.backend.get_problem(endpoint_id)
            since = known.since if known is not None else None
            problem = problem.model_copy(update={"since": since or self.clock()})
        await self.backend.set_problem(endpoint_id, problem)
        self._problems[endpoint_id] = (problem, self.clock())

    async def problem(self, endpoint_id: str) -> HandlerProblem | None:
        """The endpoint's handler problem, read at most once per `endpoint_cache` s here (a
        queued job's status polls ask for it)."""
        now = self.clock()
        cached = self._problems.get(endpoint_id)
        if cached is not None and now - cached[1] < self.timings.endpoint_cache:
            return cached[0]
        found = await self.backend.get_problem(endpoint_id)
        self._problems[endpoint_id] = (found, now)
        return found

    async def endpoint(self, endpoint_id: str) -> EndpointConfig:
        """The endpoint's config; cached for `endpoint_cache` s (other replicas' edits lag that)."""
        now = self.clock()
        cached = self._endpoints.get(endpoint_id)
        if cached is not None and now - cached[1] < self.timings.endpoint_cache:
            return cached[0]
        config = await self.backend.get_endpoint(endpoint_id)
        if config is None:
            self._endpoints.pop(endpoint_id, None)
            raise NotFound(f"endpoint '{endpoint_id}' not found")
        self._endpoints[endpoint_id] = (config, now)
        return config

    async def credential_owner(self, sha256: str) -> str | None:
        """The id of the key or worker token with this digest on any endpoint (None: none).
        For refused credentials only (403, not 401): the index of every endpoint's credentials
        is built at most once per `endpoint_cache` s, however many unknown ones arrive."""
        now = self.clock()
        if self._owners is None or now - self._owners[1] >= self.timings.endpoint_cache:
            if self._owners_built is None or self._owners_built.done():
                self._owners_built = asyncio.ensure_future(self._index_owners())
            self._owners = (await asyncio.shield(self._owners_built), now)
        return self._owners[0].get(sha256)

    async def _index_owners(self) -> dict[str, str]:
        owners: dict[str, str] = {}
        for config in await self.backend.list_endpoints():
            for key in config.clientKeys:
                owners.setdefault(key.sha256, key.id)
            for token in config.workerTokenSha256:
                owners.setdefault(token, f"worker:{config.id}")
        return owners

    async def put_endpoint(self, config: EndpointConfig) -> bool:
        existed = await self.backend.get_endpoint(config.id) is not None
        await self.backend.put_endpoint(config)
        self._endpoints.pop(config.id, None)
        self._owners = None  # other replicas' indexes catch up within endpoint_cache
        return not existed

    async def list_endpoints(self) -> list[EndpointConfig]:
        return sorted(await self.backend.list_endpoints(), key=lambda config: config.id)

    async def workers(self, endpoint_id: str) -> list[WorkerRecord]:
        """The endpoint's workers as the gateway last saw them, by id (404: no endpoint)."""
        await self.endpoint(endpoint_id)
        records = await self.backend.get_workers(endpoint_id)
        return sorted(records.values(), key=lambda worker: worker.id)

    async def ready(self) -> None:
        """Raises BackendUnavailable while the backend cannot be reached."""
        await self.backend.ping()

    async def delete_endpoint(self, endpoint_id: str) -> None:
        self._endpoints.pop(endpoint_id, None)
        self._owners = None
        if not await self.backend.delete_endpoint(endpoint_id):
            raise NotFound(f"endpoint '{endpoint_id}' not found")

    # -- client side -------------------------------------------------------------------------
    def _observe(self, changes: list[Change] | Change | None) -> None:
        if changes is None:
            return
        for change in changes if isinstance(changes, list) else [changes]:
            for observer in self.observers:
                observer.on_change(change)
            job = change.job
            key = (job.endpoint, job.id)
            if job.terminal and key in self._awaited:
                # The runsync waiting here (woken by the backend as it stored the change) gets
                # the result without reading it back.
                self._results[key] = job
            else:
                self._results.pop(key, None)

    async def admit(self, config: EndpointConfig, caller: str) -> None:
        """Count a request of `caller` against the endpoint's rate limit (RateLimited beyond).
        Tokens come from the shared bucket a lease at a time (`lease_size`): most requests of
        a busy caller take one from this replica's lease, with no round trip."""
        limit = config.rateLimit
        if limit is None:
            return
        self._refused(config, caller)
        if self._leased(config.id, caller):
            return
        now = self.clock()
        taken, wait = await self.backend.take_tokens(
            config.id,
            caller,
            limit.requestsPerSecond,
            limit.burst,
            self._wanted(config, caller),
            now,
        )
        self._taken(config, caller, taken, wait, now)

    def admit_read(self, config: EndpointConfig, caller: str) -> Callable[[], None] | None:
        """A read (status, stream, health, listing) is answered at once and counted after: a
        caller found over its rate is refused (RateLimited) until its bucket has a token
        again. What starts the count once the answer is sent (None: counted already, from
        this replica's lease). It costs a read no round trip; a caller may overshoot by what
        it sends within one."""
        if config.rateLimit is None:
            return None
        self._refused(config, caller)
        if self._leased(config.id, caller):
            return None
        return lambda: self._background(self._count_read(config, caller))

    async def _count_read(self, config: EndpointConfig, caller: str) -> None:
        with contextlib.suppress(RateLimited, BackendUnavailable):
            await self.admit(config, caller)

    def _refused(self, config: EndpointConfig, caller: str) -> None:
        """RateLimited while a refusal of `caller` holds (its bucket was empty until then)."""
        until = self._refused_until.get((config.id, caller))
        if until is not None:
            wait = until - self.clock()
            if wait > 0:
                assert config.rateLimit is not None
                raise RateLimited(config.id, caller, config.rateLimit, wait)
            del self._refused_until[(config.id, caller)]

    def _wanted(self, config: EndpointConfig, caller: str) -> int:
        """How many tokens to ask the bucket for: a lease grows (doubling, up to `lease_size`)
        while the caller uses its leases up, and shrinks while they expire unused, so a caller
        spread thin over replicas wastes none of its rate in their leases."""
        assert config.rateLimit is not None
        lease = self._rate_leases.get((config.id, caller))
        if lease is None:
            return 1
        tokens, _, size = lease
        if tokens >= 1:  # it expired with tokens left
            return max(1, int(size) // 2)
        return min(lease_size(config.rateLimit), int(size) * 2)

    def _taken(
        self, config: EndpointConfig, caller: str, taken: int, wait: float, now: float
    ) -> None:
        """What the bucket gave `caller`: tokens beyond this request's join its lease here
        (concurrent takes add up), or a refusal is remembered until `wait` has passed
        (RateLimited)."""
        if len(self._rate_leases) >= KEPT_LEASES:
            self._rate_leases = {k: v for k, v in self._rate_leases.items() if v[1] > now}
            self._refused_until = {k: v for k, v in self._refused_until.items() if v > now}
        key = (config.id, caller)
        if taken:
            lease = self._rate_leases.get(key)
            held = lease[0] if lease is not None and now < lease[1] else 0
            size = max(taken, lease[2] if lease is not None else 1)
            self._rate_leases[key] = [held + taken - 1, now + LEASE_HOLD_S, size]
            return
        self._refused_until[key] = now + wait
        assert config.rateLimit is not None
        raise RateLimited(config.id, caller, config.rateLimit, wait)

    def _leased(self, endpoint_id: str, caller: str) -> bool:
        """One token from this replica's lease of `caller`'s tokens, if it holds one."""
        lease = self._rate_leases.get((endpoint_id, caller))
        if lease is not None and lease[0] >= 1 and self.clock() < lease[1]:
            lease[0] -= 1
            return True
        return False

    def _admission(self, config: EndpointConfig, caller: str | None, now: float) -> Admission:
        """What a new job of `caller` must pass: the queue limit, and a token of its rate limit
        (taken with the job's creation when this replica's lease has none)."""
        admission = Admission(max_queued=config.maxQueued, now=now)
        limit = config.rateLimit
        if limit is None or caller is None:
            return admission
        self._refused(config, caller)
        if not self._leased(config.id, caller):
            admission.bucket, admission.wanted = caller, self._wanted(config, caller)
            admission.rate, admission.burst = limit.requestsPerSecond, limit.burst
        return admission

    async def submit(
        self,
        endpoint_id: str,
        request: RunRequest,
        size: int | None = None,
        caller: str | None = None,
    ) -> JobRecord:
        """Store a new job (handed at once to a take waiting here). `size`: the request body's
        bytes, held to the endpoint's maxInputBytes; its maxQueued refuses it (QueueFull), and
        its rate limit `caller` (RateLimited), both checked with the creation."""
        config = await self.endpoint(endpoint_id)
        if size is not None and config.maxInputBytes is not None and size > config.maxInputBytes:
            raise TooLarge(
                f"request body of {size} bytes is over endpoint '{endpoint_id}''s limit of "
                f"{config.maxInputBytes} bytes (jobs.maxInputBytes)"
            )
        policy = request.policy
        now = self.clock()
        extra: dict[str, Any] = {}
        if policy is not None and policy.lowPriority:
            extra["lowPriority"] = True
        if request.s3Config is not None:
            extra["s3Config"] = request.s3Config.model_dump()
        retry = (policy.retryOnError if policy else None) or config.retryOnError
        if retry is not None:
            extra["retryOnError"] = retry.model_dump()
        change = jobs.new_job(
            str(uuid.uuid4()),
            endpoint_id,
            request.input,
            now,
            execution_timeout_s=(
                policy.executionTimeout / 1000
                if policy and policy.executionTimeout
                else config.executionTimeoutSeconds
            ),
            ttl_s=policy.ttl / 1000 if policy and policy.ttl else config.ttlSeconds,
            max_retries=config.maxRetries,
            webhook=request.webhook,
            extra=extra,
        )
        admission = self._admission(config, caller, now)
        try:
            await self._create(change, admission)
        except RateRefused as exc:
            assert caller is not None
            self._taken(config, caller, 0, exc.wait, now)  # raises RateLimited
        if caller is not None and admission.bucket is not None:
            self._taken(config, caller, admission.taken, 0.0, now)
        return change.job

    async def _create(self, change: Change, admission: Admission) -> None:
        """Store the new job, handed at once to a take waiting here if there is one."""
        endpoint_id, now = change.job.endpoint, admission.now
        taker = self._waiting_taker(endpoint_id)
        if taker is None:
            await self.backend.create_job(change, admission)
            self._observe(change)
            return
        # A worker long-polls here: store the job and take for it in one step.
        queue = queue_channel(endpoint_id)
        before = self.backend.notifier.version(queue)
        started: list[JobRecord] = []
        try:
            _, changes, emptied = await self.backend.create_and_take(
                change, taker.worker, taker.count, taker.capacity, now, admission
            )
            if emptied and self.backend.notifier.version(queue) == before + 1:  # ours alone
                self._emptied[endpoint_id] = (before + 1, self.clock())
            self._observe([change, *changes])
            started = [c.job for c in changes if c.job.status == JobStatus.IN_PROGRESS]
        finally:
            handed = taker.hand(started)  # [] (a failure too): the take goes on by itself
        if started and not handed:  # its take was cancelled meanwhile
            try:
                await self.give_back(endpoint_id, taker.worker, started)
            except Exception as exc:  # noqa: BLE001 - the job is stored: answer it; the sweeper
                # re-queues it when the worker's heartbeat deadline passes
                log.warning("job %s/%s: giving it back failed: %s", endpoint_id, change.job.id, exc)

    def _waiting_taker(self, endpoint_id: str) -> Taker | None:
        """The take that has waited longest for this endpoint's queue (no longer waiting)."""
        waiting = self._takers.get(endpoint_id)
        while waiting:
            taker = waiting.pop(0)
            if not taker.jobs.done():
                taker.claimed = True  # it now waits for this submit's answer
                return taker
        return None

    async def job(self, endpoint_id: str, job_id: str) -> JobRecord:
        job = await self.backend.get_job(endpoint_id, job_id)
        if job is None:
            await self.endpoint(endpoint_id)
            raise NotFound(f"job '{job_id}' not found in endpoint '{endpoint_id}'")
        return job

    async def list_jobs(
        self,
        endpoint_id: str,
        status: JobStatus | None,
        limit: int,
        after: tuple[float, str] | None = None,
    ) -> tuple[list[JobRecord], tuple[float, str] | None]:
        """The endpoint's kept jobs, newest first, with `status` (None: any), up to `limit`,
        older than the job `after` names; and where the next page starts (None: no more). A
        page looks at LIST_SCAN jobs at most, so a rare status may take several pages."""
        await self.endpoint(endpoint_id)
        found: list[JobRecord] = []
        scanned = 0
        while scanned < LIST_SCAN:
            page = await self.backend.recent_jobs(endpoint_id, after, LIST_PAGE)
            if not page:
                return found, None
            for job in page:
                after, scanned = (job.created_at, job.id), scanned + 1
                if status is None or job.status == status:
                    found.append(job)
                    if len(found) == limit:
                        return found, after
        return found, after

    async def wait_terminal(
        self, endpoint_id: str, job_id: str, wait: float, submitted: JobRecord | None = None
    ) -> JobRecord:
        """The job once it has ended, or as it is after `wait` seconds (runsync).

        `submitted`: the record `submit` just returned, so the first look needs no read. A
        result this replica stored is taken as it was stored; others are read back.
        """
        deadline = self.clock() + wait
        channel = job_channel(endpoint_id, job_id)
        notifier = self.backend.notifier
        seen = 0  # a job's channel is first notified after the job is created
        key = (endpoint_id, job_id)
        self._awaited.add(key)
        try:
            while True:
                if submitted is not None:
                    job, submitted = submitted, None
                else:
                    seen = notifier.version(channel)
                    job = self._results.pop(key, None) or await self.job(endpoint_id, job_id)
                remaining = deadline - self.clock()
                if job.terminal or remaining <= 0:
                    return job
                await notifier.wait(channel, min(remaining, self.timings.recheck), since=seen)
        finally:
            self._awaited.discard(key)
            self._results.pop(key, None)

    async def stream(
        self, endpoint_id: str, job_id: str, cursor: int | None
    ) -> tuple[JobRecord, list[Any], int]:
        """New chunks from `cursor` (or the job's shared cursor, advanced: each chunk once)."""
        job = await self.job(endpoint_id, job_id)
        start = job.stream_cursor if cursor is None else max(cursor, 0)
        chunks = await self.backend.read_chunks(endpoint_id, job_id, start)
        end = start + len(chunks)
        if cursor is None and chunks:
            change = await self.backend.update_job(
                endpoint_id, job_id, lambda j: jobs.advance_cursor(j, start, end)
            )
            if change is None:  # another reader took these chunks first
                fresh = await self.job(endpoint_id, job_id)
                return fresh, [], fresh.stream_cursor
            job = change.job
        return job, chunks, end

    async def cancel(self, endpoint_id: str, job_id: str) -> JobRecord:
        await self.job(endpoint_id, job_id)
        change = await self.backend.update_job(
            endpoint_id, job_id, lambda j: jobs.cancel(j, self.clock())
        )
        self._observe(change)
        return change.job if change else await self.job(endpoint_id, job_id)

    async def retry(self, endpoint_id: str, job_id: str) -> JobRecord:
        job = await self.job(endpoint_id, job_id)
        change = await self.backend.update_job(
            endpoint_id, job_id, lambda j: jobs.requeue(j, self.clock(), reset_attempts=True)
        )
        if change is None:
            raise Conflict(
                f"job '{job_id}' is {job.status.value}; only FAILED, TIMED_OUT or CANCELLED "
                "jobs can be retried"
            )
        self._observe(change)
        return change.job

    async def purge(self, endpoint_id: str) -> int:
        await self.endpoint(endpoint_id)
        changes = await self.backend.purge_queue(endpoint_id, lambda j: jobs.purge(j, self.clock()))
        self._observe(changes)
        return len(changes)

    def _live_workers(self, workers: dict[str, WorkerRecord], config: EndpointConfig, now: float):
        return [
            worker
            for worker in workers.values()
            if worker.jobs or now - worker.last_seen <= config.lost_after_s
        ]

    def _worker_counts(self, live: list[WorkerRecord], counters: dict[str, int]) -> HealthWorkers:
        counts = HealthWorkers(refreshes=counters.get("workerRefreshes", 0))
        for worker in live:
            setattr(counts, worker.state, getattr(counts, worker.state) + 1)
        return counts

    async def health(self, endpoint_id: str) -> Health:
        config = await self.endpoint(endpoint_id)
        counters = await self.backend.counters(endpoint_id)
        workers = await self.backend.get_workers(endpoint_id)
        live = self._live_workers(workers, config, self.clock())
        return Health(
            jobs=HealthJobs(**{k: v for k, v in counters.items() if k in HealthJobs.model_fields}),
            workers=self._worker_counts(live, counters),
            handlerProblem=await self.problem(endpoint_id),
        )

    # -- worker side -------------------------------------------------------------------------
    async def take(
        self,
        endpoint_id: str,
        worker: str,
        count: int,
        hold: float,
        capacity: int | None = None,
        connected: Callable[[], bool] = lambda: True,
        instance: str | None = None,
    ) -> list[JobRecord]:
        """Long-poll for up to `count` jobs; [] after `hold` seconds (or while draining).

        With `capacity`, the worker never holds more than that many jobs: a take from a full
        worker waits until one of its jobs ends (the loader gives the SDK a spare slot so it
        keeps such a long-poll open instead of sleeping a second between jobs). A leaving
        worker gets [] at once; nothing is claimed for a caller no longer `connected()`. While
        it waits, a submit on this replica may store a job and take for it in one step.
        `instance`: the worker process's id (handler_worker sends one; see `restarted`).
        """
        await self.endpoint(endpoint_id)
        if instance is not None:
            await self.restarted(endpoint_id, worker, instance)
        deadline = self.clock() + hold
        notifier = self.backend.notifier
        queue, slot = queue_channel(endpoint_id), worker_channel(endpoint_id, worker)
        # Nothing was enqueued since a take found this queue empty moments ago: wait at once.
        seen = notifier.version(queue)
        looked = self._emptied.get(endpoint_id)
        skip = (
            looked is not None
            and looked[0] == seen
            and self.clock() - looked[1] < self.timings.recheck
        )
        draining = False
        while True:
            channel, since = queue, notifier.version(queue)
            if not skip:
                freed = notifier.version(slot)
                if not connected():
                    return []
                poll, changes, emptied = await self.backend.take_jobs(
                    endpoint_id, worker, count, capacity, self.clock()
                )
                if emptied:
                    self._emptied[endpoint_id] = (since, self.clock())
                self._observe(changes)
                started = [c.job for c in changes if c.job.status == JobStatus.IN_PROGRESS]
                if started or poll.leaving:
                    return started
                draining = poll.draining
                if capacity is not None and poll.held >= capacity and not poll.draining:
                    channel, since = slot, freed  # full: wait for one of its jobs to end
            skip = False
            remaining = deadline - self.clock()
            if remaining <= 0:
                return []
            timeout = min(remaining, self.timings.recheck)
            if channel is not queue or draining:
                await notifier.wait(channel, timeout, since=since)
                continue
            taker = Taker(worker, count, capacity, asyncio.get_running_loop().create_future())
            self._takers.setdefault(endpoint_id, []).append(taker)
            try:
                await taker.wait(notifier.wait(channel, timeout, since=since))
            except BaseException:  # cancelled: what was handed over goes back
                if lost := taker.close():
                    self._background(self.give_back(endpoint_id, worker, lost))
                raise
            finally:
                handed = taker.close()
                if taker in self._takers.get(endpoint_id, ()):
                    self._takers[endpoint_id].remove(taker)
            if handed:
                return handed

    async def restarted(self, endpoint_id: str, worker: str, instance: str) -> None:
        """A new process under `worker`'s name (a pod's container restarted): the jobs its
        predecessor held are redelivered at once, to the queue head, and its leaving mark is
        gone, instead of blocking the name until heartbeats run out. Looked up in the backend
        only when this replica has not seen that instance already."""
        key = (endpoint_id, worker)
        if self._instances.get(key) == instance:
            return
        previous = await self.backend.swap_instance(endpoint_id, worker, instance)
        self._instances.pop(key, None)
        self._instances[key] = instance
        while len(self._instances) > KEPT_INSTANCES:
            self._instances.pop(next(iter(self._instances)))
        if previous is None or previous == instance:
            return
        now = self.clock()
        record = (await self.backend.get_workers(endpoint_id)).get(worker)
        changes = []
        for job_id in sorted(record.jobs) if record else []:
            change = await self.backend.update_job(
                endpoint_id, job_id, lambda j: jobs.lose_restarted(j, worker, now)
            )
            if change is not None:
                changes.append(change)
                log.info("job %s/%s %s (%s restarted)", endpoint_id, job_id, change.note, worker)
        self._observe(changes)

    def wake_takes(self, endpoint_id: str, worker: str) -> None:
        """`worker`'s takes waiting here look again at once: one whose caller is gone answers []
        (nothing is cancelled half-way). A take a submit is handing jobs to finishes that."""
        for taker in self._takers.get(endpoint_id, ()):
            if taker.worker == worker and not taker.claimed:
                taker.hand([])

    async def stop_signals(self, endpoint_id: str, worker: str, hold: float) -> list[str]:
        await self.endpoint(endpoint_id)
        deadline = self.clock() + hold
        notifier, channel = self.backend.notifier, stop_channel(endpoint_id, worker)
        while True:
            seen = notifier.version(channel)
            now = self.clock()
            leaving = (await self.backend.poll_worker(endpoint_id, worker, now)).leaving
            signals = await self.backend.due_stop_signals(
                endpoint_id, worker, now, self.timings.stop_resend
            )
            remaining = deadline - self.clock()
            if signals or leaving or remaining <= 0:
                return signals
            await notifier.wait(channel, min(remaining, self.timings.recheck), since=seen)

    async def done(
        self,
        endpoint_id: str,
        worker: str,
        job_id: str,
        body: dict[str, Any],
        is_stream: bool,
        delivery: int | None = None,
    ) -> str:
        """Store a worker's result (of `delivery`, when the worker says which). Returns
        accepted | progress | duplicate | ignored."""
        await self.endpoint(endpoint_id)
        now = self.clock()
        if (handed := self._handed_in.get((endpoint_id, job_id))) is not None:
            self._forget_handed(handed)  # the answer that handed this job over arrived
        if body.get("status") == JobStatus.IN_PROGRESS:
            change = await self.backend.update_job(
                endpoint_id,
                job_id,
                lambda j: jobs.progress(j, worker, body.get("output"), now, delivery),
            )
            return "progress" if change else await self._ignored(endpoint_id, job_id, worker)
        if is_stream and not body.get("output") and not body.get("error"):
            chunks = await self.backend.read_chunks(endpoint_id, job_id, 0)
            if chunks:
                body = {**body, "output": chunks}
        change = await self.backend.update_job(
            endpoint_id,
            job_id,
            lambda j: jobs.finish(j, worker, body, now, delivery, jitter=random.random()),
        )
        if change is None:
            return await self._ignored(endpoint_id, job_id, worker)
        self._observe(change)
        return "accepted"

    async def done_and_take(
        self,
        endpoint_id: str,
        worker: str,
        posted: ResultPost,
        take: int,
        capacity: int | None = None,
        connected: Callable[[], bool] = lambda: True,
        instance: str | None = None,
    ) -> tuple[str, list[JobRecord]]:
        """Store a result, then (`take` > 0) long-poll as a take does: the worker's next jobs
        ride on its result's request. A result posted again (the answer to the first post may
        never have been read) gets again the jobs that answer handed over."""
        job_id = posted.job_id
        outcome = await self.done(
            endpoint_id, worker, job_id, posted.body, posted.is_stream, posted.delivery
        )
        if not take:
            return outcome, []
        again = outcome == "duplicate"
        taken = await self.handed_again(endpoint_id, worker, job_id) if again else []
        if not taken:
            hold = self.timings.take_hold
            taken = await self.take(endpoint_id, worker, take, hold, capacity, connected, instance)
            self.remember_handed(endpoint_id, worker, job_id, taken)
        return outcome, taken

    async def _ignored(self, endpoint_id: str, job_id: str, worker: str) -> str:
        job = await self.backend.get_job(endpoint_id, job_id)
        if job is None or not jobs.runs_on(job, worker):
            # no stop to send it for this job any more (its current delivery keeps its own)
            await self.backend.clear_stop_signals(endpoint_id, worker, [job_id])
        if (
            job is not None
            and job.worker_id == worker
            and job.status in (JobStatus.COMPLETED, JobStatus.FAILED)
        ):
            return "duplicate"
        await self.backend.add_counters(endpoint_id, {"ignoredResults": 1})
        for observer in self.observers:
            observer.on_ignored(endpoint_id)
        return "ignored"

    async def stream_chunk(
        self, endpoint_id: str, worker: str, job_id: str, chunk: Any, delivery: int | None = None
    ) -> str:
        """Append a chunk the job's worker streamed; one of another delivery (`delivery`, when
        the worker says which: handler_worker does) is ignored and counted, as its result is."""
        await self.endpoint(endpoint_id)
        job = await self.backend.get_job(endpoint_id, job_id)
        if job is None or not jobs.runs_on(job, worker, delivery):
            return await self._ignored(endpoint_id, job_id, worker)
        await self.backend.append_chunk(endpoint_id, job_id, chunk, job.expires_at)
        await self._heartbeat(endpoint_id, worker, job_id)
        return "accepted"

    async def _heartbeat(self, endpoint_id: str, worker: str, job_id: str) -> None:
        now = self.clock()
        interval = self.timings.heartbeat_write_interval
        await self.backend.update_job(
            endpoint_id, job_id, lambda j: jobs.heartbeat(j, worker, now, interval)
        )

    async def ping(self, endpoint_id: str, worker: str, job_ids: list[str]) -> None:
        await self.endpoint(endpoint_id)
        now = self.clock()
        await self.backend.touch_worker(endpoint_id, worker, now)
        for job_id in job_ids:
            await self._heartbeat(endpoint_id, worker, job_id)
        # A stop the worker acted on: the job is gone from its pings (sent a while ago).
        pending = await self.backend.pending_stop_signals(endpoint_id, worker)
        settled = [
            job_id
            for job_id, sent in pending.items()
            if job_id not in job_ids and sent and now - sent >= self.timings.stop_resend / 2
        ]
        await self.backend.clear_stop_signals(endpoint_id, worker, settled)

    # -- admin -------------------------------------------------------------------------------
    async def queues(self, endpoints: list[str] | None = None) -> dict[str, QueueFigures]:
        """Queue figures of every endpoint (or of `endpoints`), in one pass."""
        configs = {config.id: config for config in await self.backend.list_endpoints()}
        if endpoints is not None:
            configs = {e: configs[e] for e in endpoints if e in configs}
        ids = list(configs)
        counters = await self.backend.all_counters(ids)
        activity = await self.backend.activity(ids)
        oldest = await self.backend.oldest_queued(ids)
        now = self.clock()
        figures = {}
        for endpoint_id, config in configs.items():
            live = self._live_workers(await self.backend.get_workers(endpoint_id), config, now)
            queued = counters[endpoint_id].get("inQueue", 0)
            low = min(queued, max(0, counters[endpoint_id].get("inQueueLow", 0)))
            waiting = min(queued - low, max(0, counters[endpoint_id].get("retryWaiting", 0)))
            running = counters[endpoint_id].get("inProgress", 0)
            figures[endpoint_id] = QueueFigures(
                inQueue=queued,
                inProgress=running,
                lowPriorityQueued=low,
                retriesWaiting=waiting,
                load=queued - low - waiting + running,
                workers=self._worker_counts(live, counters[endpoint_id]),
                workerStates={worker.id: worker.state for worker in live},
                workerJobs={worker.id: len(worker.jobs) for worker in live},
                lastActivity=activity.get(endpoint_id),
                queueDelaySeconds=max(0.0, now - (oldest.get(endpoint_id) or now)),
            )
        return figures

    async def queues_after(self, since: float | None, wait: float) -> dict[str, QueueFigures]:
        """All queues, held up to `wait` s until a job is queued after `since` (long-poll).

        Answers at once when some endpoint has queued jobs and activity after `since`, so a
        job enqueued between two polls is never left waiting for the next one.
        """
        notifier = self.backend.notifier
        seen = notifier.version(ENQUEUED_CHANNEL)
        figures = await self.queues()
        if since is None or wait <= 0:
            return figures
        if any(f.inQueue and (f.lastActivity or 0) > since for f in figures.values()):
            return figures
        await notifier.wait(ENQUEUED_CHANNEL, wait, since=seen)
        return await self.queues()

    async def queue(self, endpoint_id: str) -> QueueFigures:
        await self.endpoint(endpoint_id)
        return (await self.queues([endpoint_id]))[endpoint_id]

    async def leave(self, endpoint_id: str, worker: str) -> list[str]:
        """A worker shuts down (SIGTERM): its take and stop long-polls end now, it is handed
        nothing more, and it keeps finishing what it holds (returned). Expires after the
        longest long-poll, so a worker back under the same name is served again."""
        await self.endpoint(endpoint_id)
        now = self.clock()
        until = now + max(self.timings.take_hold, self.timings.stop_hold) + LEAVING_MARGIN_S
        await self.backend.set_leaving(endpoint_id, worker, now, until)
        record = (await self.backend.get_workers(endpoint_id)).get(worker)
        return sorted(record.jobs) if record else []

    def remember_handed(
        self, endpoint_id: str, worker: str, job_id: str, taken: list[JobRecord]
    ) -> None:
        """Jobs handed over in the answer to `job_id`'s result post: if the worker posts that
        result again (it never read the answer), they are handed over again."""
        if not taken:
            return
        key = (endpoint_id, worker, job_id)
        self._handed[key] = taken
        for job in taken:
            self._handed_in[(endpoint_id, job.id)] = key
        while len(self._handed) > KEPT_HAND_OVERS:
            self._forget_handed(next(iter(self._handed)))

    def _forget_handed(self, key: tuple[str, str, str]) -> None:
        for job in self._handed.pop(key, []):
            self._handed_in.pop((key[0], job.id), None)

    async def handed_again(self, endpoint_id: str, worker: str, job_id: str) -> list[JobRecord]:
        """What the answer to `job_id`'s earlier result post handed over and the worker still
        holds (none of them has reported since)."""
        again = []
        for job in self._handed.get((endpoint_id, worker, job_id), []):
            current = await self.backend.get_job(endpoint_id, job.id)
            if current and current.status == JobStatus.IN_PROGRESS and current.worker_id == worker:
                again.append(job)
        return again

    def _background(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def give_back(self, endpoint_id: str, worker: str, taken: list[JobRecord]) -> None:
        """Jobs claimed for a take whose caller was gone before the answer reached it: back to
        the queue at once, not a delivery (no retry counted), instead of sitting IN_PROGRESS on
        nobody until the heartbeat deadline."""
        changes = []
        for job in taken:
            change = await self.backend.update_job(
                endpoint_id, job.id, lambda j: jobs.give_back(j, worker)
            )
            if change is not None:
                changes.append(change)
                log.info("job %s/%s %s", endpoint_id, job.id, change.note)
        self._observe(changes)

    async def drain(self, endpoint_id: str, worker: str, draining: bool) -> list[str]:
        """Mark a worker (un)draining; returns the jobs it still holds."""
        await self.endpoint(endpoint_id)
        await self.backend.set_draining(endpoint_id, worker, draining, self.clock())
        record = (await self.backend.get_workers(endpoint_id)).get(worker)
        return sorted(record.jobs) if record else []

    async def dead_letters(self, endpoint_id: str) -> list[JobRecord]:
        await self.endpoint(endpoint_id)
        found = []
        for job_id in await self.backend.dead_letters(endpoint_id):
            job = await self.backend.get_job(endpoint_id, job_id)
            if job is not None:
                found.append(job)
        return found

    async def replay(self, endpoint_id: str, ids: list[str] | None) -> list[str]:
        await self.endpoint(endpoint_id)
        dead = await self.backend.dead_letters(endpoint_id)
        unknown = sorted(set(ids or []) - set(dead))
        if unknown:
            raise NotFound(f"not in the dead-letter queue of '{endpoint_id}': {unknown}")
        replayed = []
        for job_id in ids if ids is not None else dead:
            change = await self.backend.update_job(
                endpoint_id, job_id, lambda j: jobs.requeue(j, self.clock(), reset_attempts=True)
            )
            if change is not None:
                self._observe(change)
                replayed.append(job_id)
        return replayed

    # -- sweeper -----------------------------------------------------------------------------
    async def sweep(self) -> list[Change]:
        """One pass: timeouts, lost workers, queued-job expiry, old records, stale workers.
        After a backend outage, a worker's silence counts only from the end of it (its pings
        failed meanwhile), and so after a stall (its pings waited): live workers' jobs are not
        redelivered for time nobody could see."""
        try:
            return await self._sweep()
        except BackendUnavailable:
            self._blind = True
            raise

    async def _sweep(self) -> list[Change]:
        if not await self.backend.acquire_lease("sweeper", self.replica, 5.0):
            return []
        changes: list[Change] = []
        now = self.clock()
        if self._blind:
            self._blind, self._seen_from = False, now
        # A backend that stalled (answered late, not failed) held workers' pings as well.
        seen_from = max(self._seen_from, self.backend.unseen_until())
        for config in await self.backend.list_endpoints():
            endpoint_id, lost_after = config.id, config.lost_after_s
            for job_id in await self.backend.active_job_ids(endpoint_id):
                change = await self.backend.update_job(
                    endpoint_id,
                    job_id,
                    lambda j, after=lost_after: (
                        jobs.time_out(j, now) or jobs.lose_worker(j, now, after, seen_from)
                    ),
                )
                if change is not None:
                    changes.append(change)
            for job_id in await self.backend.expired_queued_ids(endpoint_id, now, 100):
                change = await self.backend.update_job(
                    endpoint_id, job_id, lambda j: jobs.expire_in_queue(j, now)
                )
                if change is not None:
                    changes.append(change)
            for job_id in await self.backend.due_retries(endpoint_id, now, 100):
                change = await self.backend.update_job(
                    endpoint_id, job_id, lambda j: jobs.release_retry(j, now)
                )
                if change is not None:
                    changes.append(change)
                    continue
                job = await self.backend.get_job(endpoint_id, job_id)
                if job is None or job.status != JobStatus.IN_QUEUE or job.retry_at is None:
                    await self.backend.forget_delayed(endpoint_id, job_id)  # ended meanwhile
            await self.backend.forget_expired(endpoint_id, now)
            stale_after = max(lost_after * 2, 60.0)
            for worker in (await self.backend.get_workers(endpoint_id)).values():
                if not worker.jobs and now - worker.last_seen > stale_after:
                    await self.backend.remove_worker(endpoint_id, worker.id)
        self._observe(changes)
        for change in changes:
            log.info("job %s/%s %s", change.job.endpoint, change.job.id, change.note)
        return changes

    async def run_sweeper(self) -> None:
        """Sweep until `stopping` is set (a flag as well as cancellation: redis-py may swallow one)."""
        while not self.stopping:
            try:
                await self.sweep()
            except Exception as exc:  # keep sweeping; the backend may be back next time
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError from exc
                log.warning("sweep failed: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(self.timings.sweep_interval)
