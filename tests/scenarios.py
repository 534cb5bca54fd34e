"""Fault scenarios with real processes (gateway, redis-server, sentinels, handler_worker running a
recording handler): each submits jobs, injects one fault, waits for every job to end and tallies
what happened. `bench/faults.py` prints the matrix; `tests/e2e/test_faults.py` runs a subset."""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import threading
import time
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.processes import (
    CLIENT_KEY,
    GatewayProcess,
    RedisServer,
    SentinelGroup,
    http_json,
    kill_group,
    start_worker,
    wait_until,
)

TOKEN = "fault-worker-token-0123456789"
HANDLER = "handlers.recording"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}


@dataclass
class Tally:
    """What became of the accepted jobs of one scenario."""

    scenario: str
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    dead_lettered: int = 0
    lost: int = 0  # accepted, then unknown or never ended
    executed_twice: int = 0  # the handler ran to its end more than once
    redelivered: int = 0  # interrupted by the fault, started again
    redelivery_s: list[float] = field(default_factory=list)  # fault → started again

    @property
    def redelivery_p99_s(self) -> float | None:
        if not self.redelivery_s:
            return None
        if len(self.redelivery_s) == 1:
            return self.redelivery_s[0]
        return statistics.quantiles(self.redelivery_s, n=100, method="inclusive")[98]


class Workers:
    """Named handler_worker processes kept running as a kubelet keeps a pod's container: one
    that exits is started again under the same name (unless killed on purpose)."""

    def __init__(self, gateway: GatewayProcess, workdir: Path, concurrency: int = 4):
        self.gateway, self.workdir, self.concurrency = gateway, workdir, concurrency
        self.records = workdir / "records"
        self.records.mkdir(exist_ok=True)
        self.processes: dict[str, subprocess.Popen] = {}
        self.restarts = 0
        self._stopped = threading.Event()
        self._keeper = threading.Thread(target=self._keep, daemon=True)
        self._keeper.start()

    def start(self, *names: str) -> None:
        for name in names:
            env = self.gateway.worker_env(
                "ep",
                TOKEN,
                name,
                HANDLER_CONCURRENCY=str(self.concurrency),
                RECORD_DIR=str(self.records),
            )
            log = self.workdir / f"{name}-{time.monotonic_ns()}.log"
            self.processes[name] = start_worker(env, HANDLER, [], log)

    def kill(self, name: str) -> None:
        process = self.processes.pop(name)
        kill_group(process)

    def _keep(self) -> None:
        while not self._stopped.wait(0.2):
            for name, process in list(self.processes.items()):
                if process.poll() is not None and self.processes.get(name) is process:
                    kill_group(process)  # its ping process too
                    self.restarts += 1
                    self.start(name)

    def stop(self) -> None:
        self._stopped.set()
        self._keeper.join(5)
        for process in self.processes.values():
            kill_group(process)

    def runs(self) -> tuple[dict[str, list[float]], dict[str, int]]:
        """Per job: the times its executions started, and how many ran to their end."""
        starts: dict[str, list[float]] = {}
        ends: dict[str, int] = {}
        for path in self.records.glob("*.log"):
            for line in path.read_text().splitlines():
                event, job_id, when = line.split()
                if event == "start":
                    starts.setdefault(job_id, []).append(float(when))
                else:
                    ends[job_id] = ends.get(job_id, 0) + 1
        return starts, ends


class Submitter:
    """A client submitting jobs in a thread, retrying a refused submit (503, no connection) as
    the runpod client does; `accepted` holds the ids of the jobs the gateway took."""

    def __init__(self, gateway: GatewayProcess, inputs: list[dict]):
        self.gateway, self.inputs = gateway, inputs
        self.accepted: list[str] = []
        self.refused = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for job_input in self.inputs:
            while True:
                try:
                    _, body = http_json(
                        "POST",
                        f"{self.gateway.url}/v2/ep/run",
                        {"input": job_input},
                        key=CLIENT_KEY,
                        timeout=10,
                    )
                    self.accepted.append(body["id"])
                    break
                except (urllib.error.HTTPError, OSError):
                    self.refused += 1
                    time.sleep(0.1)

    def join(self, timeout: float = 120) -> None:
        self._thread.join(timeout)


def _statuses(gateway: GatewayProcess, ids: list[str], timeout: float) -> dict[str, str]:
    """Each job's status once it ended (or as it stands at `timeout`; "" when not found)."""
    found: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    pending = list(ids)
    while pending and time.monotonic() < deadline:
        still = []
        for job_id in pending:
            try:
                _, view = http_json(
                    "GET", f"{gateway.url}/v2/ep/status/{job_id}", key=CLIENT_KEY, timeout=5
                )
                found[job_id] = view["status"]
            except urllib.error.HTTPError as error:
                found[job_id] = "" if error.code == 404 else found.get(job_id, "")
            except OSError:
                found.setdefault(job_id, "")
            if found[job_id] not in TERMINAL:
                still.append(job_id)
        pending = still
        if pending:
            time.sleep(0.3)
    return found


