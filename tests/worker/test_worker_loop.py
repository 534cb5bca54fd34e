"""The real runpod worker loop in production mode, through our loader, against the stub gateway."""

from __future__ import annotations

import json
import os
import signal
import time
from urllib.parse import parse_qs, urlsplit

import pytest

from handler_worker.generic import build_request, decode_result
from tests.worker.conftest import example_path


def _scaled_sum(values, scale=1.0):
    return sum(values) * scale


class Accumulator:
    def __init__(self, start):
        self.total = start

    def add(self, *values):
        self.total += sum(values)
        return self.total


@pytest.fixture
def start_worker(stub_gateway, worker_process):
    def start(module: str, extra_path: tuple[str, ...] = (), **env: str):
        return worker_process(module, {**stub_gateway.worker_env(), **env}, extra_path)

    return start


def test_sync_handler_result_body(stub_gateway, start_worker):
    stub_gateway.enqueue("job-sync", {"name": "H100"})
    start_worker("handler", extra_path=(example_path("hello"),))
    assert stub_gateway.wait_done("job-sync") == {"output": {"greeting": "Hello, H100!"}}
    assert stub_gateway.recorded.done_query["job-sync"][0]["isStream"] == "false"
    # Every take names this process, and the same one each time (a restart would change it).
    instances = {
        parse_qs(urlsplit(take).query)["instance"][0] for take in stub_gateway.recorded.takes
    }
    assert len(instances) == 1


def test_async_handler_and_heartbeat(stub_gateway, start_worker):
    stub_gateway.enqueue("job-async", {"sleep": 0.1, "k": "v"})
    start_worker("handlers.echo_async")
    body = stub_gateway.wait_done("job-async")
    assert body == {"output": {"echo": {"sleep": 0.1, "k": "v"}, "id": "job-async"}}
    deadline = time.monotonic() + 10
    while not stub_gateway.recorded.pings and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stub_gateway.recorded.pings, "the SDK's heartbeat reached the ping route"
    assert stub_gateway.recorded.auth == {"worker-token"}, "raw token, no Bearer"


def test_generator_handler_streams_each_chunk(stub_gateway, start_worker):
    stub_gateway.enqueue("job-gen", {"text": "one two three"})
    start_worker("handler", extra_path=(example_path("streaming"),))
    final = stub_gateway.wait_done("job-gen")
    chunks = [
        {"index": 0, "token": "one"},
        {"index": 1, "token": "two"},
        {"index": 2, "token": "three"},
    ]
    assert stub_gateway.recorded.stream["job-gen"] == chunks
    assert final == {"output": chunks}, "return_aggregate_stream puts the chunks in the output"
    assert stub_gateway.recorded.done_query["job-gen"][0]["isStream"] == "true"


def test_async_generator_with_handler_event(stub_gateway, start_worker):
    stub_gateway.enqueue("job-agen", {"count": 2})
    start_worker("handlers.async_gen")
    stub_gateway.wait_done("job-agen")
    assert stub_gateway.recorded.stream["job-agen"] == [{"n": 0}, {"n": 1}]


def test_generic_cloudpickle_jobs(stub_gateway, start_worker):
    stub_gateway.enqueue("job-fn", build_request(_scaled_sum, [1, 2, 3], scale=2.0))
    stub_gateway.enqueue(
        "job-cls",
        build_request(Accumulator, 4, 5, method_name="add", constructor_args=(10,)),
    )
    start_worker("handler_worker.generic")
    assert decode_result(stub_gateway.wait_done("job-fn")["output"]) == 12.0
    assert decode_result(stub_gateway.wait_done("job-cls")["output"]) == 19


def test_handler_exception_arrives_as_error_body(stub_gateway, start_worker):
    stub_gateway.enqueue("job-err", {"value": 42})
    start_worker("handlers.raises")
    body = stub_gateway.wait_done("job-err")
    assert set(body) == {"error"}
    error = json.loads(body["error"])
    assert error["error_type"] == "<class 'ValueError'>"
    assert error["error_message"] == "bad value: 42"
    assert 'raise ValueError(f"bad value' in error["error_traceback"]
    assert error["worker_id"] == "worker-1"


