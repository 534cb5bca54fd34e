"""Backend-level contract: a take stores what it returns, transitions from a stale copy are
computed again, the Redis path's round trips per job, and Redis data of the older layout."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
import redis
import redis.asyncio.connection

from handler_gateway import jobs
from handler_gateway.backends import open_backend
from handler_gateway.jobs import JobStatus
from handler_gateway.operations import Gateway, Timings
from handler_protocol.models import EndpointConfig, RunRequest
from tests.gateway.conftest import clean_redis_prefix, redis_url

ENDPOINT = "ep"
T0 = 1_800_000_000.25


def new_job(job_input=None, now: float = T0, ttl_s: float = 60.0) -> jobs.Change:
    return jobs.new_job(
        uuid.uuid4().hex,
        ENDPOINT,
        job_input if job_input is not None else {"n": 1},
        now,
        execution_timeout_s=600.0,
        ttl_s=ttl_s,
        max_retries=2,
        extra={"s3Config": {"buckets": [], "big": 12345678901234567890}},
    )


@pytest.fixture
async def backend(make_backend):
    backend = make_backend()
    await backend.put_endpoint(EndpointConfig(id=ENDPOINT, workerToken="t" * 20))
    yield backend
    await backend.close()


@pytest.fixture
def redis_prefix():
    prefix = f"test-{uuid.uuid4().hex[:10]}"
    yield prefix
    clean_redis_prefix(prefix)


async def redis_backend(prefix: str):
    backend = open_backend(redis_url(), prefix=prefix)
    await backend.put_endpoint(EndpointConfig(id=ENDPOINT, workerToken="t" * 20))
    return backend


def stored(job: jobs.JobRecord) -> dict:
    return job.model_dump(exclude={"input"})


async def test_a_take_stores_the_start_it_returns(backend):
    change = new_job({"prompt": "hi", "list": []})
    await backend.create_job(change)
    poll, taken, emptied = await backend.take_jobs(ENDPOINT, "w1", 5, None, T0 + 1)
    assert (poll, emptied) == ((0, False, False), True)
    assert [c.job.status for c in taken] == [JobStatus.IN_PROGRESS]
    job = taken[0].job
    assert job.input == {"prompt": "hi", "list": []}
    assert (job.worker_id, job.started_at, job.heartbeat_at) == ("w1", T0 + 1, T0 + 1)
    assert stored(await backend.get_job(ENDPOINT, job.id)) == stored(job)
    assert taken[0].effects.counters == {"inQueue": -1, "inProgress": 1}
    counters = await backend.counters(ENDPOINT)
    assert (counters["inQueue"], counters["inProgress"]) == (0, 1)
    assert await backend.active_job_ids(ENDPOINT) == [job.id]
    assert await backend.worker_job_count(ENDPOINT, "w1") == 1
    assert (await backend.activity([ENDPOINT]))[ENDPOINT] == T0 + 1


async def test_a_take_times_out_a_job_whose_ttl_passed_as_start_says(backend):
    expired, fresh = new_job(ttl_s=2.5), new_job(now=T0 + 3)
    await backend.create_job(expired)
    await backend.create_job(fresh)
    _, taken, _ = await backend.take_jobs(ENDPOINT, "w1", 1, None, T0 + 4)
    assert [(c.job.id, c.job.status) for c in taken] == [
        (expired.job.id, JobStatus.TIMED_OUT),
        (fresh.job.id, JobStatus.IN_PROGRESS),
    ]
    assert taken[0].job.error == "job expired in the queue after its ttl of 2.5 s"
    assert stored(await backend.get_job(ENDPOINT, expired.job.id)) == stored(taken[0].job)
    counters = await backend.counters(ENDPOINT)
    assert (counters["inQueue"], counters["inProgress"], counters["timedOut"]) == (0, 1, 1)


@pytest.mark.parametrize(
    ("capacity", "held_before", "wanted", "taken"),
    [(None, 0, 3, 3), (2, 0, 3, 2), (2, 1, 3, 1), (1, 1, 3, 0)],
    ids=["no-capacity", "capped", "partly-full", "full"],
)
async def test_a_take_keeps_to_capacity(backend, capacity, held_before, wanted, taken):
    for _ in range(held_before + wanted):
        await backend.create_job(new_job())
    if held_before:
        await backend.take_jobs(ENDPOINT, "w1", held_before, None, T0)
    poll, changes, emptied = await backend.take_jobs(ENDPOINT, "w1", wanted, capacity, T0)
    assert poll.held == held_before
    assert len(changes) == taken
    assert emptied == (taken == wanted)


@pytest.mark.parametrize("state", ["draining", "leaving"])
async def test_a_draining_or_leaving_worker_is_handed_nothing(backend, state):
    await backend.create_job(new_job())
    if state == "draining":
        await backend.set_draining(ENDPOINT, "w1", True, T0)
    else:
        await backend.set_leaving(ENDPOINT, "w1", T0, T0 + 60)
    poll, changes, emptied = await backend.take_jobs(ENDPOINT, "w1", 1, None, T0 + 1)
    assert (poll.draining, poll.leaving, changes) == (state == "draining", state == "leaving", [])
    assert not emptied
    assert await backend.queued_job_ids(ENDPOINT, 10) != []


async def test_create_and_take_stores_the_job_and_takes_the_queue_head(backend):
    older, newer = new_job({"n": 0}), new_job({"n": 1})
    await backend.create_job(older)
    poll, taken, emptied = await backend.create_and_take(newer, "w1", 1, None, T0 + 1)
    assert [c.job.id for c in taken] == [older.job.id] and not emptied
    assert (await backend.get_job(ENDPOINT, newer.job.id)).status == JobStatus.IN_QUEUE
    assert stored(await backend.get_job(ENDPOINT, older.job.id)) == stored(taken[0].job)
    _, taken, emptied = await backend.create_and_take(new_job(), "w1", 5, 1, T0 + 2)
    assert (poll.held, taken, emptied) == (0, [], False), "capacity 1, one held: none"
    counters = await backend.counters(ENDPOINT)
    assert (counters["inQueue"], counters["inProgress"]) == (2, 1)


async def test_a_take_drops_entries_of_jobs_no_longer_queued(backend):
    cancelled, queued = new_job(), new_job()
    await backend.create_job(cancelled)
    await backend.create_job(queued)
    await backend.update_job(ENDPOINT, cancelled.job.id, lambda j: jobs.cancel(j, T0))
    _, changes, _ = await backend.take_jobs(ENDPOINT, "w1", 5, None, T0)
    assert [c.job.id for c in changes] == [queued.job.id]
    assert await backend.queued_job_ids(ENDPOINT, 10) == []


@pytest.fixture
async def replicas(redis_prefix):
    """Two Redis replicas, A and B, and a job A handed to w1 at T0 (A keeps a copy)."""
    a, b = await redis_backend(redis_prefix), await redis_backend(redis_prefix)
    try:
        change = new_job()
        await a.create_job(change)
        await a.take_jobs(ENDPOINT, "w1", 1, None, T0)
        yield a, b, change.job.id
    finally:
        await a.close()
        await b.close()


async def test_a_transition_from_a_stale_copy_is_computed_again(replicas):
    """Replica A holds a copy of a job it handed out; replica B changed the job since."""
    a, b, job_id = replicas
    # B: a progress update, then the worker gives the job back and w2 takes it.
    await b.update_job(ENDPOINT, job_id, lambda j: jobs.progress(j, "w1", 50, T0 + 1))
    await b.update_job(ENDPOINT, job_id, lambda j: jobs.give_back(j, "w1"))
    await b.take_jobs(ENDPOINT, "w2", 1, None, T0 + 2)
    # A's copy says w1 runs it: w2's result is still taken, w1's ignored.
    assert await a.update_job(ENDPOINT, job_id, lambda j: jobs.finish(j, "w1", {}, T0)) is None
    done = await a.update_job(
        ENDPOINT, job_id, lambda j: jobs.finish(j, "w2", {"output": 7}, T0 + 3)
    )
    assert done is not None and done.job.status == JobStatus.COMPLETED
    job = await b.get_job(ENDPOINT, job_id)
    assert (job.status, job.worker_id, job.output, job.progress) == (
        JobStatus.COMPLETED,
        "w2",
        7,
        None,
    )
    counters = await b.counters(ENDPOINT)
    assert (counters["inProgress"], counters["completed"]) == (0, 1)


async def test_a_stale_copy_is_replaced_when_the_fresh_record_needs_no_change(replicas):
    a, b, job_id = replicas
    await b.update_job(ENDPOINT, job_id, lambda j: jobs.heartbeat(j, "w1", T0 + 5))
    # On A's copy a heartbeat is due; on the record it is not (B wrote one just now).
    beat = await a.update_job(ENDPOINT, job_id, lambda j: jobs.heartbeat(j, "w1", T0 + 5.5, 1))
    assert beat is None
    rev, copy = a._records[(ENDPOINT, job_id)]
    assert (rev, copy.heartbeat_at) == ("3", T0 + 5)


class RoundTrips:
    """Counts what the gateway sends to Redis: one send is one round trip (a pipeline is one)."""

    def __init__(self, monkeypatch):
        self.sent = 0
        original = redis.asyncio.connection.AbstractConnection.send_packed_command

        async def counting(connection, command, check_health=True):
            self.sent += 1
            return await original(connection, command, check_health)

        monkeypatch.setattr(
            redis.asyncio.connection.AbstractConnection, "send_packed_command", counting
        )

    def take(self) -> int:
        sent, self.sent = self.sent, 0
        return sent


async def test_a_job_costs_three_round_trips_on_redis(redis_prefix, monkeypatch):
    """submit, take and result are one round trip each; runsync reads nothing back; the
    worker's next take, right after a take that emptied the queue, waits without a look."""
    backend = open_backend(redis_url(), prefix=redis_prefix)
    gateway = Gateway(backend, Timings(endpoint_cache=3600))
    await gateway.put_endpoint(EndpointConfig(id=ENDPOINT, workerToken="t" * 20))
    counted = RoundTrips(monkeypatch)
    try:
        for round_ in range(3):
            job = await gateway.submit(ENDPOINT, RunRequest(input={"n": round_}))
            submitted = counted.take()
            runsync = asyncio.create_task(gateway.wait_terminal(ENDPOINT, job.id, 5, job))
            await asyncio.sleep(0)  # the runsync waits, as it does right after its submit
            assert [j.id for j in await gateway.take(ENDPOINT, "w1", 1, 0)] == [job.id]
            took = counted.take()
            assert await gateway.done(ENDPOINT, "w1", job.id, {"output": 1}, False) == "accepted"
            finished = counted.take()
            result = await runsync
            read_back = counted.take()
            assert result.status == JobStatus.COMPLETED
            assert await gateway.take(ENDPOINT, "w1", 1, 0) == []
            took_none = counted.take()
            if round_:  # the first round reads the endpoint and loads the scripts
                assert (submitted, took, finished, read_back, took_none) == (1, 1, 1, 0, 0)
    finally:
        await backend.close()


