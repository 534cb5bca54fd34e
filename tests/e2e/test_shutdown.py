"""A worker told to stop (SIGTERM: scale-down, rollout, node drain, eviction) while it runs a
job, on both backends, through both job loops (ours and the runpod SDK's): the job completes once, nothing is
redelivered, no new job is handed to it, and it exits long before a take long-poll would end."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from tests.e2e.conftest import TOKEN, serve_gateway
from tests.gateway.conftest import backend_params
from tests.processes import CLIENT_KEY, http_json, kill_group, start_worker
from tests.scenarios import wait_holding_jobs

TAKE_HOLD = 120  # seconds: the old exit path waited for a long-poll this long
EXITS_WITHIN = 45  # seconds from SIGTERM: the job's 3 s plus start-up noise, far below the hold


@pytest.fixture(params=backend_params())
def gateway(request, tmp_path):
    yield from serve_gateway(request.param, tmp_path, "--take-hold-seconds", str(TAKE_HOLD))


def run(gateway, job_input: dict) -> str:
    return http_json("POST", f"{gateway.url}/v2/ep/run", {"input": job_input}, key=CLIENT_KEY)[1][
        "id"
    ]


def status(gateway, job_id: str) -> dict:
    return http_json("GET", f"{gateway.url}/v2/ep/status/{job_id}", key=CLIENT_KEY)[1]


@pytest.mark.parametrize("loop", ["ours", "sdk"])
def test_sigterm_mid_job_finishes_it_once_takes_nothing_more_and_exits(gateway, tmp_path, loop):
    """Both job loops: ours (default), and the SDK's own (HANDLER_SDK_LOOP=1), where the leave
    is chained in front of the SDK's SIGTERM handler."""
    sdk = {"HANDLER_SDK_LOOP": "1"} if loop == "sdk" else {}
    worker = start_worker(
        gateway.worker_env("ep", TOKEN, "leaving", HANDLER_CONCURRENCY="2", **sdk),
        "handlers.echo_async",
        [],
        tmp_path / "leaving.log",
    )
    try:
        running = run(gateway, {"sleep": 3, "n": 1})
        wait_holding_jobs(gateway, "leaving")
        time.sleep(0.5)  # the SDK's spare slot has its next take long-poll open again
        worker.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        later = run(gateway, {"n": 2})
        try:
            code = worker.wait(EXITS_WITHIN)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {EXITS_WITHIN} s after SIGTERM (take hold {TAKE_HOLD} s)")
        assert code == 0, (tmp_path / "leaving.log").read_text()[-3000:]
        done = status(gateway, running)
        assert done["status"] == "COMPLETED", done
        assert done["output"]["echo"]["n"] == 1
        assert status(gateway, later)["status"] == "IN_QUEUE", "handed to a leaving worker"
        jobs = http_json("GET", f"{gateway.url}/v2/ep/health", key=CLIENT_KEY)[1]["jobs"]
        assert jobs.get("retried", 0) == 0 and jobs["completed"] == 1, jobs
    finally:
        kill_group(worker)
