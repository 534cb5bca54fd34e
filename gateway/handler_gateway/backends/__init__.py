"""Queue backends: the storage interface the gateway's operations run on, and its factory.

A backend persists job records and applies a transition's `Effects` atomically (queue, counters,
worker assignment, stop signals, dead letters) and wakes long-polls through channels. Two
implementations pass the same contract suite: `memory://` (embedded) and `redis://`.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from handler_gateway import jobs
from handler_gateway.jobs import Change, JobRecord
from handler_protocol.models import EndpointConfig, HandlerProblem

Transition = Callable[[JobRecord], Change | None]


class BackendUnavailable(Exception):
    """The backend (Redis) cannot be reached; the request must be retried later (HTTP 503)."""


class RateRefused(Exception):
    """A new job's caller has no token left in its rate-limit bucket: `wait` s until one."""

    def __init__(self, wait: float):
        super().__init__(f"no token for {wait:.3f} s")
        self.wait = wait


@dataclass
class Admission:
    """What a new job must pass to be stored, checked with its creation, atomically: the
    endpoint's queue limit, and tokens (up to `wanted`) from its caller's rate-limit bucket;
    the backend sets `taken` (the job's own token among them)."""

    max_queued: int | None = None
    bucket: str | None = None  # the caller's bucket, when a rate limit applies
    rate: float = 0.0
    burst: int = 0
    wanted: int = 1
    now: float = 0.0  # the gateway's clock (Redis uses its own)
    taken: int = 0


@dataclass
class WorkerRecord:
    id: str
    last_seen: float
    draining: bool = False
    jobs: set[str] = field(default_factory=set)

    @property
    def state(self) -> str:
        if self.draining:
            return "draining"
        return "running" if self.jobs else "idle"


class WorkerPoll(NamedTuple):
    held: int  # jobs the worker holds
    draining: bool  # the operator drains it: no new jobs, long-polls held as usual
    leaving: bool  # it is shutting down: no new jobs, long-polls answered at once


class Take(NamedTuple):
    poll: WorkerPoll  # the worker as the take found it
    changes: list[Change]  # starts, and expiries of jobs whose ttl passed in the queue
    emptied: bool  # the queue was empty when the take ended


# Notified on every enqueue, on any endpoint: wakes the autoscaler's long-poll of all queues.
ENQUEUED_CHANNEL = "enqueued"


def queue_channel(endpoint: str) -> str:
    return f"queue:{endpoint}"


def job_channel(endpoint: str, job_id: str) -> str:
    return f"job:{endpoint}:{job_id}"


def stop_channel(endpoint: str, worker: str) -> str:
    return f"stop:{endpoint}:{worker}"


def worker_channel(endpoint: str, worker: str) -> str:
    """Notified when the worker lets go of a job (a take held by its capacity goes on) or
    leaves."""
    return f"worker:{endpoint}:{worker}"


def change_channels(change: Change) -> list[str]:
    """Channels to wake after `change` is stored."""
    job = change.job
    channels = []
    if change.effects.enqueue:
        channels += [queue_channel(job.endpoint), ENQUEUED_CHANNEL]
    if change.effects.release_worker:
        channels.append(worker_channel(job.endpoint, change.effects.release_worker))
    if job.terminal:
        channels.append(job_channel(job.endpoint, job.id))
    if change.effects.stop_worker:
        channels.append(stop_channel(job.endpoint, change.effects.stop_worker))
    return channels


def leaving_channels(endpoint: str, worker: str) -> list[str]:
    """Channels to wake when a worker says it leaves: its take and stop long-polls end."""
    return [
        queue_channel(endpoint),
        worker_channel(endpoint, worker),
        stop_channel(endpoint, worker),
    ]