async def test_submits_arriving_together_are_stored_in_one_round_trip(redis_prefix, monkeypatch):
    """A group commit: submits that arrive while none is being stored go in one script run, in
    their order (and those arriving while a batch is in flight, in the next)."""
    backend = open_backend(redis_url(), prefix=redis_prefix)
    gateway = Gateway(backend, Timings(endpoint_cache=3600))
    await gateway.put_endpoint(EndpointConfig(id=ENDPOINT, workerToken="t" * 20))
    for size in (1, 2):  # reads the endpoint, loads the scripts
        await asyncio.gather(*(gateway.submit(ENDPOINT, RunRequest(input={})) for _ in range(size)))
    counted = RoundTrips(monkeypatch)
    try:
        requests = [RunRequest(input={"n": n}) for n in range(10)]
        submitted = await asyncio.gather(*(gateway.submit(ENDPOINT, r) for r in requests))
        assert counted.take() == 1
        taken = await backend.take_jobs(ENDPOINT, "w1", 100, None, gateway.clock())
        assert [(c.job.id, c.job.input) for c in taken.changes][3:] == [
            (job.id, {"n": n}) for n, job in enumerate(submitted)
        ]
    finally:
        await backend.close()


async def test_the_ttl_sweep_finds_the_queued_jobs_whose_ttl_passed(backend):
    fresh, expired, later = new_job(ttl_s=60.0), new_job(ttl_s=2.5), new_job(ttl_s=2.0, now=T0 + 1)
    for change in (fresh, expired, later):
        await backend.create_job(change)
    found = {at: await backend.expired_queued_ids(ENDPOINT, T0 + at, 10) for at in (2.0, 2.5, 3.0)}
    assert found == {2.0: [], 2.5: [expired.job.id], 3.0: [expired.job.id, later.job.id]}
    assert await backend.expired_queued_ids(ENDPOINT, T0 + 3.0, 1) == []  # the head only


