"""Fault tests with real parts (the fast rows of bench/faults.py's table, from
tests/scenarios.py): workers SIGKILLed or poisoned, an abandoned take, the gateway SIGKILLed,
Redis killed, stalled past the heartbeat window or unreachable. Nothing accepted may be lost or
run twice; counts are asserted, never times."""

from __future__ import annotations

import time
import uuid

import pytest

from tests import scenarios
from tests.gateway.conftest import clean_redis_prefix, redis_url
from tests.processes import CLIENT_KEY, GatewayProcess, RedisServer, http_json

TOKEN = scenarios.TOKEN


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "backend"),
    [
        ("worker-sigkill", "memory"),
        ("worker-sigkill", "redis"),
        ("poison", "memory"),
        ("ghost-take", "redis"),
    ],
)
def test_faults_of_workers_lose_nothing_and_run_nothing_twice(tmp_path, name, backend):
    """The fault table's worker rows (bench/faults.py prints them all): counts, never times."""
    prefix = f"fault-{uuid.uuid4().hex[:8]}"
    url = "memory://" if backend == "memory" else redis_url()
    gateway_args = () if backend == "memory" else ("--redis-prefix", prefix)
    try:
        tally = scenarios.SCENARIOS[name](tmp_path, url, gateway_args=gateway_args)
    finally:
        if backend == "redis":
            clean_redis_prefix(prefix)
    assert (tally.lost, tally.executed_twice) == (0, 0), tally
    assert tally.completed + tally.failed == tally.submitted, tally
    if name == "worker-sigkill":
        assert tally.redelivered >= 1 and tally.failed == 0, tally
    if name == "poison":  # each poisoned job, and only failed jobs, dead-lettered
        assert tally.dead_lettered == tally.failed >= 3, tally
    if name == "ghost-take":
        assert (tally.completed, tally.redelivered) == (tally.submitted, 0), tally


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gateway-sigkill", "redis-restart", "outage-beyond-heartbeats"])
def test_faults_of_the_gateway_and_redis_lose_nothing_and_run_nothing_twice(tmp_path, name):
    prefix = f"fault-{uuid.uuid4().hex[:8]}"
    try:
        if name == "gateway-sigkill":
            tally = scenarios.gateway_sigkill(tmp_path, redis_url(), ("--redis-prefix", prefix))
        else:
            tally = scenarios.SCENARIOS[name](tmp_path)
    finally:
        clean_redis_prefix(prefix)
    assert (tally.lost, tally.executed_twice, tally.failed) == (0, 0, 0), tally
    assert tally.completed == tally.submitted, tally


@pytest.mark.slow
def test_redis_outage_is_a_503_then_full_recovery(tmp_path):
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis").start()
    gateway = GatewayProcess(server.url, tmp_path).start()
    try:
        gateway.register("ep", TOKEN)
        accepted = http_json(
            "POST", f"{gateway.url}/v2/ep/run", {"input": {"n": 1}}, key=CLIENT_KEY
        )
        job_id = accepted[1]["id"]
        server.kill()
        for method, path, body in [
            ("POST", "/v2/ep/run", {"input": {"n": 2}}),
            ("GET", f"/v2/ep/status/{job_id}", None),
            ("GET", "/readyz", None),
        ]:
            with pytest.raises(Exception) as refused:
                http_json(method, gateway.url + path, body, key=CLIENT_KEY)
            assert getattr(refused.value, "code", None) == 503, refused.value
            assert refused.value.headers["Retry-After"] == "1"
            assert "unavailable" in refused.value.read().decode()
        server.start()  # same port and data directory
        deadline = time.monotonic() + 20
        while True:
            try:
                status, body = http_json(
                    "GET", f"{gateway.url}/v2/ep/status/{job_id}", key=CLIENT_KEY
                )
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert status == 200 and body["status"] == "IN_QUEUE", "accepted work survived the outage"
        assert (
            http_json("POST", f"{gateway.url}/v2/ep/run", {"input": {"n": 3}}, key=CLIENT_KEY)[0]
            == 200
        )
        assert http_json("GET", gateway.url + "/readyz")[0] == 200
    finally:
        gateway.stop()
        server.kill()