class Notifier:
    """In-process wake-ups for long-polls, keyed by channel name.

    Take `version(channel)` before checking storage and pass it to `wait(..., since=...)`: a
    notification that lands in between is not lost (the wait returns at once).
    """

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._versions: dict[str, int] = {}

    MAX_VERSIONS = 10_000

    def version(self, channel: str) -> int:
        return self._versions.get(channel, 0)

    async def wait(self, channel: str, timeout: float, since: int | None = None) -> bool:
        """Wait until `channel` is notified or `timeout` passes; True when notified."""
        if since is not None and self._versions.get(channel, 0) != since:
            return True
        if timeout <= 0:
            return False
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(channel, set())
        waiters.add(future)
        try:
            await asyncio.wait_for(future, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            waiters.discard(future)
            if not waiters:
                self._waiters.pop(channel, None)

    def notify(self, channel: str) -> None:
        if len(self._versions) >= self.MAX_VERSIONS:
            # Forget idle channels; a reader holding an old version just wakes once for nothing.
            self._versions = {c: v for c, v in self._versions.items() if c in self._waiters}
        self._versions[channel] = self._versions.get(channel, 0) + 1
        for future in self._waiters.get(channel, ()):
            if not future.done():
                future.set_result(None)


class Backend(ABC):
    """Storage of endpoints, jobs, streams and workers. All methods may raise BackendUnavailable."""

    notifier: Notifier

    # -- endpoints -------------------------------------------------------------------------
    @abstractmethod
    async def put_endpoint(self, config: EndpointConfig) -> None: ...

    @abstractmethod
    async def get_endpoint(self, endpoint: str) -> EndpointConfig | None: ...

    @abstractmethod
    async def delete_endpoint(self, endpoint: str) -> bool:
        """Remove the endpoint with all its jobs, queue, streams and workers."""

    @abstractmethod
    async def list_endpoints(self) -> list[EndpointConfig]: ...

    # -- jobs --------------------------------------------------------------------------------
    @abstractmethod
    async def create_job(self, change: Change, admission: Admission | None = None) -> None:
        """Store a new job and enqueue it (a `jobs.new_job` change), unless `admission` refuses
        it, atomically: QueueFull when `max_queued` jobs are queued already, RateRefused when
        its caller's bucket is empty."""

    @abstractmethod
    async def get_job(self, endpoint: str, job_id: str) -> JobRecord | None: ...

    @abstractmethod
    async def update_job(self, endpoint: str, job_id: str, transition: Transition) -> Change | None:
        """Apply `transition` to the stored job atomically; None when it is absent or unchanged."""

    @abstractmethod
    async def take_jobs(
        self, endpoint: str, worker: str, count: int, capacity: int | None, now: float
    ) -> Take:
        """A worker's take, atomically and in one round trip: mark it seen and, unless it is
        draining or leaving, pop up to `count` queued jobs (fewer when it would then hold more
        than `capacity`) and apply `jobs.start(job, worker, now)` to each.

        Entries whose job is no longer queued are dropped.
        """

    async def create_and_take(
        self,
        change: Change,
        worker: str,
        count: int,
        capacity: int | None,
        now: float,
        admission: Admission | None = None,
    ) -> Take:
        """`create_job(change, admission)`, then `take_jobs(...)`, as one atomic step where the
        backend can (a submit handed straight to a waiting worker; the queue's order holds)."""
        await self.create_job(change, admission)
        return await self.take_jobs(change.job.endpoint, worker, count, capacity, now)

    @abstractmethod
    async def recent_jobs(
        self, endpoint: str, before: tuple[float, str] | None, limit: int
    ) -> list[JobRecord]:
        """Up to `limit` of the endpoint's jobs still kept, newest first (by creation time,
        then id), created before the job `before` names ((created_at, id); None: from the
        newest). Without their input."""

    @abstractmethod
    async def queued_job_ids(self, endpoint: str, limit: int) -> list[str]:
        """Ids at the head of the queue (oldest first), for ttl sweeps."""

    async def expired_queued_ids(self, endpoint: str, now: float, limit: int) -> list[str]:
        """Ids among the first `limit` queued whose ttl has passed at `now` (ttl sweeps)."""
        expired = []
        for job_id in await self.queued_job_ids(endpoint, limit):
            job = await self.get_job(endpoint, job_id)
            if job is not None and jobs.expire_in_queue(job, now) is not None:
                expired.append(job_id)
        return expired

    @abstractmethod
    async def active_job_ids(self, endpoint: str) -> list[str]:
        """Ids of the endpoint's IN_PROGRESS jobs."""

    @abstractmethod
    async def purge_queue(self, endpoint: str, transition: Transition) -> list[Change]:
        """Apply `transition` (`jobs.purge`) to every queued job and empty the queue; the
        changes made (a job a take started meanwhile is left to its worker: the transition is
        applied at the revision it was computed from)."""

    # -- streams -----------------------------------------------------------------------------
    @abstractmethod
    async def append_chunk(
        self, endpoint: str, job_id: str, chunk: Any, expire_at: float
    ) -> None: ...

    @abstractmethod
    async def read_chunks(self, endpoint: str, job_id: str, start: int) -> list[Any]: ...

    # -- workers -----------------------------------------------------------------------------
    @abstractmethod
    async def touch_worker(self, endpoint: str, worker: str, now: float) -> None: ...

    @abstractmethod
    async def get_workers(self, endpoint: str) -> dict[str, WorkerRecord]: ...

    @abstractmethod
    async def set_draining(
        self, endpoint: str, worker: str, draining: bool, now: float
    ) -> None: ...

    @abstractmethod
    async def remove_worker(self, endpoint: str, worker: str) -> None: ...

    @abstractmethod
    async def swap_instance(self, endpoint: str, worker: str, instance: str) -> str | None:
        """Record the process (`instance`) now serving under the worker's name; the one before
        (None: none known). A different one is a restart: the leaving mark of its predecessor
        is cleared at once."""

    @abstractmethod
    async def worker_draining(self, endpoint: str, worker: str) -> bool: ...

    @abstractmethod
    async def worker_job_count(self, endpoint: str, worker: str) -> int: ...

    @abstractmethod
    async def set_leaving(self, endpoint: str, worker: str, now: float, until: float) -> None:
        """The worker is shutting down (SIGTERM): until `until` its long-polls end at once and
        it is handed nothing; its long-polls are woken now. Expires by itself, so a worker that
        comes back under the same name is served again."""

    @abstractmethod
    async def poll_worker(self, endpoint: str, worker: str, now: float) -> WorkerPoll:
        """Mark the worker seen; return what a long-poll needs to know. One round trip."""

    @abstractmethod
    async def due_stop_signals(
        self, endpoint: str, worker: str, now: float, resend_after: float
    ) -> list[str]:
        """Jobs the worker must stop, not sent within `resend_after` s; marks them sent now.

        A stop stays pending until cleared: the SDK drops a stop that arrives before the job's
        task exists, so it is sent again until the worker lets go of the job.
        """

    @abstractmethod
    async def pending_stop_signals(self, endpoint: str, worker: str) -> dict[str, float]:
        """Pending stops of the worker: job id -> when last sent (0: never)."""

    @abstractmethod
    async def clear_stop_signals(self, endpoint: str, worker: str, job_ids: list[str]) -> None: ...

    # -- figures -----------------------------------------------------------------------------
    @abstractmethod
    async def counters(self, endpoint: str) -> dict[str, int]: ...

    @abstractmethod
    async def add_counters(self, endpoint: str, deltas: dict[str, int]) -> None: ...

    @abstractmethod
    async def all_counters(self, endpoints: list[str]) -> dict[str, dict[str, int]]: ...

    @abstractmethod
    async def activity(self, endpoints: list[str]) -> dict[str, float | None]: ...

    @abstractmethod
    async def oldest_queued(self, endpoints: list[str]) -> dict[str, float | None]:
        """When the next normal-priority job to run (the queue's head) was created."""

    @abstractmethod
    async def dead_letters(self, endpoint: str) -> list[str]: ...

    # -- retries on error ----------------------------------------------------------------------
    @abstractmethod
    async def due_retries(self, endpoint: str, now: float, limit: int) -> list[str]:
        """Up to `limit` retries waiting whose time has come, soonest first."""

    @abstractmethod
    async def forget_delayed(self, endpoint: str, job_id: str) -> None:
        """Drop a delayed entry whose job no longer waits (ended otherwise)."""

    # -- handler problems ----------------------------------------------------------------------
    @abstractmethod
    async def set_problem(self, endpoint: str, problem: HandlerProblem | None) -> None:
        """Store (None: clear) why the endpoint's workers fail; gone with the endpoint."""

    @abstractmethod
    async def get_problem(self, endpoint: str) -> HandlerProblem | None: ...

    # -- rate limits -------------------------------------------------------------------------
    @abstractmethod
    async def take_tokens(
        self, endpoint: str, bucket: str, rate: float, burst: int, wanted: int, now: float
    ) -> tuple[int, float]:
        """Take up to `wanted` tokens from `endpoint`'s bucket `bucket` (holds `burst`, refilled
        at `rate` per second, shared by every gateway replica): (taken, 0.0), or (0, the seconds
        until one is there)."""

    # -- housekeeping ------------------------------------------------------------------------
    @abstractmethod
    async def acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        """True when `owner` holds the named lease (one sweeper among gateway replicas)."""

    @abstractmethod
    async def forget_expired(self, endpoint: str, now: float) -> int:
        """Delete terminal job records past their expiry (where storage does not expire them)."""

    @abstractmethod
    async def ping(self) -> None: ...

    def unseen_until(self) -> float:
        """The end (time.time()) of the latest stretch in which the backend answered nothing
        though asked (a stalled Redis): whatever was sent meanwhile, a worker's ping among it,
        waited. 0.0: none seen."""
        return 0.0

    @abstractmethod
    async def close(self) -> None: ...


def take_from_bucket(
    tokens: float, at: float, now: float, rate: float, burst: int, wanted: int = 1
) -> tuple[float, float, int, float]:
    """A token bucket that held `tokens` at `at`, asked for up to `wanted` at `now`: (tokens,
    at, taken, wait), wait 0.0 unless none was taken. The Redis script does the same in Lua."""
    if now > at:
        tokens, at = min(float(burst), tokens + (now - at) * rate), now
    if tokens >= 1:
        taken = min(wanted, int(tokens))
        return tokens - taken, at, taken, 0.0
    return tokens, at, 0, (1 - tokens) / rate


def open_backend(url: str, **options: Any) -> Backend:
    """`memory://`, `redis://host:port/db` or `redis+sentinel://host:port,.../service/db`
    (options: key `prefix`, `replica` name, `wait_replicas`)."""
    if url.startswith("memory://"):
        from handler_gateway.backends.memory import MemoryBackend

        return MemoryBackend()
    if url.startswith(("redis://", "rediss://", "unix://", "redis+sentinel://")):
        from handler_gateway.backends.redis_scripts import RedisBackend

        return RedisBackend(url, **options)
    raise ValueError(
        f"unknown backend URL '{url}': use memory://, redis://host:port/db "
        "or redis+sentinel://host:port[,host:port...]/service[/db]"
    )