def test_input_validation_error_body(stub_gateway, start_worker):
    stub_gateway.enqueue("job-bad", {"steps": "many"})
    start_worker("handlers.validated")
    error = json.loads(stub_gateway.wait_done("job-bad")["error"])
    assert error["status"] == 400
    assert {e["loc"] for e in error["errors"]} == {"input.prompt", "input.steps"}


def test_progress_update_then_final_result(stub_gateway, start_worker):
    stub_gateway.enqueue("job-progress", {})
    start_worker("handlers.progress")
    assert stub_gateway.wait_done("job-progress") == {"output": {"done": True}}
    bodies = stub_gateway.recorded.done["job-progress"]
    assert {"status": "IN_PROGRESS", "output": {"percent": 50}} in bodies


def test_refresh_worker_sets_stop_pod(stub_gateway, start_worker):
    stub_gateway.enqueue("job-refresh", {"value": 1})
    start_worker("handlers.refresh")
    assert stub_gateway.wait_done("job-refresh") == {"output": {"value": 1}, "stopPod": True}


SDK = {"HANDLER_SDK_LOOP": "1"}


@pytest.mark.parametrize(
    ("module", "env", "expected"),
    [
        ("handlers.batched", {}, ["batch_size=4"]),
        ("handlers.echo_async", {"HANDLER_CONCURRENCY": "4"}, ["capacity=4", "batch_size=4"]),
        ("handlers.echo_async", {}, ["capacity=1", "/job-take/"]),
        ("handlers.batched", SDK, ["batch_size=4"]),
        (
            "handlers.echo_async",
            {**SDK, "HANDLER_CONCURRENCY": "4"},
            ["capacity=4", "batch_size=9"],
        ),
        ("handlers.echo_async", SDK, ["capacity=1", "batch_size=3"]),
        ("handlers.echo_async", {**SDK, "HANDLER_SPARE_SLOT": "false"}, ["job-take/"]),
    ],
    ids=[
        "module-concurrency-modifier",
        "env-concurrency",
        "default",
        "sdk-loop-module-concurrency-modifier",
        "sdk-loop-env-concurrency",
        "sdk-loop-default",
        "sdk-loop-spare-slot-off",
    ],
)
def test_take_url_carries_capacity_and_batch(stub_gateway, start_worker, module, env, expected):
    """Our loop asks for as many jobs as it has free slots, the gateway caps it at N; the SDK's
    own loop (HANDLER_SDK_LOOP=1) gets 2N+1 slots (it sleeps when they look full)."""
    for index in range(8):
        stub_gateway.enqueue(f"job-{index}", {"sleep": 0.2})
    start_worker(module, **env)
    for index in range(8):
        stub_gateway.wait_done(f"job-{index}")
    first = stub_gateway.recorded.takes[0]
    for fragment in expected:
        assert fragment in first, first


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_heartbeat_dies_with_the_worker(stub_gateway, start_worker):
    """Issue: the SDK's ping process outlived a worker the OOM killer (or os._exit) ended, so
    its job looked alive until its execution timeout."""
    worker = start_worker("handlers.echo_async")
    deadline = time.monotonic() + 30
    while not stub_gateway.recorded.pings and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stub_gateway.recorded.pings, "the heartbeat started"
    with open(f"/proc/{worker.pid}/task/{worker.pid}/children") as children:
        pingers = [int(pid) for pid in children.read().split()]
    assert pingers
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(10)
    deadline = time.monotonic() + 15
    while any(map(_alive, pingers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(_alive, pingers))
    pings = len(stub_gateway.recorded.pings)
    time.sleep(1.5)  # RUNPOD_PING_INTERVAL is 1 s here: a live ping process would ping again
    assert len(stub_gateway.recorded.pings) == pings