def tally(
    name: str,
    gateway: GatewayProcess,
    workers: Workers,
    accepted: list[str],
    fault_at: float | None,
    timeout: float = 120,
) -> Tally:
    statuses = _statuses(gateway, accepted, timeout)
    dead_letters = http_json("GET", f"{gateway.url}/admin/v1/endpoints/ep/dlq")[1]["jobs"]
    dead = {job["id"] for job in dead_letters}
    starts, ends = workers.runs()
    result = Tally(name, submitted=len(accepted))
    for job_id in accepted:
        status = statuses.get(job_id, "")
        result.completed += status == "COMPLETED"
        result.failed += status == "FAILED"
        result.dead_lettered += job_id in dead
        result.lost += status not in TERMINAL
        result.executed_twice += ends.get(job_id, 0) > 1
        times = sorted(starts.get(job_id, []))
        if fault_at is not None and times and times[0] < fault_at:
            later = [t for t in times if t >= fault_at]
            if later:
                result.redelivered += 1
                result.redelivery_s.append(later[0] - fault_at)
    return result


@contextlib.contextmanager
def running(*stoppables):
    try:
        yield
    finally:
        for part in stoppables:
            with contextlib.suppress(Exception):
                part.stop() if hasattr(part, "stop") else part.kill()


def _completed(gateway: GatewayProcess) -> int:
    try:
        return http_json("GET", f"{gateway.url}/v2/ep/health", key=CLIENT_KEY, timeout=5)[1][
            "jobs"
        ]["completed"]
    except (urllib.error.HTTPError, OSError):
        return 0


def _holds_jobs(gateway: GatewayProcess, worker: str) -> bool:
    workers = http_json("GET", f"{gateway.url}/admin/v1/endpoints/ep/workers")[1]["workers"]
    return any(w["id"] == worker and w["jobs"] for w in workers)


def wait_holding_jobs(gateway: GatewayProcess, worker: str, timeout: float = 60) -> None:
    wait_until(lambda: _holds_jobs(gateway, worker), timeout, f"{worker} never held a job")


def _register(gateway: GatewayProcess, **config) -> None:
    gateway.register(
        "ep",
        TOKEN,
        **{"heartbeatIntervalSeconds": 1, "heartbeatMisses": 2, "maxRetries": 3, **config},
    )


# -- the scenarios ------------------------------------------------------------------------------
def worker_sigkill(
    workdir: Path, backend: str, jobs: int = 120, gateway_args: tuple[str, ...] = ()
) -> Tally:
    """A worker SIGKILLed with jobs in flight (its pod deleted); a replacement joins."""
    gateway = GatewayProcess(backend, workdir, extra_args=gateway_args).start()
    workers = Workers(gateway, workdir)
    with running(workers, gateway):
        _register(gateway)
        workers.start("doomed", "survivor")
        submitter = Submitter(gateway, [{"sleep": 0.2, "n": n} for n in range(jobs)])
        wait_until(lambda: _completed(gateway) >= 20 and _holds_jobs(gateway, "doomed"), 60, "load")
        fault_at = time.time()
        workers.kill("doomed")
        workers.start("replacement")
        submitter.join()
        return tally(f"worker SIGKILL ({backend.split(':')[0]})", gateway, workers,
                     submitter.accepted, fault_at)  # fmt: skip


def _under_load(
    name: str, gateway: GatewayProcess, workdir: Path, jobs: int, fault: Callable[[], None]
) -> Tally:
    """Two workers on short jobs; `fault()` once 40 have completed; then every job's end."""
    workers = Workers(gateway, workdir)
    with running(workers, gateway):
        _register(gateway)
        workers.start("w1", "w2")
        submitter = Submitter(gateway, [{"sleep": 0.05, "n": n} for n in range(jobs)])
        wait_until(lambda: _completed(gateway) >= 40, 60, "load")
        fault_at = time.time()
        fault()
        submitter.join()
        return tally(name, gateway, workers, submitter.accepted, fault_at)


def gateway_sigkill(
    workdir: Path, redis_url: str, gateway_args: tuple[str, ...] = (), jobs: int = 150
) -> Tally:
    """The gateway SIGKILLed under load and started again (same Redis, same address)."""
    gateway = GatewayProcess(redis_url, workdir, extra_args=gateway_args).start()

    def restart() -> None:
        gateway.kill()
        gateway.start()

    return _under_load("gateway SIGKILL + restart", gateway, workdir, jobs, restart)


