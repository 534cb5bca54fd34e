"""`handlerctl dev` end to end: a subprocess with real worker processes, driven by `handlerctl run`
and by the unmodified runpod client; scale from zero and back, crash loops, reload, Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import runpod

from tests.conftest import REPO_ROOT
from tests.processes import DevProcess, alive, descendants, handlerctl, subprocess_env

ENDPOINT = "default--hello"
FAST_SCALING = """
apiVersion: handlerops.dev/v1alpha1
kind: HandlerDeployment
metadata: {{name: {name}}}
spec:
  handler: {{module: handler}}
  scaling:
    minReplicas: 0
    maxReplicas: {max_replicas}
    targetQueuePerWorker: {per_worker}
    scaleToZeroAfterSeconds: 2
    scaleDownStabilizationSeconds: 0
  jobs: {{heartbeatIntervalSeconds: 1}}
"""


def scaling_file(tmp_path, name="hello", max_replicas=3, per_worker=20):
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        FAST_SCALING.format(name=name, max_replicas=max_replicas, per_worker=per_worker)
    )
    return str(path)


@pytest.fixture
def dev(tmp_path):
    started = []

    def start(target: str, *args: str) -> DevProcess:
        process = DevProcess(target, tmp_path, args).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def worker_pids(process: DevProcess) -> set[int]:
    return descendants(process.process.pid)


def test_hundred_jobs_scale_from_zero_and_back_and_ctrl_c_leaves_nothing(
    dev, tmp_path, monkeypatch
):
    server = dev("examples/hello", "-f", scaling_file(tmp_path))
    assert not worker_pids(server), "no worker at rest"
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"name": f"n{i}"}) + "\n" for i in range(100)))

    seen: set[int] = set()
    result = handlerctl(
        "--url", server.url, "--api-key", server.key,
        "run", ENDPOINT, "--inputs-jsonl", str(jobs), "--wait", "--timeout", "120",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    views = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(views) == 100
    assert {v["status"] for v in views} == {"COMPLETED"}
    assert [v["output"]["greeting"] for v in views] == [f"Hello, n{i}!" for i in range(100)]
    log = server.wait_log("workers 0 -> ")
    assert "ScaleUp" in log
    seen |= worker_pids(server)

    # Idle for scaleToZeroAfterSeconds: every worker drained and stopped.
    server.wait_log("ScaledToZero", timeout=30)
    deadline = time.monotonic() + 10
    while worker_pids(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not worker_pids(server), "workers left after scale to zero"

    # The same gateway serves the unmodified runpod client; it scales up again from zero.
    monkeypatch.setattr(runpod, "api_key", server.key)
    monkeypatch.setattr(runpod, "endpoint_url_base", server.url + "/v2")
    output = runpod.Endpoint(ENDPOINT).run_sync({"name": "runpod"}, timeout=60)
    assert output == {"greeting": "Hello, runpod!"}
    seen |= worker_pids(server)
    assert seen, "workers ran"

    assert server.interrupt() == 0
    assert "stopped: no worker left running" in server.log()
    left = [pid for pid in seen if alive(pid)]
    assert not left, f"processes left after Ctrl-C: {left}"


def test_stream_prints_chunks_in_order_and_a_failed_job_exits_1(dev, tmp_path):
    server = dev("examples/streaming", "-f", scaling_file(tmp_path, "streaming"))
    base = ("--url", server.url, "--api-key", server.key)
    text = "one two three four five"
    streamed = handlerctl(
        *base, "run", "default--streaming", "--input", json.dumps({"text": text, "delay": 0.05}),
        "--stream",
    )  # fmt: skip
    assert streamed.returncode == 0, streamed.stderr
    chunks = [json.loads(line) for line in streamed.stdout.splitlines()]
    assert [c["token"] for c in chunks] == text.split()
    assert [c["index"] for c in chunks] == list(range(5))

    failed = handlerctl(
        *base, "run", "default--streaming", "--input", json.dumps({"text": 42}), "--wait"
    )
    assert failed.returncode == 1
    assert "FAILED" in failed.stderr and "split" in failed.stderr, failed.stderr

    # status / health on the same job and endpoint.
    job = json.loads(failed.stdout)
    status = handlerctl(*base, "status", "default--streaming", job["id"])
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "FAILED"
    health = handlerctl(*base, "-o", "table", "health", "default--streaming")
    assert health.returncode == 0 and "failed" in health.stdout
    listed = handlerctl(*base, "endpoints")
    assert json.loads(listed.stdout)[0]["endpoint"] == "default--streaming"


def test_crash_loop_shows_the_loader_message_backs_off_and_reload_fixes_it(dev, tmp_path):
    project = tmp_path / "broken"
    project.mkdir()
    handler = project / "handler.py"
    handler.write_text("import not_installed_anywhere\n\n\ndef handler(job):\n    return 1\n")
    server = dev(str(project), "-f", scaling_file(tmp_path, "broken"))
    # Said at once, before any job waits on a worker: the file, the line, the error.
    started = server.wait_log("the handler does not load")
    assert 'handler.py", line 1' in started and "not_installed_anywhere" in started
    base = ("--url", server.url, "--api-key", server.key)
    submitted = handlerctl(*base, "run", "default--broken", "--input", "{}")
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)["id"]

    log = server.wait_log("crash:", timeout=30)
    assert "not_installed_anywhere" in log
    time.sleep(4)
    crashes = server.log().count("crash:")
    # Backoff 1 s, 2 s, 4 s ...: a handful of starts, not an endless loop.
    assert 1 <= crashes <= 4, server.log()
    assert "next start in 2 s" in server.log() or crashes == 1
    # A client waiting on the job is told why it waits, not left to its timeout.
    view = json.loads(handlerctl(*base, "status", "default--broken", job).stdout)
    assert view["status"] == "IN_QUEUE"
    assert view["handlerProblem"]["reason"] == "HandlerCrashLoop"
    assert "not_installed_anywhere" in view["handlerProblem"]["message"]
    waited = handlerctl(
        *base, "run", "default--broken", "--input", "{}", "--wait", "--timeout", "1"
    )
    assert waited.returncode == 1
    assert "waiting on default--broken: the endpoint's workers fail (HandlerCrashLoop)" in (
        waited.stderr
    )
    assert "not finished in time; the endpoint's workers fail" in waited.stderr

    handler.write_text("def handler(job):\n    return {'fixed': True}\n")
    server.wait_log(": handler.py changed; restarting workers", timeout=10)
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        view = json.loads(handlerctl(*base, "status", "default--broken", job).stdout)
        if view["status"] == "COMPLETED":
            break
        time.sleep(0.3)
    assert view["output"] == {"fixed": True}
    assert "handlerProblem" not in view
    health = json.loads(handlerctl(*base, "health", "default--broken").stdout)
    assert "handlerProblem" not in health  # a worker of the fixed code took jobs
    assert server.interrupt() == 0


def test_reload_lets_a_busy_worker_finish_its_job_first(dev, tmp_path):
    project = tmp_path / "versioned"
    project.mkdir()
    handler = project / "handler.py"
    source = (
        "import time\n\n\ndef handler(job):\n"
        "    time.sleep(job['input'].get('sleep', 0))\n    return {{'version': {version}}}\n"
    )
    handler.write_text(source.format(version=1))
    server = dev(str(project), "-f", scaling_file(tmp_path, "versioned"))
    base = ("--url", server.url, "--api-key", server.key)
    busy = json.loads(
        handlerctl(*base, "run", "default--versioned", "--input", '{"sleep": 4}').stdout
    )["id"]
    deadline = time.monotonic() + 30
    while json.loads(handlerctl(*base, "status", "default--versioned", busy).stdout)["status"] != (
        "IN_PROGRESS"
    ):
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.1)

    handler.write_text(source.format(version=2))
    server.wait_log(": handler.py changed; restarting workers", timeout=10)
    after = handlerctl(*base, "run", "default--versioned", "--input", "{}", "--wait")
    assert after.returncode == 0, after.stderr
    assert json.loads(after.stdout)["output"] == {"version": 2}
    deadline = time.monotonic() + 30
    while True:
        finished = json.loads(handlerctl(*base, "status", "default--versioned", busy).stdout)
        if finished["status"] != "IN_PROGRESS" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert finished["status"] == "COMPLETED"
    assert finished["output"] == {"version": 1}, "the busy worker finished with the old code"


def _running_workers(dev, tmp_path, monkeypatch) -> tuple[DevProcess, set[int]]:
    """handlerctl dev with a worker that has served a job; the worker processes."""
    server = dev("examples/hello", "-f", scaling_file(tmp_path))
    monkeypatch.setattr(runpod, "api_key", server.key)
    monkeypatch.setattr(runpod, "endpoint_url_base", server.url + "/v2")
    assert runpod.Endpoint(ENDPOINT).run_sync({"name": "x"}, timeout=60) == {
        "greeting": "Hello, x!"
    }
    workers = worker_pids(server)
    assert workers, "a worker ran"
    return server, workers


def gone_within(pids: set[int], seconds: float) -> list[int]:
    """The pids still alive after waiting up to `seconds` for them to end."""
    deadline = time.monotonic() + seconds
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [pid for pid in pids if alive(pid)]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP], ids=["SIGKILL", "SIGHUP"])
def test_no_worker_outlives_handlerctl_dev(dev, tmp_path, monkeypatch, sig):
    """Killed outright (SIGKILL: no cleanup of its own) or its terminal closed (SIGHUP: it
    drains as on Ctrl-C), handlerctl dev leaves no process behind."""
    server, workers = _running_workers(dev, tmp_path, monkeypatch)
    os.kill(server.process.pid, sig)
    server.process.wait(30)
    assert not gone_within(workers, 5), "workers outlived handlerctl dev"


def test_a_handlers_prints_and_errors_show_in_the_dev_output(dev, tmp_path):
    """What a handler prints, and the message of what it raises, reach handlerctl dev's own
    output, each line prefixed with the worker's name."""
    project = tmp_path / "chatty"
    project.mkdir()
    (project / "handler.py").write_text(
        "def handler(job):\n"
        "    print(f\"working on {job['input']['n']}\", flush=True)\n"
        "    if job['input']['n'] == 2:\n"
        "        raise ValueError('no twos here')\n"
        "    return job['input']['n']\n"
    )
    server = dev(str(project), "-f", scaling_file(tmp_path, "chatty"))
    base = ("--url", server.url, "--api-key", server.key)
    for n in (1, 2):
        handlerctl(*base, "run", "default--chatty", "--input", json.dumps({"n": n}), "--wait")
    lines = server.wait_log("no twos here").splitlines()
    worker_line = re.compile(r"^chatty-\d+ \| ")
    for printed in ("working on 1", "working on 2", "no twos here"):
        assert any(worker_line.match(line) and printed in line for line in lines), printed
    assert not any('"level": "DEBUG"' in line for line in lines)  # the SDK's, unless asked

    # The same lines through `handlerctl logs`, all workers' or one's.
    logged = handlerctl(*base, "logs", "default--chatty")
    assert logged.returncode == 0, logged.stderr
    assert re.search(r"^chatty-\d+ \| working on 1$", logged.stdout, re.M), logged.stdout
    worker = logged.stdout.splitlines()[0].split(" | ")[0]
    only = handlerctl(*base, "logs", "default--chatty", "--worker", worker, "--tail", "1000")
    assert {line.split(" | ")[0] for line in only.stdout.splitlines()} == {worker}
    # -f prints a line printed after it started.
    follow = subprocess.Popen(
        [sys.executable, "-m", "handlerctl.commands", *base, "logs", "default--chatty", "-f"],
        stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=subprocess_env(),
    )  # fmt: skip
    try:
        handlerctl(*base, "run", "default--chatty", "--input", json.dumps({"n": 3}), "--wait")
        assert follow.stdout is not None
        deadline = time.monotonic() + 30
        seen = ""
        while "working on 3" not in seen and time.monotonic() < deadline:
            seen = follow.stdout.readline()
        assert "working on 3" in seen
    finally:
        follow.kill()
        follow.wait()