async def test_redis_data_of_the_older_layout_is_converted_and_served(redis_prefix):
    """Layout 1: records as JSON strings, queues as streams read through a consumer group."""
    raw = redis.Redis.from_url(redis_url(), decode_responses=True)
    key = f"{redis_prefix}:{{{ENDPOINT}}}:"
    config = EndpointConfig(id=ENDPOINT, workerToken="t" * 20)
    raw.hset(f"{redis_prefix}:endpoints", ENDPOINT, config.model_dump_json())
    queued = [new_job({"n": n}).job for n in range(4)]
    finished = new_job().job.model_copy(
        update={"status": JobStatus.COMPLETED, "output": "done", "finished_at": T0}
    )
    for job in [*queued, finished]:
        raw.set(key + f"job:{job.id}", job.model_dump_json(exclude={"input"}))
        raw.set(key + f"input:{job.id}", json.dumps(job.input))
    raw.pexpire(key + f"job:{finished.id}", 300_000)
    raw.xgroup_create(key + "queue", "takers", id="0", mkstream=True)
    for job in queued:
        raw.xadd(key + "queue", {"id": job.id})
    # A replica of the older version read the first entry and died before claiming it.
    raw.xreadgroup("takers", "gone", {key + "queue": ">"}, count=1)
    raw.hset(key + "counters", mapping={"inQueue": 4, "completed": 1})

    backends = [await redis_backend(redis_prefix), await redis_backend(redis_prefix)]
    try:
        _, taken, _ = await backends[0].take_jobs(ENDPOINT, "w1", 3, None, T0 + 1)
        assert [c.job.input for c in taken] == [{"n": 0}, {"n": 1}, {"n": 2}]
        job = await backends[1].get_job(ENDPOINT, finished.id)
        assert (job.status, job.output) == (JobStatus.COMPLETED, "done")
        assert 0 < raw.pttl(key + f"job:{finished.id}") <= 300_000
        assert raw.type(key + "queue") == "list"
        assert await backends[1].queued_job_ids(ENDPOINT, 10) == [queued[3].id]
        assert (await backends[1].counters(ENDPOINT))["inProgress"] == 3
    finally:
        for backend in backends:
            await backend.close()
        raw.close()


