"""Process helpers for integration tests: free ports, the gateway and workers as subprocesses.

Every process is started in its own session and killed by process group, so the runpod SDK's
ping subprocess never outlives a test.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import venv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from handler_protocol.urls import worker_webhook_env
from tests.conftest import REPO_ROOT, child_pythonpath, subprocess_env

ADMIN_KEY = "e2e-admin-key"
CLIENT_KEY = "e2e-client-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_group(process: subprocess.Popen, sig: int = signal.SIGKILL, wait: float = 10) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(wait)


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL what is left of the group."""
    kill_group(process, signal.SIGTERM, wait=10)
    kill_group(process, signal.SIGKILL, wait=5)


def http_json(method: str, url: str, body=None, key: str = ADMIN_KEY, timeout: float = 10):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        raw = response.read()
        return response.status, (json.loads(raw) if raw else None)


@dataclass
class GatewayProcess:
    backend: str
    workdir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """The gateway's arguments (after `python -m handler_gateway`)."""
        (self.workdir / "admin-keys").write_text(ADMIN_KEY + "\n")
        (self.workdir / "client-keys").write_text(CLIENT_KEY + "\n")
        return [
            "--backend",
            self.backend,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--admin-key-file",
            str(self.workdir / "admin-keys"),
            "--api-key-file",
            str(self.workdir / "client-keys"),
            "--take-hold-seconds",
            "5",
            *self.extra_args,
        ]

    def start(self, timeout: float = 20) -> GatewayProcess:
        log = open(self.workdir / f"gateway-{time.monotonic_ns()}.log", "w")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "handler_gateway", *self.command()],
            env=subprocess_env(**self.env),
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                if http_json("GET", self.url + "/healthz")[0] == 200:
                    return self
            time.sleep(0.05)
        raise TimeoutError("gateway did not start")

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process)

    def kill(self) -> None:
        if self.process is not None:
            kill_group(self.process)

    def register(self, endpoint: str, token: str, **config) -> None:
        status, _ = http_json(
            "PUT", f"{self.url}/admin/v1/endpoints/{endpoint}", {"workerToken": token, **config}
        )
        assert status in (200, 201)

    def worker_env(self, endpoint: str, token: str, worker_id: str, **extra: str) -> dict[str, str]:
        """The environment a worker pod gets (see PROTOCOL.md)."""
        env = dict(
            **worker_webhook_env(self.url, endpoint),
            RUNPOD_POD_ID=worker_id,
            RUNPOD_AI_API_KEY=token,
            RUNPOD_PING_INTERVAL="1000",
            RUNPOD_SKIP_AUTO_SYSTEM_CHECKS="true",
            RUNPOD_LOG_LEVEL="WARN",
        )
        return subprocess_env(**{**env, **extra})


def fresh_venv(env_dir: Path, requirement: str, timeout: float = 900) -> str:
    """A new virtual environment with `requirement` pip-installed (not editable); its python."""
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = str(env_dir / "bin" / "python")
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", requirement],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=subprocess_env(),
    )
    assert install.returncode == 0, install.stderr[-3000:]
    return python


def start_worker(
    env: dict[str, str], module: str, pythonpath: list[str], log_path: Path
) -> subprocess.Popen:
    env = {
        **env,
        "HANDLER_MODULE": module,
        "PYTHONPATH": child_pythonpath(*pythonpath),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "handler_worker"],
        env=env,
        cwd=REPO_ROOT,
        stdout=open(log_path, "w"),
        stderr=subprocess.STDOUT,  # noqa: SIM115
        start_new_session=True,
    )


@dataclass
class RedisServer:
    """A test-owned redis-server on a free port, with AOF persistence in `workdir`."""

    workdir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    appendfsync: str = "always"
    extra_args: tuple[str, ...] = ()  # e.g. ("--replicaof", "127.0.0.1", "6379")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10) -> RedisServer:
        if shutil.which("redis-server") is None:
            raise RuntimeError(
                "redis-server is not installed (Debian package redis-server; .ci/run installs it)"
            )
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.workdir),
                "--appendonly",
                "yes",
                "--appendfsync",
                self.appendfsync,
                "--save",
                "",
                "--daemonize",
                "no",
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for_port(self.port, timeout, "redis-server")
        return self

    def kill(self) -> None:
        if self.process is not None:
            kill_group(self.process)


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `check()` until it holds; TimeoutError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def wait_for_port(port: int, timeout: float, what: str) -> None:
    def listening() -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return True
        return False

    wait_until(listening, timeout, f"{what} did not start")


