"""The embedded in-memory backend (`memory://`): one process, no persistence; for dev and tests.

Operations run without awaiting inside, so each one is atomic on the event loop.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from handler_gateway import jobs
from handler_gateway.backends import (
    Admission,
    Backend,
    Notifier,
    RateRefused,
    Take,
    Transition,
    WorkerPoll,
    WorkerRecord,
    change_channels,
    leaving_channels,
    take_from_bucket,
)
from handler_gateway.errors import QueueFull
from handler_gateway.jobs import COUNTERS, Change, JobRecord, JobStatus
from handler_protocol.models import EndpointConfig, HandlerProblem


class _EndpointState:
    def __init__(self, config: EndpointConfig):
        self.config = config
        self.jobs: dict[str, JobRecord] = {}
        self.queue: deque[str] = deque()
        self.low_queue: deque[str] = deque()  # low-priority jobs: taken when `queue` is empty
        self.active: set[str] = set()
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.chunks: dict[str, list[Any]] = {}
        self.workers: dict[str, WorkerRecord] = {}
        self.leaving: dict[str, float] = {}  # worker -> until
        self.instances: dict[str, str] = {}  # worker -> the process serving under its name
        self.stops: dict[str, dict[str, float]] = {}
        self.dead: list[str] = []
        self.activity: float | None = None
        self.problem: HandlerProblem | None = None
        self.delayed: dict[str, float] = {}  # retries waiting: job id -> when due

    def queue_of(self, job: JobRecord) -> deque[str]:
        return self.low_queue if job.low_priority else self.queue

    def next_queued(self) -> str | None:
        """The id at the head of the queues (the low-priority one only when the other is
        empty), popped; None when both are empty."""
        for queue in (self.queue, self.low_queue):
            if queue:
                return queue.popleft()
        return None


class MemoryBackend(Backend):
    def __init__(self) -> None:
        self.notifier = Notifier()
        self._endpoints: dict[str, _EndpointState] = {}
        self._leases: dict[str, tuple[str, float]] = {}
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}

    def _state(self, endpoint: str) -> _EndpointState | None:
        return self._endpoints.get(endpoint)

    # -- endpoints -------------------------------------------------------------------------
    async def put_endpoint(self, config: EndpointConfig) -> None:
        state = self._endpoints.get(config.id)
        if state is None:
            self._endpoints[config.id] = _EndpointState(config)
        else:
            state.config = config

    async def get_endpoint(self, endpoint: str) -> EndpointConfig | None:
        state = self._state(endpoint)
        return state.config if state else None

    async def delete_endpoint(self, endpoint: str) -> bool:
        return self._endpoints.pop(endpoint, None) is not None

    async def list_endpoints(self) -> list[EndpointConfig]:
        return [state.config for state in self._endpoints.values()]

    # -- jobs --------------------------------------------------------------------------------
    def _apply(self, state: _EndpointState, old: JobRecord | None, change: Change) -> None:
        job, effects = change.job, change.effects
        state.jobs[job.id] = job
        if effects.delay_until is not None:
            state.delayed[job.id] = effects.delay_until
        if effects.undelay:
            state.delayed.pop(job.id, None)
        if job.status == JobStatus.IN_PROGRESS:
            state.active.add(job.id)
        else:
            state.active.discard(job.id)
        if effects.enqueue and effects.to_head:
            state.queue_of(job).appendleft(job.id)
        elif effects.enqueue:
            state.queue_of(job).append(job.id)
        for name, delta in effects.counters.items():
            state.counters[name] = state.counters.get(name, 0) + delta
        if effects.release_worker and effects.release_worker in state.workers:
            state.workers[effects.release_worker].jobs.discard(job.id)
        if effects.assign_worker:
            worker = state.workers.setdefault(
                effects.assign_worker, WorkerRecord(effects.assign_worker, job.started_at or 0)
            )
            worker.jobs.add(job.id)
        if effects.stop_worker:
            state.stops.setdefault(effects.stop_worker, {})[job.id] = 0.0
        if effects.activity:
            state.activity = max(
                state.activity or 0.0, job.finished_at or job.started_at or job.created_at
            )
        if effects.dead_letter:
            state.dead.append(job.id)
        if effects.undead_letter and job.id in state.dead:
            state.dead.remove(job.id)
        for channel in change_channels(change):
            self.notifier.notify(channel)

    async def create_job(self, change: Change, admission: Admission | None = None) -> None:
        endpoint = change.job.endpoint
        state = self._state(endpoint)
        if state is None:
            raise KeyError(endpoint)
        if admission is not None:
            limit = admission.max_queued
            if limit is not None and state.counters.get("inQueue", 0) >= limit:
                raise QueueFull(endpoint, limit)
            if admission.bucket is not None:
                admission.taken, wait = self._take(endpoint, admission.bucket, admission)
                if not admission.taken:
                    raise RateRefused(wait)
        self._apply(state, None, change)

    async def get_job(self, endpoint: str, job_id: str) -> JobRecord | None:
        state = self._state(endpoint)
        return state.jobs.get(job_id) if state else None

    async def update_job(self, endpoint: str, job_id: str, transition: Transition) -> Change | None:
        state = self._state(endpoint)
        job = state.jobs.get(job_id) if state else None
        if job is None:
            return None
        change = transition(job)
        if change is not None:
            self._apply(state, job, change)
        return change

    async def take_jobs(
        self, endpoint: str, worker: str, count: int, capacity: int | None, now: float
    ) -> Take:
        poll = await self.poll_worker(endpoint, worker, now)
        allowed = count if capacity is None else min(count, capacity - poll.held)
        state = self._state(endpoint)
        changes: list[Change] = []
        started = 0
        while state and started < allowed and not (poll.draining or poll.leaving):
            if (job_id := state.next_queued()) is None:
                break
            job = state.jobs.get(job_id)
            change = jobs.start(job, worker, now) if job is not None else None
            if change is None:
                continue
            self._apply(state, job, change)
            changes.append(change)
            started += change.job.status == JobStatus.IN_PROGRESS
        return Take(poll, changes, not (state and (state.queue or state.low_queue)))

    async def recent_jobs(
        self, endpoint: str, before: tuple[float, str] | None, limit: int
    ) -> list[JobRecord]:
        state = self._state(endpoint)
        if state is None:
            return []
        newest = sorted(state.jobs.values(), key=lambda j: (j.created_at, j.id), reverse=True)
        if before is not None:
            newest = [j for j in newest if (j.created_at, j.id) < before]
        return [j.model_copy(update={"input": None}) for j in newest[:limit]]

    async def queued_job_ids(self, endpoint: str, limit: int) -> list[str]:
        state = self._state(endpoint)
        return [*state.queue, *state.low_queue][:limit] if state else []

    async def active_job_ids(self, endpoint: str) -> list[str]:
        state = self._state(endpoint)
        return list(state.active) if state else []

    async def purge_queue(self, endpoint: str, transition: Transition) -> list[Change]:
        state = self._state(endpoint)
        changes: list[Change] = []
        while state and (job_id := state.next_queued()) is not None:
            job = state.jobs.get(job_id)
            change = transition(job) if job is not None else None
            if change is not None:
                self._apply(state, job, change)
                changes.append(change)
        for job_id in list(state.delayed) if state else []:
            job = state.jobs.get(job_id)
            change = transition(job) if job is not None else None
            state.delayed.pop(job_id, None)
            if change is not None:
                self._apply(state, job, change)
                changes.append(change)
        return changes

    async def due_retries(self, endpoint: str, now: float, limit: int) -> list[str]:
        state = self._state(endpoint)
        due = (
            sorted((at, job_id) for job_id, at in state.delayed.items() if at <= now)
            if state
            else []
        )
        return [job_id for _, job_id in due[:limit]]

    async def forget_delayed(self, endpoint: str, job_id: str) -> None:
        state = self._state(endpoint)
        if state is not None:
            state.delayed.pop(job_id, None)

    # -- streams -----------------------------------------------------------------------------
    async def append_chunk(self, endpoint: str, job_id: str, chunk: Any, expire_at: float) -> None:
        state = self._state(endpoint)
        if state is not None:
            state.chunks.setdefault(job_id, []).append(chunk)

    async def read_chunks(self, endpoint: str, job_id: str, start: int) -> list[Any]:
        state = self._state(endpoint)
        return list(state.chunks.get(job_id, [])[start:]) if state else []

    # -- workers -----------------------------------------------------------------------------
    async def touch_worker(self, endpoint: str, worker: str, now: float) -> None:
        state = self._state(endpoint)
        if state is None:
            return
        record = state.workers.setdefault(worker, WorkerRecord(worker, now))
        record.last_seen = now

    async def get_workers(self, endpoint: str) -> dict[str, WorkerRecord]:
        state = self._state(endpoint)
        if state is None:
            return {}
        return {
            key: WorkerRecord(w.id, w.last_seen, w.draining, set(w.jobs))
            for key, w in state.workers.items()
        }

    async def set_draining(self, endpoint: str, worker: str, draining: bool, now: float) -> None:
        state = self._state(endpoint)
        if state is not None:
            state.workers.setdefault(worker, WorkerRecord(worker, now)).draining = draining

    async def set_leaving(self, endpoint: str, worker: str, now: float, until: float) -> None:
        state = self._state(endpoint)
        if state is not None:
            state.workers.setdefault(worker, WorkerRecord(worker, now))
            state.leaving[worker] = until
            for channel in leaving_channels(endpoint, worker):
                self.notifier.notify(channel)

    async def poll_worker(self, endpoint: str, worker: str, now: float) -> WorkerPoll:
        await self.touch_worker(endpoint, worker, now)
        state = self._state(endpoint)
        record = state.workers.get(worker) if state else None
        leaving = state is not None and state.leaving.get(worker, 0.0) > now
        if state is not None and not leaving:
            state.leaving.pop(worker, None)
        if record is None:
            return WorkerPoll(0, False, leaving)
        return WorkerPoll(len(record.jobs), record.draining, leaving)

    async def remove_worker(self, endpoint: str, worker: str) -> None:
        state = self._state(endpoint)
        if state is not None:
            state.workers.pop(worker, None)
            state.leaving.pop(worker, None)
            state.stops.pop(worker, None)
            state.instances.pop(worker, None)

    async def swap_instance(self, endpoint: str, worker: str, instance: str) -> str | None:
        state = self._state(endpoint)
        if state is None:
            return None
        previous = state.instances.get(worker)
        state.instances[worker] = instance
        if previous is not None and previous != instance:
            state.leaving.pop(worker, None)
        return previous

    async def worker_draining(self, endpoint: str, worker: str) -> bool:
        state = self._state(endpoint)
        record = state.workers.get(worker) if state else None
        return bool(record and record.draining)

    async def worker_job_count(self, endpoint: str, worker: str) -> int:
        state = self._state(endpoint)
        record = state.workers.get(worker) if state else None
        return len(record.jobs) if record else 0

    async def due_stop_signals(
        self, endpoint: str, worker: str, now: float, resend_after: float
    ) -> list[str]:
        state = self._state(endpoint)
        pending = state.stops.get(worker, {}) if state else {}
        due = [job for job, sent in pending.items() if now - sent >= resend_after]
        for job in due:
            pending[job] = now
        return due

    async def pending_stop_signals(self, endpoint: str, worker: str) -> dict[str, float]:
        state = self._state(endpoint)
        return dict(state.stops.get(worker, {})) if state else {}

    async def clear_stop_signals(self, endpoint: str, worker: str, job_ids: list[str]) -> None:
        state = self._state(endpoint)
        pending = state.stops.get(worker) if state else None
        for job in job_ids if pending is not None else ():
            pending.pop(job, None)

    # -- figures -----------------------------------------------------------------------------
    async def counters(self, endpoint: str) -> dict[str, int]:
        state = self._state(endpoint)
        return dict(state.counters) if state else dict.fromkeys(COUNTERS, 0)

    async def add_counters(self, endpoint: str, deltas: dict[str, int]) -> None:
        state = self._state(endpoint)
        if state is not None:
            for name, delta in deltas.items():
                state.counters[name] = state.counters.get(name, 0) + delta

    async def all_counters(self, endpoints: list[str]) -> dict[str, dict[str, int]]:
        return {endpoint: await self.counters(endpoint) for endpoint in endpoints}

    async def activity(self, endpoints: list[str]) -> dict[str, float | None]:
        return {
            endpoint: (state.activity if (state := self._state(endpoint)) else None)
            for endpoint in endpoints
        }

    async def oldest_queued(self, endpoints: list[str]) -> dict[str, float | None]:
        found: dict[str, float | None] = {}
        for endpoint in endpoints:
            state = self._state(endpoint)
            head = state.jobs.get(state.queue[0]) if state and state.queue else None
            found[endpoint] = head.created_at if head is not None else None
        return found

    async def dead_letters(self, endpoint: str) -> list[str]:
        state = self._state(endpoint)
        return list(state.dead) if state else []

    async def set_problem(self, endpoint: str, problem: HandlerProblem | None) -> None:
        state = self._state(endpoint)
        if state is not None:
            state.problem = problem

    async def get_problem(self, endpoint: str) -> HandlerProblem | None:
        state = self._state(endpoint)
        return state.problem if state else None

    # -- housekeeping ------------------------------------------------------------------------
    async def take_tokens(
        self, endpoint: str, bucket: str, rate: float, burst: int, wanted: int, now: float
    ) -> tuple[int, float]:
        return self._take(endpoint, bucket, Admission(None, bucket, rate, burst, wanted, now))

    def _take(self, endpoint: str, bucket: str, asked: Admission) -> tuple[int, float]:
        now = asked.now
        tokens, at = self._buckets.get((endpoint, bucket), (float(asked.burst), now))
        tokens, at, taken, wait = take_from_bucket(
            tokens, at, now, asked.rate, asked.burst, asked.wanted
        )
        self._buckets[(endpoint, bucket)] = (tokens, at)
        return taken, wait

    async def acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        return True

    async def forget_expired(self, endpoint: str, now: float) -> int:
        state = self._state(endpoint)
        if state is None:
            return 0
        expired = [
            job_id
            for job_id, job in state.jobs.items()
            if job.terminal and job.expires_at <= now and job_id not in state.dead
        ]
        for job_id in expired:
            del state.jobs[job_id]
            state.chunks.pop(job_id, None)
        return len(expired)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