async def test_a_submit_to_a_take_waiting_here_is_one_round_trip(redis_prefix, monkeypatch):
    """The job is stored and taken for the waiting worker in one script: submit to take."""
    backend = open_backend(redis_url(), prefix=redis_prefix)
    gateway = Gateway(backend, Timings(endpoint_cache=3600, recheck=60))
    await gateway.put_endpoint(EndpointConfig(id=ENDPOINT, workerToken="t" * 20))
    await gateway.endpoint(ENDPOINT)
    assert await gateway.take(ENDPOINT, "w1", 1, 0) == []  # scripts loaded, queue seen empty
    counted = RoundTrips(monkeypatch)
    try:
        for round_ in range(3):
            take = asyncio.create_task(gateway.take(ENDPOINT, "w1", 1, 30))
            await asyncio.sleep(0.05)
            counted.take()
            job = await gateway.submit(ENDPOINT, RunRequest(input={"n": round_}))
            assert [j.id for j in await take] == [job.id]
            assert counted.take() == 1
            assert (await backend.get_job(ENDPOINT, job.id)).worker_id == "w1"
            await gateway.done(ENDPOINT, "w1", job.id, {"output": 1}, False)
    finally:
        await backend.close()


async def test_jobs_started_for_a_take_that_ended_meanwhile_go_back_to_the_queue(backend):
    from handler_gateway.operations import Taker

    gateway = Gateway(backend, Timings(endpoint_cache=3600))
    gone = Taker("w1", 1, None, asyncio.get_running_loop().create_future())
    gone.close()
    live = Taker("w2", 1, None, asyncio.get_running_loop().create_future())
    gateway._takers[ENDPOINT] = [gone, live]
    job = await gateway.submit(ENDPOINT, RunRequest(input={}))
    assert [j.id for j in live.close()] == [job.id], "a closed take is passed over"
    # A take that ends while its job is being stored and started: the job is queued again.
    ending = Taker("w3", 1, None, asyncio.get_running_loop().create_future())
    gateway._takers[ENDPOINT] = [ending]
    store = backend.create_and_take

    async def ends_meanwhile(*args):
        ending.close()
        return await store(*args)

    backend.create_and_take = ends_meanwhile
    job = await gateway.submit(ENDPOINT, RunRequest(input={}))
    assert (await backend.get_job(ENDPOINT, job.id)).status == JobStatus.IN_QUEUE
    assert await backend.queued_job_ids(ENDPOINT, 10) == [job.id]
    assert await backend.worker_job_count(ENDPOINT, "w3") == 0


