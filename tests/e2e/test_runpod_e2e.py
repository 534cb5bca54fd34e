"""Real parts end to end: gateway subprocess + `python -m handler_worker` + `runpod.Endpoint`."""

from __future__ import annotations

import re
import time
import urllib.request

import pytest
import requests

from tests.conftest import EXAMPLES
from tests.e2e.conftest import TOKEN
from tests.processes import ADMIN_KEY, CLIENT_KEY, http_json


def test_run_status_output(endpoint, workers):
    workers("handler", [str(EXAMPLES / "hello")])
    job = endpoint.run({"name": "e2e"})
    assert job.status() in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    assert job.output(timeout=60) == {"greeting": "Hello, e2e!"}
    assert job.status() == "COMPLETED"


def test_run_sync(endpoint, workers):
    workers("handler", [str(EXAMPLES / "typed")])
    assert endpoint.run_sync({"numbers": [1, 2]}, timeout=60)["sum"] == 3.0


@pytest.mark.parametrize("channel", ["1", "0"])
def test_our_loop_takes_and_returns_over_the_job_channel_or_http(
    endpoint, workers, gateway, channel
):
    """The default: one WebSocket per worker (the gateway counts it); HANDLER_JOB_CHANNEL=0:
    the SDK's HTTP routes. Both serve every job."""
    workers("handler", [str(EXAMPLES / "typed")], HANDLER_JOB_CHANNEL=channel)
    for n in range(5):
        assert endpoint.run_sync({"numbers": [n, 1]}, timeout=60)["sum"] == n + 1
    with urllib.request.urlopen(gateway.url + "/metrics", timeout=10) as response:  # noqa: S310
        text = response.read().decode()
    open_channels = re.search(r'^handler_gateway_job_channels\{endpoint="ep"\} (\S+)$', text, re.M)
    assert float(open_channels.group(1) if open_channels else 0) == (channel == "1")


def test_stream_yields_every_chunk_once_in_order(endpoint, workers):
    workers("handler", [str(EXAMPLES / "streaming")])
    words = [f"w{n}" for n in range(12)]
    job = endpoint.run({"text": " ".join(words), "delay": 0.15})
    chunks = list(job.stream())
    assert [c["token"] for c in chunks] == words
    assert [c["index"] for c in chunks] == list(range(12))


def test_cancel_stops_the_running_job(endpoint, workers, gateway):
    workers("handlers.echo_async")
    job = endpoint.run({"sleep": 30})
    deadline = time.monotonic() + 30
    while job.status() != "IN_PROGRESS" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job.cancel()["status"] == "CANCELLED"
    # The SDK stops the job on job-stop (the gateway re-sends a stop the SDK dropped), so the
    # worker is free for the next job long before the cancelled one would have ended.
    assert endpoint.run_sync({"sleep": 0, "next": True}, timeout=20)["echo"]["next"] is True
    assert job.status() == "CANCELLED"


def test_health_counts(endpoint, workers):
    workers("handler", [str(EXAMPLES / "hello")])
    for _ in range(3):
        endpoint.run_sync({"name": "x"}, timeout=60)
    health = endpoint.health()
    assert health["jobs"]["completed"] == 3
    assert health["jobs"]["inQueue"] == 0 and health["jobs"]["inProgress"] == 0
    assert health["workers"]["idle"] + health["workers"]["running"] == 1


def test_failed_job_reports_the_error(endpoint, workers):
    workers("handlers.raises")
    job = endpoint.run({"value": 3})
    deadline = time.monotonic() + 60
    while job.status() not in ("FAILED", "COMPLETED") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job.status() == "FAILED"
    assert endpoint.run_sync({"value": 4}, timeout=60) is None  # the SDK's run_sync on failure


def test_concurrency_modifier_worker_uses_batch_take(endpoint, workers, gateway):
    workers("handlers.batched")
    jobs = [endpoint.run({"n": n}) for n in range(8)]
    for job in jobs:
        assert job.output(timeout=60)["id"] == job.job_id
    status, body = http_json("GET", f"{gateway.url}/admin/v1/endpoints/ep/workers")
    assert status == 200 and body["workers"][0]["id"] == "worker-1"


