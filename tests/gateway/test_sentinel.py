"""Redis Sentinel: Sentinel URLs, and a real group (a primary, a replica, three sentinels) failed
over under load without losing an accepted job (each held by a replica, WAIT, before its submit
is answered)."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid

import pytest
import redis

from handler_gateway.backends import BackendUnavailable, open_backend
from handler_gateway.backends.connections import SentinelAddress
from handler_gateway.operations import Gateway, Timings
from handler_protocol.models import EndpointConfig, RunRequest
from tests.processes import SentinelGroup, wait_until

ENDPOINT = "ep"
SERVICE = "primary"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis+sentinel://s1:26380,s2,10.0.0.3:26381/jobs/2",
            SentinelAddress([("s1", 26380), ("s2", 26379), ("10.0.0.3", 26381)], "jobs", 2),
        ),
        (
            "redis+sentinel://:p%40ss@s1/jobs?sentinel_password=sp",
            SentinelAddress([("s1", 26379)], "jobs", 0, None, "p@ss", "sp"),
        ),
        (
            "redis+sentinel://user:pw@s1:1/jobs",
            SentinelAddress([("s1", 1)], "jobs", 0, "user", "pw"),
        ),
    ],
    ids=["hosts-and-db", "password-and-sentinel-password", "user"],
)
def test_a_sentinel_url_names_sentinels_service_db_and_credentials(url, expected):
    assert SentinelAddress.parse(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel:///jobs",
        "redis+sentinel://s1:26379",
        "redis+sentinel://s1:port/jobs",
        "redis+sentinel://s1/jobs/zero",
        "redis+sentinel://s1/jobs/0/extra",
    ],
    ids=["no-sentinels", "no-service", "bad-port", "bad-db", "extra-path"],
)
def test_a_bad_sentinel_url_is_refused_with_the_form_to_use(url):
    with pytest.raises(ValueError, match="Sentinel|database"):
        open_backend(url)


def test_an_unknown_sentinel_url_option_is_refused():
    with pytest.raises(ValueError, match="unknown Sentinel URL options: tls"):
        open_backend("redis+sentinel://s1/jobs?tls=1")


@pytest.mark.parametrize(
    ("url", "option", "waits_for"),
    [
        ("redis+sentinel://s1/jobs", None, 1),
        ("redis+sentinel://s1/jobs", 0, 0),
        ("redis://127.0.0.1:1/0", None, 0),
        ("redis://127.0.0.1:1/0", 2, 2),
    ],
)
def test_submits_wait_for_a_replica_by_default_only_with_sentinel(url, option, waits_for):
    assert open_backend(url, wait_replicas=option).wait_replicas == waits_for


@pytest.fixture
def sentinel_group(tmp_path):
    """A primary, its replica (in sync) and three sentinels that know both and each other."""
    group = SentinelGroup(tmp_path, SERVICE).start()
    yield group
    group.stop()


async def test_a_failover_under_load_loses_no_accepted_job(sentinel_group):
    primary, replica = sentinel_group.primary, sentinel_group.replica
    backend = open_backend(sentinel_group.url, prefix=uuid.uuid4().hex[:8])
    gateway = Gateway(backend, Timings(endpoint_cache=3600))
    await gateway.put_endpoint(EndpointConfig(id=ENDPOINT, workerToken="t" * 20))
    accepted: list[str] = []
    refused = 0
    running = True

    async def client() -> None:
        nonlocal refused
        while running:
            try:
                job = await gateway.submit(ENDPOINT, RunRequest(input={"n": len(accepted)}))
            except BackendUnavailable:  # the 503 a client retries
                refused += 1
                await asyncio.sleep(0.05)
                continue
            accepted.append(job.id)

    async def accepted_reach(count: int) -> None:
        while len(accepted) < count:
            await asyncio.sleep(0.01)

    clients = [asyncio.ensure_future(client()) for _ in range(8)]
    try:
        await asyncio.wait_for(accepted_reach(100), 30)
        # The replica is cut off (stopped, its link closed), then the primary dies: what the
        # primary accepted meanwhile is gone. Submits in that window wait for the replica.
        os.kill(replica.process.pid, signal.SIGSTOP)
        with redis.Redis(port=primary.port) as direct:
            direct.execute_command("CLIENT", "KILL", "TYPE", "replica")
        await asyncio.sleep(0.3)
        primary.kill()
        os.kill(replica.process.pid, signal.SIGCONT)
        await asyncio.to_thread(
            wait_until,
            lambda: sentinel_group.current_primary_port() == replica.port,
            30,
            "the sentinels never promoted the replica",
        )
        await asyncio.wait_for(accepted_reach(len(accepted) + 100), 30)  # served again
        running = False
        await asyncio.gather(*clients)
        lost = [i for i in accepted if await backend.get_job(ENDPOINT, i) is None]
        assert (len(accepted), lost) == (len(set(accepted)), [])
        queued = await backend.queued_job_ids(ENDPOINT, 100_000)
        assert set(accepted) <= set(queued)
        assert refused > 0  # the failover happened under load
    finally:
        running = False
        for task in clients:
            task.cancel()
        await backend.close()