@dataclass
class SentinelServer:
    """A test-owned Redis Sentinel (redis-server in sentinel mode) watching `service` at the
    primary on `primary_port`, quick to act: down after `down_after_ms`, quorum 2."""

    workdir: Path
    primary_port: int
    service: str = "primary"
    down_after_ms: int = 500
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    def start(self, timeout: float = 10) -> SentinelServer:
        config = self.workdir / f"sentinel-{self.port}.conf"
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.workdir}\n"
            f"sentinel monitor {self.service} 127.0.0.1 {self.primary_port} 2\n"
            f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.service} 5000\n"
            f"sentinel parallel-syncs {self.service} 1\n"
        )
        self.process = subprocess.Popen(
            ["redis-server", str(config), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for_port(self.port, timeout, "redis sentinel")
        return self

    def kill(self) -> None:
        if self.process is not None:
            kill_group(self.process)


def primary_and_replica(workdir: Path) -> tuple[RedisServer, RedisServer]:
    """A Redis primary and its replica (started, the replica still syncing)."""
    for name in ("primary", "replica"):
        (workdir / name).mkdir(exist_ok=True)
    primary = RedisServer(workdir / "primary", appendfsync="everysec").start()
    replica = RedisServer(
        workdir / "replica",
        appendfsync="everysec",
        extra_args=("--replicaof", "127.0.0.1", str(primary.port)),
    ).start()
    return primary, replica


@dataclass
class SentinelGroup:
    """A primary, its replica and three sentinels watching them as `service`; `start` returns
    once the replica is in sync and every sentinel knows the replica and the other two."""

    workdir: Path
    service: str = "primary"
    primary: RedisServer | None = None
    replica: RedisServer | None = None
    sentinels: list[SentinelServer] = field(default_factory=list)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    def current_primary_port(self) -> int:
        with redis.Redis(port=self.sentinels[0].port, decode_responses=True) as sentinel:
            return int(sentinel.sentinel_get_master_addr_by_name(self.service)[1])

    def start(self, timeout: float = 30) -> SentinelGroup:
        self.primary, self.replica = primary_and_replica(self.workdir)
        (self.workdir / "sentinels").mkdir(exist_ok=True)
        self.sentinels = [
            SentinelServer(self.workdir / "sentinels", self.primary.port, self.service).start()
            for _ in range(3)
        ]
        try:
            wait_until(self._ready, timeout, "the sentinels never found each other and the replica")
        except TimeoutError:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        with redis.Redis(port=self.replica.port, decode_responses=True) as replica:
            if replica.info("replication").get("master_link_status") != "up":
                return False
        for server in self.sentinels:
            with redis.Redis(port=server.port, decode_responses=True) as sentinel:
                watched = sentinel.sentinel_master(self.service)
                if (watched["num-other-sentinels"], watched["num-slaves"]) != (2, 1):
                    return False
        return True

    def stop(self) -> None:
        for server in [*self.sentinels, self.replica, self.primary]:
            if server is not None:
                server.kill()


_shared_redis: RedisServer | None = None


def shared_redis_url() -> str:
    """One redis-server per test process on a free port, started on first use and stopped at
    exit; tests keep apart by key prefix. Fails (never skips) when redis-server is missing."""
    global _shared_redis
    if _shared_redis is None:
        workdir = Path(tempfile.mkdtemp(prefix="test-redis-"))
        server = RedisServer(workdir, appendfsync="everysec").start()

        def stop() -> None:
            server.kill()
            shutil.rmtree(workdir, ignore_errors=True)

        atexit.register(stop)
        _shared_redis = server
    return _shared_redis.url


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc), grandchildren included."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] == "Z":  # a zombie is gone, only not reaped yet
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@dataclass
class DevProcess:
    """`handlerctl dev TARGET` in a subprocess, with its log (plain lines, no terminal)."""

    target: str
    workdir: Path
    args: tuple[str, ...] = ()
    port: int = field(default_factory=free_port)
    key: str = "dev-test-key"
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"dev-{self.port}.log"

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def start(self, timeout: float = 30) -> DevProcess:
        command = ["dev", self.target, "--port", str(self.port), "--key", self.key, *self.args]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "handlerctl.commands", *command],
            env=subprocess_env(COLUMNS="200"),
            cwd=REPO_ROOT,
            stdout=open(self.log_path, "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while "HANDLERCTL_API_KEY" not in self.log():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"handlerctl dev did not start: {self.log()}")
            time.sleep(0.05)
        return self

    def wait_log(self, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {text!r} in the dev log:\n{self.log()}")
            time.sleep(0.05)
        return self.log()

    def interrupt(self, timeout: float = 30) -> int:
        """Ctrl-C (SIGINT to the process), then wait for it to exit."""
        assert self.process is not None
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            stop_group(self.process)


def handlerctl(
    *args: str, timeout: float = 120, stdin: str | None = None, env: dict[str, str] | None = None
):
    """Run the CLI in a subprocess (`env`: extra variables); returns the CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-m", "handlerctl.commands", *args],
        env=subprocess_env(COLUMNS="200", **(env or {})),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,
    )