def test_purge_queue(endpoint):
    for n in range(3):
        endpoint.run({"n": n})
    assert endpoint.purge_queue() == {"removed": 3, "status": "completed"}


def test_a_full_queue_reaches_the_runpod_client_as_429_with_our_error(endpoint, gateway):
    """jobs.maxQueued through the unmodified client: `run` raises requests' HTTPError for 429,
    whose response carries Retry-After and our JSON error."""
    gateway.register("ep", TOKEN, maxQueued=2)
    endpoint.run({"n": 1})
    endpoint.run({"n": 2})
    with pytest.raises(requests.HTTPError) as refused:
        endpoint.run({"n": 3})
    response = refused.value.response
    assert (response.status_code, response.headers["Retry-After"]) == (429, "1")
    assert "jobs.maxQueued" in response.json()["error"]
    assert endpoint.health()["jobs"]["inQueue"] == 2


def test_a_jobs_s3_config_reaches_the_handler_through_the_real_sdk(endpoint, workers):
    """RunPod hands `s3Config` to the handler with the job; so do we (never dropped)."""
    workers("handlers.job_fields")
    s3 = {
        "accessId": "AKIA-e2e",
        "accessSecret": "secret-e2e",
        "bucketName": "e2e-outputs",
        "endpointUrl": "https://s3.example.com",
    }
    output = endpoint.run({"input": {"n": 1}, "s3Config": s3}).output(timeout=60)
    assert output["bucket"] == "e2e-outputs" and "s3Config" in output["fields"]
    plain = endpoint.run_sync({"n": 2}, timeout=60)
    assert plain["bucket"] is None and "s3Config" not in plain["fields"]


def worker_refreshes(gateway) -> int:
    _, health = http_json("GET", f"{gateway.url}/admin/v1/queues", key=ADMIN_KEY)
    return health["endpoints"]["ep"]["workers"]["refreshes"]


def test_a_job_that_asks_for_a_fresh_worker_gets_one_in_the_same_process(
    endpoint, workers, gateway
):
    """RunPod's `refresh_worker` in a result: the handler's state is gone for the next job
    (the runtime starts afresh), the process stays (no container restart), and it is counted."""
    worker = workers("handlers.fresh_state")
    first = endpoint.run_sync({}, timeout=60)
    assert endpoint.run_sync({}, timeout=60)["ran"] == first["ran"] + 1  # state kept
    asked = endpoint.run_sync({"refresh": True}, timeout=60)
    assert "refresh_worker" not in asked  # the SDK's flag, not output
    fresh = endpoint.run_sync({}, timeout=60)
    assert fresh["ran"] == 1 and fresh["refreshes"] == 1  # a fresh handler module
    assert fresh["pid"] == first["pid"] and worker.poll() is None  # the same process
    assert worker_refreshes(gateway) == 1


def test_a_module_level_refresh_worker_gives_every_job_a_fresh_worker(endpoint, workers, gateway):
    workers("handlers.always_fresh")
    outputs = [endpoint.run_sync({"n": n}, timeout=60) for n in range(3)]
    assert [o["ran"] for o in outputs] == [1, 1, 1]
    assert [o["refreshes"] for o in outputs] == [0, 1, 2]
    assert worker_refreshes(gateway) == 3


def test_a_job_whose_handler_failed_is_retried_when_its_policy_says_so(endpoint, workers, gateway):
    """The SDK reports the exception's type; the job's retryOnError names it: it runs again
    and completes, its failed run shown in status."""
    workers("handlers.flaky")
    retry = {"maxAttempts": 2, "backoffSeconds": 0, "errorTypes": ["TimeoutError"]}
    job = endpoint.run({"input": {"n": 1}, "policy": {"retryOnError": retry}})
    assert job.output(timeout=60) == {"ok": True}
    _, view = http_json("GET", f"{gateway.url}/v2/ep/status/{job.job_id}", key=CLIENT_KEY)
    assert view["status"] == "COMPLETED" and view["attempt"] == 2
    assert "TimeoutError" in view["attempts"][0]["error"]
    once = endpoint.run({"n": 2})  # no policy: a handler error is final
    deadline = time.monotonic() + 60
    while once.status() not in ("FAILED", "COMPLETED") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert once.status() == "FAILED"
