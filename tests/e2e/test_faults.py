"""Fault tests with real parts: a worker SIGKILLed mid-job, the gateway restarted under load,
Redis killed and restarted. Nothing accepted may be lost."""

from __future__ import annotations

import time
import uuid

import pytest

from tests.gateway.conftest import clean_redis_prefix, redis_url
from tests.processes import (
    CLIENT_KEY,
    GatewayProcess,
    RedisServer,
    http_json,
    kill_group,
    start_worker,
)

TOKEN = "fault-worker-token-0123456789"
JOBS = 200


def submit(gateway: GatewayProcess, count: int, sleep: float = 0.05) -> list[str]:
    url = f"{gateway.url}/v2/ep/run"
    return [
        http_json("POST", url, {"input": {"sleep": sleep, "n": n}}, key=CLIENT_KEY)[1]["id"]
        for n in range(count)
    ]


def wait_holding_jobs(gateway: GatewayProcess, worker: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = http_json("GET", f"{gateway.url}/admin/v1/endpoints/ep/workers")[1]["workers"]
        if any(w["id"] == worker and w["jobs"] for w in workers):
            return
        time.sleep(0.02)
    raise TimeoutError(f"{worker} never held a job")


def health(gateway: GatewayProcess) -> dict:
    return http_json("GET", f"{gateway.url}/v2/ep/health", key=CLIENT_KEY, timeout=5)[1]["jobs"]


def wait_completed(
    gateway: GatewayProcess, count: int, at_least: int | None = None, timeout: float = 120
) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            jobs = health(gateway)
        except OSError:
            time.sleep(0.2)
            continue
        if jobs["completed"] >= (at_least if at_least is not None else count):
            return jobs
        time.sleep(0.2)
    raise TimeoutError(f"jobs did not complete in time: {health(gateway)}")


def statuses(gateway: GatewayProcess, ids: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job_id in ids:
        view = http_json("GET", f"{gateway.url}/v2/ep/status/{job_id}", key=CLIENT_KEY)[1]
        counts[view["status"]] = counts.get(view["status"], 0) + 1
    return counts


@pytest.fixture
def start_workers(tmp_path):
    started = []

    def start(gateway: GatewayProcess, *names: str):
        for name in names:
            env = gateway.worker_env("ep", TOKEN, name, HANDLER_CONCURRENCY="16")
            process = start_worker(env, "handlers.echo_async", [], tmp_path / f"{name}.log")
            started.append(process)
        return started[-len(names) :]

    yield start
    for process in started:
        kill_group(process)


@pytest.mark.slow
def test_sigkill_worker_mid_job_loses_nothing(tmp_path, start_workers):
    gateway = GatewayProcess("memory://", tmp_path).start()
    try:
        gateway.register("ep", TOKEN, heartbeatIntervalSeconds=1, heartbeatMisses=2, maxRetries=5)
        doomed, _ = start_workers(gateway, "doomed", "survivor")
        ids = submit(gateway, JOBS, sleep=0.3)
        wait_completed(gateway, JOBS, at_least=20)
        wait_holding_jobs(gateway, "doomed")
        kill_group(doomed)  # the pod dies with its jobs in flight
        start_workers(gateway, "replacement")
        jobs = wait_completed(gateway, JOBS)
        assert jobs["completed"] == JOBS and jobs["failed"] == 0
        assert jobs["retried"] >= 1, "the killed worker's jobs were redelivered"
        assert statuses(gateway, ids) == {"COMPLETED": JOBS}
    finally:
        gateway.stop()


@pytest.mark.slow
def test_gateway_restart_under_load_loses_and_duplicates_nothing(tmp_path, start_workers):
    prefix = f"fault-{uuid.uuid4().hex[:8]}"
    gateway = GatewayProcess(redis_url(), tmp_path, extra_args=("--redis-prefix", prefix)).start()
    try:
        gateway.register("ep", TOKEN, heartbeatIntervalSeconds=1, heartbeatMisses=2, maxRetries=5)
        start_workers(gateway, "w1", "w2")
        ids = submit(gateway, JOBS)
        wait_completed(gateway, JOBS, at_least=40)
        gateway.kill()  # SIGKILL: no graceful shutdown
        gateway.start()  # same port, same Redis: workers reconnect by themselves
        jobs = wait_completed(gateway, JOBS)
        assert statuses(gateway, ids) == {"COMPLETED": JOBS}
        assert jobs["completed"] == JOBS, "each job has exactly one accepted result"
        assert jobs["inQueue"] == 0 and jobs["inProgress"] == 0
    finally:
        gateway.stop()
        clean_redis_prefix(prefix)


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
