"""Property-based test over random operation sequences of the gateway's operations and backend.

Invariants after every step, on memory and on a real Redis: each job is in exactly one state; a
COMPLETED job stays COMPLETED; other terminal jobs leave their state only through retry/replay;
the counters in `health` equal the number of jobs in each state; workers hold exactly their
running jobs. At the end, driving every job to its end leaves each in one terminal state.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from handler_gateway.backends import open_backend
from handler_gateway.errors import Conflict
from handler_gateway.jobs import TERMINAL, JobStatus
from handler_gateway.operations import Gateway, Timings
from handler_protocol.models import EndpointConfig, RunRequest
from tests.gateway.conftest import clean_redis_prefix, redis_url

WORKERS = ["w1", "w2", "w3"]
ENDPOINT = "prop"


class Clock:
    """Starts at the real time (Redis expires records by real time) and moves only when told."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class GatewayMachine(RuleBasedStateMachine):
    backend_url = "memory://"

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.prefix = f"prop-{uuid.uuid4().hex[:8]}"
        self.clock = Clock()
        backend = open_backend(self.backend_url, prefix=self.prefix)
        self.gateway = Gateway(backend, Timings(heartbeat_write_interval=0), clock=self.clock)
        self.config = EndpointConfig(
            id=ENDPOINT,
            workerToken="t" * 16,
            executionTimeoutSeconds=30,
            ttlSeconds=10_000,
            maxRetries=1,
            heartbeatIntervalSeconds=2,
            heartbeatMisses=2,
        )
        self.run(self.gateway.put_endpoint(self.config))
        self.seen: dict[str, JobStatus] = {}

    def run(self, coroutine):
        return self.loop.run_until_complete(coroutine)

    def teardown(self) -> None:
        try:
            self.drive_everything_to_its_end()
        finally:
            self.run(self.gateway.backend.close())
            self.loop.close()
            if self.backend_url != "memory://":
                clean_redis_prefix(self.prefix)

    jobs = Bundle("jobs")

    # -- rules -----------------------------------------------------------------------------
    @rule(target=jobs)
    def submit(self):
        job = self.run(self.gateway.submit(ENDPOINT, RunRequest(input={"x": 1})))
        self.seen[job.id] = job.status
        return job.id

    @rule(worker=st.sampled_from(WORKERS), count=st.integers(1, 3))
    def take(self, worker, count):
        before = self.states()
        taken = self.run(self.gateway.take(ENDPOINT, worker, count, hold=0))
        for job in taken:
            assert before[job.id] == JobStatus.IN_QUEUE, "only queued jobs are handed out"
            assert job.worker_id == worker

    @rule(job_id=jobs, worker=st.sampled_from(WORKERS), ok=st.booleans())
    def finish(self, job_id, worker, ok):
        job = self.run(self.gateway.job(ENDPOINT, job_id))
        body = {"output": "done"} if ok else {"error": "handler failed"}
        outcome = self.run(self.gateway.done(ENDPOINT, worker, job_id, body, False))
        if job.status == JobStatus.IN_PROGRESS and job.worker_id == worker:
            assert outcome == "accepted"
        else:
            assert outcome in ("ignored", "duplicate")

    @rule(job_id=jobs)
    def cancel(self, job_id):
        self.run(self.gateway.cancel(ENDPOINT, job_id))

    @rule(job_id=jobs)
    def retry(self, job_id):
        before = self.states()[job_id]
        try:
            self.run(self.gateway.retry(ENDPOINT, job_id))
            assert before in (JobStatus.FAILED, JobStatus.TIMED_OUT, JobStatus.CANCELLED)
            self.seen[job_id] = JobStatus.IN_QUEUE
        except Conflict:
            assert before not in (JobStatus.FAILED, JobStatus.TIMED_OUT, JobStatus.CANCELLED)

    @rule()
    def purge(self):
        self.run(self.gateway.purge(ENDPOINT))

    @rule(worker=st.sampled_from(WORKERS))
    def heartbeat(self, worker):
        running = [j for j, s in self.states().items() if s == JobStatus.IN_PROGRESS]
        self.run(self.gateway.ping(ENDPOINT, worker, running))

    @rule(seconds=st.sampled_from([0.5, 3.0, 5.0, 40.0]))
    def time_passes(self, seconds):
        self.clock.now += seconds
        self.run(self.gateway.sweep())

    @precondition(lambda self: self.seen)
    @rule()
    def replay_dead_letters(self):
        dead = self.run(self.gateway.backend.dead_letters(ENDPOINT))
        replayed = self.run(self.gateway.replay(ENDPOINT, None))
        assert sorted(replayed) == sorted(set(dead))
        for job_id in replayed:
            self.seen[job_id] = JobStatus.IN_QUEUE

    # -- invariants --------------------------------------------------------------------------
    def states(self) -> dict[str, JobStatus]:
        found = {}
        for job_id in self.seen:
            job = self.run(self.gateway.backend.get_job(ENDPOINT, job_id))
            assert job is not None, f"accepted job {job_id} was lost"
            found[job_id] = job.status
        return found

    @invariant()
    def terminal_states_are_stable(self):
        for job_id, status in self.states().items():
            previous = self.seen[job_id]
            if previous == JobStatus.COMPLETED:
                assert status == JobStatus.COMPLETED
            self.seen[job_id] = status

    @invariant()
    def counts_match_states(self):
        states = list(self.states().values())
        health = self.run(self.gateway.health(ENDPOINT))
        assert health.jobs.inQueue == states.count(JobStatus.IN_QUEUE)
        assert health.jobs.inProgress == states.count(JobStatus.IN_PROGRESS)
        assert health.jobs.completed == states.count(JobStatus.COMPLETED)
        counters = self.run(self.gateway.backend.counters(ENDPOINT))
        ended = sum(counters[k] for k in ("completed", "failed", "cancelled", "timedOut"))
        assert ended >= sum(1 for s in states if s in TERMINAL)

    @invariant()
    def workers_hold_exactly_their_running_jobs(self):
        running = {}
        for job_id in self.seen:
            job = self.run(self.gateway.backend.get_job(ENDPOINT, job_id))
            if job.status == JobStatus.IN_PROGRESS:
                running.setdefault(job.worker_id, set()).add(job_id)
        workers = self.run(self.gateway.backend.get_workers(ENDPOINT))
        held = {w.id: w.jobs for w in workers.values() if w.jobs}
        assert held == running
        active = set(self.run(self.gateway.backend.active_job_ids(ENDPOINT)))
        assert active == set().union(*running.values()) if running else not active

    def drive_everything_to_its_end(self) -> None:
        """Take and complete whatever is left: every job ends in exactly one terminal state."""
        for _ in range(len(self.seen) + 2):
            for job in self.run(self.gateway.take(ENDPOINT, "closer", 100, hold=0)):
                self.run(self.gateway.done(ENDPOINT, "closer", job.id, {"output": 1}, False))
            self.clock.now += 100
            self.run(self.gateway.sweep())
        for job_id, status in self.states().items():
            assert status in TERMINAL, f"{job_id} never ended ({status})"


class RedisGatewayMachine(GatewayMachine):
    @property
    def backend_url(self) -> str:
        return redis_url()


TestMemoryBackendProperties = GatewayMachine.TestCase
TestMemoryBackendProperties.settings = settings(
    max_examples=150,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

TestRedisBackendProperties = RedisGatewayMachine.TestCase
TestRedisBackendProperties.settings = settings(
    max_examples=15,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