def redis_restart(workdir: Path, jobs: int = 150) -> Tally:
    """Redis killed under load and started again 2 s later on its data (AOF, fsync always)."""
    (workdir / "redis").mkdir(exist_ok=True)
    server = RedisServer(workdir / "redis").start()
    with running(server):
        gateway = GatewayProcess(server.url, workdir).start()

        def restart() -> None:
            server.kill()
            time.sleep(2)
            server.start()

        return _under_load("Redis kill + restart", gateway, workdir, jobs, restart)


def poison(
    workdir: Path,
    backend: str,
    jobs: int = 60,
    poisoned: int = 3,
    gateway_args: tuple[str, ...] = (),
) -> Tally:
    """Jobs that kill their worker every time (restarted under its name, as a pod's container
    is): each reaches the dead-letter queue after maxRetries; the others complete."""
    gateway = GatewayProcess(backend, workdir, extra_args=gateway_args).start()
    workers = Workers(gateway, workdir, concurrency=2)
    with running(workers, gateway):
        _register(gateway, maxRetries=2)
        workers.start("w1", "w2")
        inputs = [
            {"sleep": 0.05, "n": n, "poison": n % (jobs // poisoned) == 0} for n in range(jobs)
        ]
        submitter = Submitter(gateway, inputs)
        submitter.join()
        return tally(f"poison handler ({backend.split(':')[0]})", gateway, workers,
                     submitter.accepted, None)  # fmt: skip


def ghost_take(
    workdir: Path, backend: str, jobs: int = 40, gateway_args: tuple[str, ...] = ()
) -> Tally:
    """A worker's take long-poll abandoned (its client timed out, its pod died) before jobs
    arrive: nothing may be handed to it; a live worker runs every job at once."""
    gateway = GatewayProcess(backend, workdir, extra_args=gateway_args).start()
    workers = Workers(gateway, workdir)
    with running(workers, gateway):
        _register(gateway)
        for n in range(3):  # each gives up after 0.3 s; the gateway holds takes for 5 s
            with contextlib.suppress(OSError):
                http_json("GET", f"{gateway.url}/v2/ep/job-take/ghost-{n}", key=TOKEN, timeout=0.3)
        workers.start("w1")
        submitter = Submitter(gateway, [{"sleep": 0.02, "n": n} for n in range(jobs)])
        submitter.join()
        result = tally("ghost long-poll", gateway, workers, submitter.accepted, None)
        ghosts = http_json("GET", f"{gateway.url}/admin/v1/endpoints/ep/workers")[1]["workers"]
        result.lost += sum(len(w["jobs"]) for w in ghosts if w["id"].startswith("ghost"))
        return result


def outage_beyond_heartbeats(workdir: Path, jobs: int = 16) -> Tally:
    """Redis unreachable (stopped) for twice the heartbeat window while workers run long jobs:
    the jobs of live workers must not be presumed lost and run again."""
    (workdir / "redis").mkdir(exist_ok=True)
    server = RedisServer(workdir / "redis").start()
    gateway = GatewayProcess(server.url, workdir).start()
    workers = Workers(gateway, workdir)
    with running(workers, gateway, server):
        _register(gateway)  # window: 2 s
        workers.start("w1", "w2")
        submitter = Submitter(gateway, [{"sleep": 6, "n": n} for n in range(jobs)])
        submitter.join()
        wait_until(lambda: _holds_jobs(gateway, "w1") and _holds_jobs(gateway, "w2"), 30, "running")
        fault_at = time.time()
        os.kill(server.process.pid, signal.SIGSTOP)
        time.sleep(4)
        os.kill(server.process.pid, signal.SIGCONT)
        return tally("Redis outage > heartbeat window", gateway, workers, submitter.accepted,
                     fault_at)  # fmt: skip


def sentinel_failover(workdir: Path, jobs: int = 200) -> Tally:
    """The Redis primary SIGKILLed under load; Sentinel promotes the replica; the gateway
    follows it."""
    group = SentinelGroup(workdir).start()
    with running(group):
        gateway = GatewayProcess(group.url, workdir).start()

        def fail_over() -> None:
            group.primary.kill()
            wait_until(
                lambda: group.current_primary_port() == group.replica.port, 30, "no failover"
            )

        return _under_load("Sentinel failover", gateway, workdir, jobs, fail_over)


SCENARIOS: dict[str, Callable[..., Tally]] = {
    "worker-sigkill": worker_sigkill,
    "gateway-sigkill": gateway_sigkill,
    "redis-restart": redis_restart,
    "sentinel-failover": sentinel_failover,
    "poison": poison,
    "ghost-take": ghost_take,
    "outage-beyond-heartbeats": outage_beyond_heartbeats,
}