@pytest.mark.parametrize("submitted_on", ["this replica", "another replica"])
async def test_a_waiting_take_wakes_for_a_job_submitted_on_any_replica(
    redis_prefix, submitted_on, monkeypatch
):
    """Only a notification can end the wait here (no re-check before the hold): this
    replica's own submit wakes it without the pub/sub echo, another's through pub/sub."""
    timings = Timings(recheck=60, endpoint_cache=3600)
    taker = Gateway(open_backend(redis_url(), prefix=redis_prefix), timings)
    other = Gateway(open_backend(redis_url(), prefix=redis_prefix), timings)
    await taker.put_endpoint(EndpointConfig(id=ENDPOINT, workerToken="t" * 20))
    submitter = taker if submitted_on == "this replica" else other
    await submitter.endpoint(ENDPOINT)
    await taker.endpoint(ENDPOINT)  # starts the pub/sub listener
    await asyncio.sleep(0.2)  # subscribed
    try:
        assert await taker.take(ENDPOINT, "w1", 1, 0) == []  # finds the queue empty
        take = asyncio.create_task(taker.take(ENDPOINT, "w1", 1, 30))
        await asyncio.sleep(0.1)
        job = await submitter.submit(ENDPOINT, RunRequest(input={}))
        assert [j.id for j in await take] == [job.id]
    finally:
        await taker.backend.close()
        await other.backend.close()


