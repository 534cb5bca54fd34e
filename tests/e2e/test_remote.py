"""`@remote`: in-process without a gateway; through `handlerctl dev` serving a built endpoint with
one; sync and async call styles, classes, and remote errors with their traceback."""

from __future__ import annotations

import asyncio
import importlib
import shutil
import sys

import pytest

from handler_worker import remote
from tests.conftest import FIXTURES
from tests.processes import DevProcess, http_json


@pytest.fixture
def project(tmp_path, monkeypatch):
    """The fixture project, importable as `app` (fresh modules for each test)."""
    copy = tmp_path / "project"
    shutil.copytree(FIXTURES / "remote_project", copy)
    monkeypatch.syspath_prepend(str(copy))
    for name in [m for m in sys.modules if m == "app" or m.startswith("app.")]:
        monkeypatch.delitem(sys.modules, name)
    for name in ("HANDLER_REMOTE_URL", "HANDLERCTL_URL", "RUNPOD_WEBHOOK_GET_JOB"):
        monkeypatch.delenv(name, raising=False)
    yield copy
    remote.configure(url="", api_key="", namespace="default")


def test_without_a_gateway_everything_runs_in_process(project):
    tasks = importlib.import_module("app.tasks")
    models = importlib.import_module("app.models")
    assert tasks.add(1, 2) == 3
    assert tasks.where() == "local"
    assert asyncio.run(tasks.shout("hi")) == "HI"
    assert asyncio.run(tasks.add.aio(2, 2)) == 4
    scaler = models.Scaler(2)
    assert isinstance(scaler, remote.unwrap(models.Scaler)) and scaler.scale(5) == 10
    assert tasks.add.__remote__.endpoint == "cpu-tasks" and tasks.add.__name__ == "add"


def test_inside_a_worker_calls_never_leave_the_process(project, monkeypatch):
    monkeypatch.setenv("HANDLERCTL_URL", "http://127.0.0.1:9")  # would fail if used
    monkeypatch.setenv("RUNPOD_WEBHOOK_GET_JOB", "http://gateway/v2/x/job-take/$ID?")
    assert importlib.import_module("app.tasks").add(1, 1) == 2


def test_unknown_decorator_arguments_fail_at_decoration():
    with pytest.raises(TypeError, match="unknown argument"):
        remote.remote(gpus=1)(lambda: None)


@pytest.fixture
def served(project, tmp_path):
    """One `handlerctl dev PROJECT`: every endpoint the build scan finds, on one gateway."""
    server = DevProcess(str(project), tmp_path).start()
    yield server
    server.stop()


def test_with_a_gateway_calls_run_on_the_endpoints_workers(served):
    tasks = importlib.import_module("app.tasks")
    models = importlib.import_module("app.models")
    for endpoint in ("cpu-tasks", "gpu-models"):
        assert (
            f"endpoint default--{endpoint} on {served.url}/v2/default--{endpoint}" in served.log()
        )
    remote.configure(url=served.url, api_key=served.key, namespace="default")
    assert tasks.add(2, 3) == 5
    assert tasks.where().startswith("cpu-tasks-")  # the worker's pod id, not "local"
    assert asyncio.run(tasks.shout("remote")) == "REMOTE"
    assert asyncio.run(tasks.add.aio(40, 2)) == 42
    with pytest.raises(remote.RemoteError, match="TypeError") as failure:
        tasks.add(1, "x")
    assert "unsupported operand" in str(failure.value)
    assert "Traceback" in failure.value.remote_traceback
    # Printed, it shows the remote message and traceback (the caller's own is local only).
    assert "unsupported operand" in failure.value.message
    assert "Remote traceback:" in str(failure.value) and "tasks.py" in str(failure.value)

    scaler = models.Scaler(3)  # another endpoint, with its own workers, on the same gateway
    assert isinstance(scaler, remote.RemoteInstance)
    assert scaler.scale(7) == 21
    assert asyncio.run(scaler.scale.aio(2)) == 6


def test_an_instance_is_built_once_per_worker_and_reused_by_later_calls(served):
    models = importlib.import_module("app.models")
    remote.configure(url=served.url, api_key=served.key, namespace="default")
    model = models.Loaded("weights-v1")
    seen = [model.where() for _ in range(20)]
    by_worker = {}
    for worker, builds in seen:
        by_worker.setdefault(worker, set()).add(builds)
    assert by_worker and all(builds == {1} for builds in by_worker.values()), seen


def test_a_worker_calls_another_endpoint_through_the_gateway_and_never_back_into_its_chain(
    served,
):
    """A function on cpu-tasks calls a class on gpu-models (another resource config): the job
    goes through the gateway to gpu-models' own worker; its call back to cpu-tasks (already in
    the chain) runs in-process there, so the chain cannot wait on itself."""
    tasks = importlib.import_module("app.tasks")
    remote.configure(url=served.url, api_key=served.key, namespace="default")
    caller, callee, called_back = tasks.chain()
    assert caller.startswith("cpu-tasks-") and callee.startswith("gpu-models-"), caller
    assert called_back == callee  # in-process on the gpu-models worker
    _, health = http_json("GET", f"{served.url}/v2/default--gpu-models/health", key=served.key)
    assert health["jobs"]["completed"] >= 1  # gpu-models' queue had the job


def test_a_new_endpoint_in_the_project_is_served_without_a_restart(served, project):
    tasks_module = project / "app" / "more.py"
    tasks_module.write_text(
        "from handler_worker.remote import remote\n\n\n"
        "@remote(endpoint='io-tasks')\n"
        "def double(x):\n    return 2 * x\n"
    )
    served.wait_log("new endpoint default--io-tasks", timeout=30)
    remote.configure(url=served.url, api_key=served.key, namespace="default")
    assert importlib.import_module("app.more").double(21) == 42
    log = served.wait_log("io-tasks-1 |", timeout=30)
    assert "gpu-models" in log and "cpu-tasks" in log
