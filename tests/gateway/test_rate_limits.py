"""Per-caller rate limits: the token bucket, tokens taken with a job's creation on both
backends, and the leases by which replicas share one bucket (a fake clock; no timings)."""

from __future__ import annotations

import asyncio

import pytest

from handler_gateway.backends import Admission, RateRefused, open_backend, take_from_bucket
from handler_gateway.errors import RateLimited
from handler_gateway.operations import Gateway, lease_size
from handler_protocol.models import EndpointConfig, RateLimit, RunRequest
from tests.gateway.test_backends import ENDPOINT, T0, new_job

TOKEN = "t" * 20


@pytest.mark.parametrize(
    ("tokens", "elapsed", "wanted", "expected"),
    [
        (5.0, 0.0, 1, (4.0, 1, 0.0)),  # one taken
        (5.0, 0.0, 10, (0.0, 5, 0.0)),  # as many as there are
        (0.5, 0.0, 1, (0.5, 0, 0.25)),  # none: half a token missing at 2/s
        (0.0, 1.0, 1, (1.0, 1, 0.0)),  # refilled 2 in 1 s, one taken
        (9.0, 100.0, 1, (9.0, 1, 0.0)),  # refilled up to the burst (10) only
    ],
)
def test_the_bucket(tokens, elapsed, wanted, expected):
    left, at, taken, wait = take_from_bucket(tokens, T0, T0 + elapsed, 2.0, 10, wanted)
    assert (left, taken, wait) == expected and at == T0 + elapsed


@pytest.mark.parametrize(
    ("rate", "burst", "size"),
    [(1, 10, 1), (100, 200, 5), (1000, 20, 5), (1_000_000, 1_000_000, 50_000), (1e6, 3, 1)],
)
def test_a_lease_is_50_ms_of_the_rate_at_most_a_quarter_of_the_burst(rate, burst, size):
    assert lease_size(RateLimit(requestsPerSecond=rate, burst=burst)) == size


@pytest.fixture
async def backend(make_backend):
    backend = make_backend()
    await backend.put_endpoint(EndpointConfig(id=ENDPOINT, workerToken=TOKEN))
    yield backend
    await backend.close()


async def test_a_new_job_takes_its_token_with_its_creation(backend):
    """A slow bucket (no refill to speak of) of 3: three jobs, then RateRefused and no job."""

    def admission(wanted: int = 1) -> Admission:
        return Admission(bucket="team/keys/ci", rate=0.001, burst=3, wanted=wanted, now=T0)

    first = admission(wanted=2)
    await backend.create_job(new_job(), first)
    assert first.taken == 2
    second = admission(wanted=5)
    await backend.create_job(new_job(), second)
    assert second.taken == 1  # the last one
    with pytest.raises(RateRefused) as refused:
        await backend.create_job(new_job(), admission())
    assert refused.value.wait > 0
    assert (await backend.counters(ENDPOINT))["inQueue"] == 2
    other = admission()
    other.bucket = "team/keys/other"  # another caller: its own bucket
    await backend.create_job(new_job(), other)
    assert other.taken == 1


@pytest.mark.parametrize(("rate", "burst"), [(0.001, 1_000_000), (1_000_000, 1)])
async def test_the_extreme_limits_work(backend, rate, burst):
    admission = Admission(bucket="ci", rate=rate, burst=burst, wanted=1, now=T0)
    await backend.create_job(new_job(), admission)
    assert admission.taken == 1
    assert (await backend.take_tokens(ENDPOINT, "ci", rate, burst, 1, T0))[0] in (0, 1)


async def test_replicas_share_one_bucket_through_their_leases():
    """Two gateways on one backend, a burst of 40 at 100/s (leases of 5), the clock still:
    together they admit the burst and no more; 0.25 s later, the 25 tokens refilled."""
    now = [T0]
    backend = open_backend("memory://")
    limit = {"requestsPerSecond": 100, "burst": 40}
    await backend.put_endpoint(EndpointConfig(id=ENDPOINT, workerToken=TOKEN, rateLimit=limit))
    replicas = [Gateway(backend, clock=lambda: now[0]) for _ in range(2)]
    config = await replicas[0].endpoint(ENDPOINT)

    async def admitted(count: int) -> int:
        passed = 0
        for n in range(count):
            try:
                if n % 3:
                    await replicas[n % 2].admit(config, "ci")
                else:  # a submit: its token comes with the job's creation
                    await replicas[n % 2].submit(ENDPOINT, RunRequest(input={}), caller="ci")
                passed += 1
            except RateLimited:
                pass
        return passed

    assert await admitted(100) == 40
    now[0] += 0.25
    assert await admitted(100) == 25


async def test_a_refusal_says_when_to_come_back():
    backend = open_backend("memory://")
    limit = {"requestsPerSecond": 0.5, "burst": 1}
    await backend.put_endpoint(EndpointConfig(id=ENDPOINT, workerToken=TOKEN, rateLimit=limit))
    gateway = Gateway(backend, clock=lambda: T0)
    config = await gateway.endpoint(ENDPOINT)
    await gateway.admit(config, "ci")
    with pytest.raises(RateLimited) as refused:
        await gateway.admit(config, "ci")
    assert refused.value.wait == 2.0


async def test_reads_are_answered_at_once_and_counted_meanwhile():
    """A bucket of 2 (0.5/s): three reads answered, the third's count (after its answer)
    finds the bucket empty, so the next read is refused until a token is due (2 s of the fake
    clock)."""
    now = [T0]
    backend = open_backend("memory://")
    limit = {"requestsPerSecond": 0.5, "burst": 2}
    await backend.put_endpoint(EndpointConfig(id=ENDPOINT, workerToken=TOKEN, rateLimit=limit))
    gateway = Gateway(backend, clock=lambda: now[0])
    config = await gateway.endpoint(ENDPOINT)
    for _ in range(3):
        count = gateway.admit_read(config, "ci")
        assert count is not None  # a lease of one token: each read is counted after its answer
        count()
        for _ in range(3):
            await asyncio.sleep(0)  # the memory backend counts it within a turn or two
    with pytest.raises(RateLimited):
        gateway.admit_read(config, "ci")
    with pytest.raises(RateLimited):  # a submit too, without asking the bucket
        await gateway.submit(ENDPOINT, RunRequest(input={}), caller="ci")
    now[0] += 2.0
    assert gateway.admit_read(config, "ci") is not None


async def test_a_lease_grows_for_a_busy_caller_and_shrinks_for_an_idle_one():
    """Rate 1000/s, burst 1000 (leases of up to 50): a busy caller asks the bucket for 1, 2,
    4, ... 50 tokens; once a lease expired unused, the next is half as large."""
    now = [T0]
    backend = open_backend("memory://")
    limit = {"requestsPerSecond": 1000, "burst": 1000}
    await backend.put_endpoint(EndpointConfig(id=ENDPOINT, workerToken=TOKEN, rateLimit=limit))
    asked: list[int] = []
    take_tokens = backend.take_tokens

    async def recording(endpoint, bucket, rate, burst, wanted, at):
        asked.append(wanted)
        return await take_tokens(endpoint, bucket, rate, burst, wanted, at)

    backend.take_tokens = recording
    gateway = Gateway(backend, clock=lambda: now[0])
    config = await gateway.endpoint(ENDPOINT)
    for _ in range(120):
        await gateway.admit(config, "ci")
    assert asked == [1, 2, 4, 8, 16, 32, 50, 50]  # 163 taken for 120 requests: 43 leased
    now[0] += 1.0  # the lease expires with tokens left
    asked.clear()
    await gateway.admit(config, "ci")
    assert asked == [25]