async def test_a_replica_alone_publishes_no_notifications(redis_prefix):
    """A change is published only while another replica listens: a replica alone wakes its own
    long-polls as it stores, and its scripts publish nothing."""
    admin = redis.Redis.from_url(redis_url())

    def published() -> int:
        return admin.info("commandstats").get("cmdstat_publish", {}).get("calls", 0)

    async def replica() -> Gateway:
        gateway = Gateway(open_backend(redis_url(), prefix=redis_prefix), Timings())
        await gateway.put_endpoint(EndpointConfig(id=ENDPOINT, workerToken="t" * 20))
        await gateway.endpoint(ENDPOINT)  # starts the pub/sub listener
        for _ in range(100):
            if gateway.backend._subscribed:
                return gateway
            await asyncio.sleep(0.05)
        raise AssertionError("the replica never subscribed")

    async def publishes(gateway: Gateway) -> int:
        before = published()
        await gateway.submit(ENDPOINT, RunRequest(input={}))
        return published() - before

    a = await replica()
    try:
        alone = await publishes(a)
        b = await replica()
        assert (alone, await publishes(a)) == (0, 1)
        await b.backend.close()
    finally:
        await a.backend.close()
        admin.close()


@pytest.mark.parametrize(
    "value",
    [None, True, False, 0, -3, 10**30, 1.5, 1e-7, 1_800_000_000.123456, float("inf"), "",
     "ä\n\"\\/", "\U0001f600", [], {}, {"a": [1, None, "x"]}],
)  # fmt: skip
def test_a_field_is_stored_as_json_dumps_writes_it(value):
    from handler_gateway.backends.redis_scripts import field_json

    assert field_json(value) == json.dumps(value)


@pytest.mark.parametrize(
    ("message", "origin", "channels"),
    [
        ('gw-1|["queue:ep", "enqueued"]', "gw-1", ["queue:ep", "enqueued"]),
        ("gw-1|job:ep:j1", "gw-1", ["job:ep:j1"]),
        ("queue:ep", "", ["queue:ep"]),
    ],
    ids=["a change's channels", "one channel", "an older replica's"],
)
def test_notifications_name_their_origin_and_channels(message, origin, channels):
    from handler_gateway.backends.redis_scripts import notified

    assert notified(message) == (origin, channels)


async def test_a_job_given_back_goes_to_the_queue_head(backend):
    first, second = new_job(), new_job()
    await backend.create_job(first)
    await backend.create_job(second)
    gateway = Gateway(backend, Timings(endpoint_cache=3600))
    taken = await gateway.take(ENDPOINT, "w1", 1, 0)
    await gateway.give_back(ENDPOINT, "w1", taken)
    assert await backend.queued_job_ids(ENDPOINT, 10) == [first.job.id, second.job.id]


async def test_a_result_is_kept_on_the_replica_only_for_a_runsync_waiting_there(backend):
    gateway = Gateway(backend, Timings(endpoint_cache=3600))
    unwatched = await gateway.submit(ENDPOINT, RunRequest(input={}))
    await gateway.take(ENDPOINT, "w1", 1, 0)
    await gateway.done(ENDPOINT, "w1", unwatched.id, {"output": 1}, False)
    assert gateway._results == {}
    watched = await gateway.submit(ENDPOINT, RunRequest(input={}))
    runsync = asyncio.create_task(gateway.wait_terminal(ENDPOINT, watched.id, 5, watched))
    await asyncio.sleep(0)
    await gateway.take(ENDPOINT, "w1", 1, 0)
    await gateway.done(ENDPOINT, "w1", watched.id, {"output": 2}, False)
    assert (await runsync).output == 2
    assert gateway._results == {} and gateway._awaited == set()


async def test_a_take_claimed_by_a_submit_waits_for_its_answer_though_woken():
    from handler_gateway.operations import Taker

    taker = Taker("w1", 1, None, asyncio.get_running_loop().create_future(), claimed=True)
    waiting = asyncio.create_task(taker.wait(asyncio.sleep(0)))  # woken at once
    await asyncio.sleep(0.01)
    assert not waiting.done()
    job = new_job().job
    assert taker.hand([job])
    await waiting
    assert taker.close() == [job]


async def test_a_lease_is_renewed_only_by_its_owner(redis_prefix):
    backend = await redis_backend(redis_prefix)
    admin = redis.Redis.from_url(redis_url())
    key = f"{redis_prefix}:lease:sweeper"
    try:
        assert await backend.acquire_lease("sweeper", "A", 0.2)
        assert not await backend.acquire_lease("sweeper", "B", 0.2)
        assert await backend.acquire_lease("sweeper", "A", 0.2)  # renewed
        await asyncio.sleep(0.3)
        assert await backend.acquire_lease("sweeper", "B", 5)  # A's ran out
        assert not await backend.acquire_lease("sweeper", "A", 60)
        assert admin.get(key) == b"B" and admin.pttl(key) <= 5000  # not extended by A
    finally:
        await backend.close()
        admin.close()


async def test_a_redis_stall_longer_than_the_heartbeat_window_redelivers_no_job(redis_prefix):
    """Fault table: Redis paused past the heartbeat window (no call failed, every call waited,
    the workers' pings too) re-queued live workers' jobs. A worker's silence counts from the
    end of the stall, as from the end of an outage."""
    backend = open_backend(redis_url(), prefix=redis_prefix)
    gateway = Gateway(backend, Timings(endpoint_cache=3600, heartbeat_write_interval=0))
    config = EndpointConfig(
        id=ENDPOINT, workerToken="t" * 20, heartbeatIntervalSeconds=0.2, heartbeatMisses=2
    )
    await gateway.put_endpoint(config)
    admin = redis.asyncio.Redis.from_url(redis_url())
    try:
        job = await gateway.submit(ENDPOINT, RunRequest(input={}))
        assert [j.id for j in await gateway.take(ENDPOINT, "w1", 1, 0)] == [job.id]
        await gateway.ping(ENDPOINT, "w1", [job.id])
        await admin.execute_command("CLIENT", "PAUSE", 1000, "ALL")
        assert await gateway.sweep() == []  # it waited through the stall
        assert (await backend.get_job(ENDPOINT, job.id)).status == JobStatus.IN_PROGRESS
        await asyncio.sleep(0.6)  # silent after the stall: lost now
        assert [c.note for c in await gateway.sweep()] == ["re-queued (lost w1)"]
    finally:
        await admin.aclose()
        await backend.close()


async def test_an_endpoints_activity_clock_only_moves_forward(backend):
    """Drift between the backends: Redis wrote whichever change came last (a replica whose
    clock lags could move the scale-to-zero clock back); memory kept the latest."""
    await backend.create_job(new_job(now=T0 + 10))
    await backend.create_job(new_job(now=T0))
    assert (await backend.activity([ENDPOINT]))[ENDPOINT] == T0 + 10
    await backend.take_jobs(ENDPOINT, "w1", 2, None, T0 + 5)  # started: activity, but earlier
    assert (await backend.activity([ENDPOINT]))[ENDPOINT] == T0 + 10
    await backend.take_jobs(ENDPOINT, "w1", 2, None, T0 + 20)
    await backend.create_job(new_job(now=T0 + 30))
    assert (await backend.activity([ENDPOINT]))[ENDPOINT] == T0 + 30


async def test_a_registration_stored_with_its_raw_worker_token_is_stored_again_as_a_digest(
    redis_prefix,
):
    """What an older version stored (the raw token) is read, and written back without it."""
    token = "raw-worker-token-0123456789"
    old = {"id": ENDPOINT, "workerToken": token, "executionTimeoutSeconds": 600.0}
    with redis.Redis.from_url(redis_url()) as client:
        client.hset(f"{redis_prefix}:endpoints", ENDPOINT, json.dumps(old))
    backend = open_backend(redis_url(), prefix=redis_prefix)
    try:
        config = await backend.get_endpoint(ENDPOINT)
        assert config is not None and len(config.workerTokenSha256) == 1
        with redis.Redis.from_url(redis_url()) as client:
            stored = client.hget(f"{redis_prefix}:endpoints", ENDPOINT).decode()
        assert token not in stored and config.workerTokenSha256[0] in stored
    finally:
        await backend.close()
