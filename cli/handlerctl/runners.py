"""`handlerctl dev`: the gateway in-process on the memory backend, and worker processes scaled by
the operator's own policy (`compute_desired_replicas`), with reload on file change, crash-loop
backoff and a live table. Entry-point layer: it serves HTTP and runs processes."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import watchfiles
import yaml
from aiohttp import web
from pydantic import ValidationError

from handler_gateway.backends import open_backend
from handler_gateway.keys import Keys
from handler_gateway.operations import Gateway
from handler_gateway.routes import GATEWAY, authorize_admin, create_app, number_query
from handler_operator import builders
from handler_operator.conditions import CRASH_LOOP
from handler_operator.models import HandlerDeployment, describe_errors
from handler_operator.scaling import actions, observations, policies
from handler_operator.scaling.policies import PodView, ScalerState
from handler_operator.settings import OperatorSettings
from handler_protocol.ids import endpoint_name
from handler_protocol.models import EndpointConfig, HandlerProblem, QueueFigures, digest
from handlerctl import projects
from handlerctl.sources import read_sources

PASS_WAIT_S = 0.5  # the loop runs at least this often, at once when a job is queued
RELOAD_CHECK_S = 1.0
STOP_GRACE_S = 1.0  # only drained, idle workers are stopped (or on a second Ctrl-C)
BACKOFF_START_S, BACKOFF_MAX_S = 1.0, 60.0
HEALTHY_AFTER_S = 30.0  # a worker that ran this long resets the crash backoff
TAIL_LINES = 5  # each worker's last lines of output, kept for the table
CHECK_TIMEOUT_S = 120.0  # the handler's import check at start (big models import slowly)
KEPT_LOG_LINES = 10_000  # workers' lines `handlerctl logs` can still read
LOGS_WAIT_MAX_S = 30.0


class DevError(Exception):
    """The dev target cannot be run (no handler, bad YAML): a message for the user."""


@dataclass(frozen=True)
class DevTarget:
    """What `handlerctl dev` runs: a module, the directory on PYTHONPATH, the CR's settings."""

    hd: HandlerDeployment
    path: Path
    extra_paths: tuple[Path, ...] = ()

    @property
    def module(self) -> str:
        return self.hd.spec.handler.module


def resolve_target(
    target: str, manifest: str | None = None, extra_paths: tuple[str, ...] = ()
) -> DevTarget:
    """A directory (with handler.py or handlerdeployment.yaml), a .py file or a module name."""
    place = Path(target)
    body: dict[str, Any] | None = None
    manifest_path = Path(manifest) if manifest else None
    if manifest_path is None and place.is_dir() and (place / "handlerdeployment.yaml").is_file():
        manifest_path = place / "handlerdeployment.yaml"
    if manifest_path is not None:
        try:
            body = yaml.safe_load(manifest_path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise DevError(f"cannot read {manifest_path}: {exc}") from None
        if not isinstance(body, dict) or body.get("kind") != "HandlerDeployment":
            raise DevError(f"{manifest_path} is not a HandlerDeployment")
    if place.is_dir():
        path, name = place.resolve(), endpoint_name(place.resolve().name, "handler")
        module = "handler" if (place / "handler.py").is_file() else None
    elif place.suffix == ".py" and place.is_file():
        path, name, module = (
            place.resolve().parent,
            endpoint_name(place.stem, "handler"),
            place.stem,
        )
    elif re.fullmatch(r"[A-Za-z_][\w.]*", target):
        path, name, module = Path.cwd(), endpoint_name(target.rsplit(".", 1)[-1], "handler"), target
    else:
        raise DevError(f"{target}: not a directory, a .py file or a module name")
    if body is None:
        if module is None:
            raise DevError(f"{target}: no handler.py and no handlerdeployment.yaml in it")
        body = {"metadata": {"name": name}, "spec": {"handler": {"module": module}}}
    body = {**body, "metadata": {"namespace": "default", **(body.get("metadata") or {})}}
    try:
        hd = HandlerDeployment.model_validate(body)
    except ValidationError as exc:
        raise DevError(f"invalid HandlerDeployment: {describe_errors(exc)}") from None
    return DevTarget(hd=hd, path=path, extra_paths=tuple(Path(p).resolve() for p in extra_paths))


@dataclass
class RemoteProject:
    """An @remote project that `handlerctl dev` serves: scanned as `handlerctl build` scans it
    (AST, no import), one endpoint per resource config, its generated handler modules written
    to `out` (on the workers' PYTHONPATH, outside the watched tree)."""

    root: Path
    out: Path
    extra_paths: tuple[Path, ...] = ()
    namespace: str = "default"

    def refresh(self) -> list[DevTarget]:
        """Scan again and rewrite the handler modules: the endpoints as the sources say now."""
        result = projects.scan(read_sources(self.root, self.out))
        if result.errors:
            raise DevError("; ".join(str(problem) for problem in result.errors[:5]))
        if not result.targets:
            raise DevError(
                f"{self.root}: no handler.py, no handlerdeployment.yaml and no @remote "
                "functions or classes in it"
            )
        try:
            files = projects.build_outputs(result, namespace=self.namespace)
        except ValueError as exc:
            raise DevError(
                f"the @remote settings make an invalid HandlerDeployment: {exc}"
            ) from None
        targets = []
        for relative, text in sorted(files.items()):
            if relative.startswith(projects.PACKAGE + "/"):
                (self.out / relative).parent.mkdir(parents=True, exist_ok=True)
                (self.out / relative).write_text(text)
            elif relative.startswith("deploy/"):
                hd = HandlerDeployment.model_validate(yaml.safe_load(text))
                targets.append(DevTarget(hd, self.root, (self.out, *self.extra_paths)))
        return targets


def resolve_targets(
    target: str, manifest: str | None = None, extra_paths: tuple[str, ...] = ()
) -> tuple[list[DevTarget], RemoteProject | None]:
    """What `handlerctl dev TARGET` serves: one endpoint (a handler directory, .py file or
    module), or every endpoint of an @remote project (a directory without handler.py and
    handlerdeployment.yaml), with the project to scan again on change."""
    place = Path(target)
    plain = (place / "handler.py").is_file() or (place / "handlerdeployment.yaml").is_file()
    if not place.is_dir() or plain or manifest:
        return [resolve_target(target, manifest, extra_paths)], None
    project = RemoteProject(
        place.resolve(),
        Path(tempfile.mkdtemp(prefix="handlerctl-dev-build-")),
        tuple(Path(p).resolve() for p in extra_paths),
    )
    try:
        return project.refresh(), project
    except DevError:
        shutil.rmtree(project.out, ignore_errors=True)
        raise


def drain_progress(busy_workers: int, queued: int) -> str:
    """What a draining handlerctl dev says: who it waits for, and what it leaves behind."""
    waiting = (
        f"waiting for {busy_workers} busy worker(s) (Ctrl-C again to stop now)"
        if busy_workers
        else "no job running"
    )
    if not queued:
        return f"draining: {waiting}"
    return (
        f"draining: {waiting}; {queued} queued job(s) will not run: they go with this "
        "gateway's memory"
    )


class SourceFilter(watchfiles.PythonFilter):
    """Python sources under the `roots`, not in hidden directories (.venv, .git) or caches."""

    def __init__(self, *roots: Path):
        super().__init__()
        self.roots = roots

    def __call__(self, change: watchfiles.Change, path: str) -> bool:
        for root in self.roots:
            with contextlib.suppress(ValueError):
                parts = Path(path).relative_to(root).parts
                if any(part.startswith(".") or part == "__pycache__" for part in parts):
                    return False
        return super().__call__(change, path)


@dataclass
class Worker:
    """One worker process (a pod, locally)."""

    name: str
    process: subprocess.Popen
    started: float
    generation: int
    log: Path
    termination: Path
    stopping: bool = False
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    reader: threading.Thread | None = None

    def crash_message(self) -> str:
        """The loader's message (termination log), else the last line the worker printed."""
        with contextlib.suppress(OSError):
            lines = [ln for ln in self.termination.read_text(errors="replace").splitlines()]
            lines = [ln.strip() for ln in lines if ln.strip()]
            if len(lines) > 1:
                return f"{lines[0]} ... {lines[-1]}"[:400]
            if lines:
                return lines[0][:400]
        if self.reader is not None:
            self.reader.join(timeout=1.0)  # its last lines
        lines = [ln.strip() for ln in self.tail if ln.strip()]
        return lines[-1][:400] if lines else ""


@dataclass
class Snapshot:
    """What the live table shows."""

    endpoint: str
    url: str
    api_key: str
    figures: dict[str, Any] = field(default_factory=dict)
    health: dict[str, Any] = field(default_factory=dict)
    # (name, state, pid, seconds up, jobs held, last line printed) per worker process
    worker_rows: list[tuple[str, str, int, float, int, str]] = field(default_factory=list)
    replicas: int = 0
    decision: str = ""
    crash: str = ""
    crash_retry_in: float | None = None
    log_dir: str = ""


class DevRunner:
    """Runs a project's endpoints locally until `stop()` (Ctrl-C): one in-process gateway, an
    `EndpointRunner` per endpoint; then drains every worker and exits."""

    def __init__(
        self,
        targets: DevTarget | list[DevTarget],
        host: str = "127.0.0.1",
        port: int = 8080,
        api_key: str | None = None,
        python: str = sys.executable,
        on_change: Callable[[list[Snapshot], list[str]], None] | None = None,
        clock: Callable[[], float] = time.time,
        on_output: Callable[[str, str], None] | None = None,
        project: RemoteProject | None = None,
    ):
        self.targets = targets if isinstance(targets, list) else [targets]
        self.project = project  # an @remote project: scanned again when its sources change
        self.host, self.port = host, port
        self.api_key = api_key or "dev-" + secrets.token_urlsafe(18)
        self.python = python
        self.on_change = on_change or (lambda snapshots, events: None)
        # Every line a worker prints (its handler's too), as (worker, line), from its reader
        # thread: handlerctl shows them prefixed, as docker compose does.
        self.on_output = on_output or (lambda worker, line: None)
        # Every worker's lines, numbered, for `handlerctl logs` (GET /dev/v1/.../logs).
        self.lines: deque[tuple[int, str, str, str]] = deque(maxlen=KEPT_LOG_LINES)
        self._line_numbers = itertools.count(1)
        self._new_lines: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.clock = clock
        self.log_dir = Path(tempfile.mkdtemp(prefix="handlerctl-dev-"))
        self._stopping = asyncio.Event()
        self._changed: set[Path] = set()  # sources changed since the last pass
        self._watcher: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self.gateway: Gateway | None = None
        self.endpoints: dict[str, EndpointRunner] = {}
        for target in self.targets:
            self.endpoints[target.hd.endpoint_id] = EndpointRunner(self, target)
        self.force = False  # a second Ctrl-C: stop workers without waiting for their jobs
        self.ready = False  # the gateway serves and every endpoint is registered

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def snapshots(self) -> list[Snapshot]:
        return [runner.snapshot for runner in self.endpoints.values()]

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        keys = Keys.of([self.api_key], [self.api_key])
        app = create_app(open_backend("memory://"), keys)
        app.router.add_get("/dev/v1/endpoints/{endpoint}/logs", self._serve_logs)
        self.gateway = app[GATEWAY]
        self._loop = asyncio.get_running_loop()
        self._new_lines = asyncio.Event()
        # Open long-polls of stopped workers must not hold the exit (aiohttp waits 60 s by default).
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=1.0
        )
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.host, self.port).start()
        except OSError as exc:
            await self._runner.cleanup()
            raise DevError(f"cannot listen on {self.host}:{self.port}: {exc.strerror}") from None
        for runner in self.endpoints.values():
            await runner.register()
        self._watcher = asyncio.ensure_future(self._watch_sources())
        problems = await asyncio.gather(*(r.check_handler() for r in self.endpoints.values()))
        self.ready = True
        for runner, problem in zip(self.endpoints.values(), problems, strict=True):
            if problem:
                runner.handler_fails(problem)

    def record_line(self, worker: str, endpoint: str, line: str) -> None:
        """A worker's line (from its reader thread): kept for `handlerctl logs`, shown."""
        self.lines.append((next(self._line_numbers), worker, endpoint, line))
        if self._loop is not None and self._new_lines is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody follows
                self._loop.call_soon_threadsafe(self._new_lines.set)
        with contextlib.suppress(Exception):  # a display problem must not stop reading
            self.on_output(worker, line)

    def logs_after(
        self, after: int, endpoint: str, worker: str | None
    ) -> list[tuple[int, str, str]]:
        return [
            (seq, name, line)
            for seq, name, of, line in list(self.lines)
            if seq > after and of == endpoint and worker in (None, name)
        ]

    async def _serve_logs(self, request: web.Request) -> web.Response:
        """`handlerctl logs`: the workers' lines after `after` (their numbers), of `worker` or
        all, held up to `wait` s until there is one. The dev key (admin) only."""
        await authorize_admin(request)
        endpoint = request.match_info["endpoint"]
        if endpoint not in self.endpoints:
            raise web.HTTPNotFound(
                text=f"handlerctl dev serves {', '.join(sorted(self.endpoints))}, not {endpoint}"
            )
        after = number_query(request, "after", 0, 0, 2**62, int)
        wait = number_query(request, "wait", 0.0, 0, LOGS_WAIT_MAX_S)
        worker = request.query.get("worker") or None
        found = self.logs_after(after, endpoint, worker)
        deadline = time.monotonic() + wait
        while not found and time.monotonic() < deadline and self._new_lines is not None:
            self._new_lines.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new_lines.wait(), deadline - time.monotonic())
            found = self.logs_after(after, endpoint, worker)
        lines = [{"seq": seq, "worker": name, "line": line} for seq, name, line in found]
        return web.json_response({"lines": lines, "next": found[-1][0] if found else after})

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Scale until stopped, then drain and stop every worker and the gateway."""
        await self.start()
        since: float | None = None
        last_reload_check = 0.0
        try:
            while not self._stopping.is_set():
                figures_by_endpoint = await self._poll(since)
                since = self.clock()
                now = self.clock()
                events: list[str] = []
                if now - last_reload_check >= RELOAD_CHECK_S:
                    last_reload_check = now
                    events += await self._check_reload()
                for endpoint, runner in self.endpoints.items():
                    figures = figures_by_endpoint.get(endpoint)
                    if figures is not None:
                        events += await runner.scale(figures, now)
                        await runner.refresh(figures, now)
                self.on_change(self.snapshots, events)
        finally:
            await self.shutdown()

    async def _poll(self, since: float | None) -> dict[str, QueueFigures]:
        assert self.gateway is not None
        poll = asyncio.ensure_future(self.gateway.queues_after(since, PASS_WAIT_S))
        stop = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({poll, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not poll.done():
            poll.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poll
            return {}
        return poll.result()

    async def shutdown(self) -> None:
        """Drain: no new jobs; wait for running ones (up to the longest execution timeout, or
        until a second Ctrl-C), then stop the workers and the gateway."""
        assert self.gateway is not None
        runners = list(self.endpoints.values())
        deadline = self.clock() + max(
            r.target.hd.spec.jobs.executionTimeoutSeconds for r in runners
        )
        for runner in runners:
            await runner.drain_all()
        said: tuple[int, int] | None = None
        while self.clock() < deadline and not self.force:
            figures = await self.gateway.queues(list(self.endpoints))
            busy = queued = 0
            for endpoint, runner in self.endpoints.items():
                found = figures.get(endpoint)
                if found is not None:
                    busy += runner.busy(found)
                    queued += found.inQueue
                    await runner.refresh(found, self.clock())
            if (busy, queued) != said:  # the table moves on, and each change is said
                said = (busy, queued)
                self.on_change(self.snapshots, [drain_progress(busy, queued)])
            if not busy:
                break
            await asyncio.sleep(0.2)
        await asyncio.gather(*(runner.stop_all() for runner in runners))
        shutil.rmtree(self.log_dir, ignore_errors=True)  # every line was shown as it came
        if self.project is not None:
            shutil.rmtree(self.project.out, ignore_errors=True)
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()

    # -- reload -----------------------------------------------------------------------------
    async def _watch_sources(self) -> None:
        """Changed .py files under the targets' directories, from the OS's file events
        (watchfiles: no scan of the tree, so a venv inside costs nothing), gathered for the
        next pass."""
        roots = sorted({runner.target.path for runner in self.endpoints.values()})
        async for changes in watchfiles.awatch(
            *roots,
            watch_filter=SourceFilter(*roots),
            stop_event=self._stopping,
            debounce=200,
            rust_timeout=1000,
        ):
            self._changed.update(Path(path) for _, path in changes)

    async def _check_reload(self) -> list[str]:
        """Endpoints whose sources changed restart their workers; an @remote project is
        scanned again first (its handler modules rewritten, new endpoints served)."""
        if not self._changed:
            return []
        changed, self._changed = self._changed, set()
        events: list[str] = []
        if self.project is not None:
            try:
                targets = self.project.refresh()
            except DevError as exc:
                return [f"reload: not reloaded, {exc}"]
            for target in targets:
                if target.hd.endpoint_id not in self.endpoints:
                    runner = EndpointRunner(self, target)
                    self.endpoints[target.hd.endpoint_id] = runner
                    await runner.register()
                    events.append(
                        f"new endpoint {runner.endpoint} on {self.url}/v2/{runner.endpoint}"
                    )
        for runner in self.endpoints.values():
            mine = sorted(
                str(path.relative_to(runner.target.path))
                for path in changed
                if path.is_relative_to(runner.target.path)
            )
            if mine:
                events += runner.reload(mine)
        return events


class EndpointRunner:
    """One endpoint of `handlerctl dev`: its worker processes (pods, locally) scaled by the
    operator's policy, crash-loop backoff, reload, and the table's view of it."""

    def __init__(self, dev: DevRunner, target: DevTarget):
        self.dev = dev
        self.target = target
        self.endpoint = target.hd.endpoint_id
        self.token = secrets.token_urlsafe(24)
        self.workers: dict[str, Worker] = {}
        self.replicas = 0
        self.state = ScalerState()
        self.generation = 0
        self.counter = 0
        self.crashes = 0
        self.backoff_until = 0.0
        self.last_crash = ""
        self.told = ""  # the crash the gateway tells waiting clients of ("" none)
        self.snapshot = Snapshot(self.endpoint, dev.url, dev.api_key, log_dir=str(dev.log_dir))
        self._stop_tasks: set[asyncio.Task] = set()

    @property
    def gateway(self) -> Gateway:
        assert self.dev.gateway is not None
        return self.dev.gateway

    async def register(self) -> None:
        # The dev key is scoped to the endpoint too: one that runs callers' code (the generic
        # handler) takes no gateway-wide key.
        dev_key = [{"id": "dev", "sha256": digest(self.dev.api_key)}]
        registration = builders.build_endpoint_registration(self.target.hd, self.token, dev_key)
        await self.gateway.put_endpoint(EndpointConfig(id=self.endpoint, **registration))

    async def check_handler(self) -> str | None:
        """Import the handler as a worker would (`python -m handler_worker --check`), before any
        job waits on it: the loader's message (file, line, error), or None when it loads."""
        termination = self.dev.log_dir / f"{self.target.hd.name}-check.termination"
        process = await asyncio.create_subprocess_exec(
            self.dev.python, "-m", "handler_worker", "--check",
            env=self.worker_env("check", termination),
            cwd=self.target.path,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            output, _ = await asyncio.wait_for(process.communicate(), CHECK_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            return f"importing the handler took over {CHECK_TIMEOUT_S:.0f} s"
        if process.returncode == 0:
            return None
        with contextlib.suppress(OSError):
            message = termination.read_text(errors="replace").strip()
            if message:
                return message
        return output.decode(errors="replace").strip()[-2000:]

    def handler_fails(self, problem: str) -> None:
        """Say at once that the handler does not load (the check's message)."""
        self.last_crash = self.snapshot.crash = problem.splitlines()[-1]
        self.dev.on_change(
            self.dev.snapshots,
            [f"{self.endpoint}: the handler does not load (fix it: workers reload):\n{problem}"],
        )

    async def tell(self, crash: str) -> None:
        """The gateway tells clients waiting on this endpoint's queued jobs why they wait, as
        the operator has it do for crash-looping pods ("": the workers run again)."""
        if crash == self.told:
            return
        problem = HandlerProblem(reason=CRASH_LOOP, message=crash[:2000]) if crash else None
        await self.gateway.set_problem(self.endpoint, problem)
        self.told = crash

    # -- scaling ----------------------------------------------------------------------------
    def _current(self) -> list[Worker]:
        return [
            w for w in self.workers.values() if w.generation == self.generation and not w.stopping
        ]

    async def scale(self, figures: QueueFigures, now: float) -> list[str]:
        """One policy decision for the endpoint, acted on with processes. Returns events."""
        events = self._reap(now)
        if self.last_crash:
            await self.tell(self.last_crash)
        live = set(figures.workerStates)
        current = self._current()
        obs = observations.observe(
            figures.model_dump(),
            self.replicas,
            tuple(
                PodView(w.name, "ready" if w.name in live else "starting", created=w.started)
                for w in current
            ),
        )
        decision = policies.compute_desired_replicas(
            obs, self.target.hd.spec.scaling, self.state, now
        )
        ready_to_go = await actions.drain_workers(self.gateway, self.endpoint, decision)
        for name in ready_to_go:
            if name in self.workers:
                self._stop_in_background(self.workers[name])
        decision = policies.carried_out(decision, self.replicas, ready_to_go)
        self.state = decision.state
        replicas = decision.replicas
        if replicas != self.replicas or ready_to_go:
            events.append(
                f"workers {self.replicas} -> {replicas} ({decision.reason}: {decision.message})"
            )
            self.snapshot.decision = f"{decision.reason}: {decision.message}"
        elif not self.snapshot.decision:
            self.snapshot.decision = f"{decision.reason}: {decision.message}"
        self.replicas = replicas
        missing = replicas - len(self._current())
        if missing > 0 and now >= self.backoff_until:
            for _ in range(missing):
                self._spawn(now)
        await self._retire_old_generation(figures)
        return events

    def _reap(self, now: float) -> list[str]:
        """Notice workers that exited on their own: a crash, with backoff before the next start."""
        events = []
        for worker in list(self.workers.values()):
            code = worker.process.poll()
            if code is None or worker.stopping:
                continue
            self.workers.pop(worker.name)
            if worker.generation != self.generation:
                continue  # started before a reload: its code is gone, its exit says nothing
            ran = now - worker.started
            self.crashes = 1 if ran >= HEALTHY_AFTER_S else self.crashes + 1
            delay = min(BACKOFF_MAX_S, BACKOFF_START_S * 2 ** (self.crashes - 1))
            self.backoff_until = now + delay
            self.last_crash = f"{worker.name} exited with code {code}: {worker.crash_message()}"
            events.append(f"crash: {self.last_crash}; next start in {delay:.0f} s")
        return events

    def _spawn(self, now: float) -> Worker:
        self.counter += 1
        name = f"{self.target.hd.name}-{self.counter}"
        log = self.dev.log_dir / f"{name}.log"
        termination = self.dev.log_dir / f"{name}.termination"
        process = subprocess.Popen(
            [self.dev.python, "-m", "handler_worker"],
            env=self.worker_env(name, termination),
            cwd=self.target.path,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        worker = Worker(name, process, now, self.generation, log, termination)
        worker.reader = threading.Thread(
            target=self._read_output, args=(worker,), name=f"output-{name}", daemon=True
        )
        worker.reader.start()
        self.workers[name] = worker
        return worker

    def _read_output(self, worker: Worker) -> None:
        """A worker's output, line by line until it exits: to its log file, its tail (the
        table's last line) and `on_output`."""
        assert worker.process.stdout is not None
        with worker.process.stdout as stream, open(worker.log, "wb") as log:
            for raw in stream:
                log.write(raw)
                log.flush()
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                worker.tail.append(line)
                self.dev.record_line(worker.name, self.endpoint, line)

    def worker_env(self, name: str, termination: Path) -> dict[str, str]:
        """The env a pod of this HandlerDeployment gets, with the downward API filled in."""
        settings = OperatorSettings(gateway_url=self.dev.url)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "HANDLER_"))}
        for var in builders.runtime_env(self.target.hd, settings):
            if var["name"] == "RUNPOD_POD_ID":
                env[var["name"]] = name
            elif var["name"] == "RUNPOD_AI_API_KEY":
                env[var["name"]] = self.token
            elif var["name"] == "HANDLER_REMOTE_API_KEY":  # registered with every endpoint
                env[var["name"]] = self.dev.api_key
            else:
                env[var["name"]] = var["value"]
        for var in self.target.hd.spec.env:  # user env: plain values (no Secrets locally)
            if var.get("name") and var.get("value") is not None:
                env[var["name"]] = str(var["value"])
        paths = [str(self.target.path), *map(str, self.target.extra_paths)]
        paths.append(env.get("PYTHONPATH", ""))
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        env["HANDLER_TERMINATION_LOG"] = str(termination)
        env["HANDLER_PARENT_PID"] = str(os.getpid())  # the worker ends when handlerctl does
        for name in ("RUNPOD_LOG_LEVEL", "RUNPOD_DEBUG_LEVEL"):  # the SDK's DEBUG lines: on ask
            env[name] = os.environ.get(name, "INFO")
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _stop_in_background(self, worker: Worker) -> None:
        worker.stopping = True
        task = asyncio.ensure_future(self._stop_worker(worker))
        self._stop_tasks.add(task)
        task.add_done_callback(self._stop_tasks.discard)

    async def _stop_worker(self, worker: Worker) -> None:
        """SIGTERM the worker's process group, SIGKILL what is left after the grace period."""
        worker.stopping = True
        process = worker.process
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        while process.poll() is None:
            await asyncio.sleep(0.05)
        self.workers.pop(worker.name, None)

    # -- reload -----------------------------------------------------------------------------
    def reload(self, changed: list[str]) -> list[str]:
        """Sources of this endpoint changed: a new generation of workers (busy ones finish)."""
        self.generation += 1
        self.crashes, self.backoff_until, self.last_crash = 0, 0.0, ""
        return [
            f"reload {self.endpoint}: {', '.join(changed)} changed; restarting workers "
            "(busy ones finish first)"
        ]

    async def _retire_old_generation(self, figures: QueueFigures) -> None:
        """Workers started before a reload: idle ones stop now, busy ones drain and stop later."""
        for worker in list(self.workers.values()):
            if worker.generation == self.generation or worker.stopping:
                continue
            if figures.workerJobs.get(worker.name, 0) == 0:
                self._stop_in_background(worker)
            elif figures.workerStates.get(worker.name) != "draining":
                await self.gateway.drain(self.endpoint, worker.name, True)

    # -- what the table shows ---------------------------------------------------------------
    def _state(self, worker: Worker, figures: QueueFigures) -> str:
        if worker.stopping:
            return "stopping"
        if worker.generation != self.generation:
            return "reloading"
        gateway_state = figures.workerStates.get(worker.name)
        return "busy" if gateway_state == "running" else gateway_state or "starting"

    async def refresh(self, figures: QueueFigures, now: float) -> None:
        if self.told and any(
            w.generation == self.generation and w.name in figures.workerStates
            for w in self.workers.values()
        ):
            await self.tell("")  # a worker of the current code takes jobs
        health = await self.gateway.health(self.endpoint)
        self.snapshot.figures = figures.model_dump()
        self.snapshot.health = health.model_dump()
        self.snapshot.worker_rows = [
            (
                w.name,
                self._state(w, figures),
                w.process.pid,
                now - w.started,
                figures.workerJobs.get(w.name, 0),
                w.tail[-1] if w.tail else "",
            )
            for w in self.workers.values()
        ]
        self.snapshot.replicas = self.replicas
        self.snapshot.crash = self.last_crash
        self.snapshot.crash_retry_in = (
            max(0.0, self.backoff_until - now) if self.backoff_until > now else None
        )

    # -- stopping ---------------------------------------------------------------------------
    async def drain_all(self) -> None:
        """No new job for any worker (the drain at exit)."""
        for worker in self.workers.values():
            with contextlib.suppress(Exception):
                await self.gateway.drain(self.endpoint, worker.name, True)

    def busy(self, figures: QueueFigures) -> int:
        """Workers still running a job (and alive)."""
        return sum(
            1
            for w, n in (figures.workerJobs or {}).items()
            if n and w in self.workers and self.workers[w].process.poll() is None
        )

    async def stop_all(self) -> None:
        stopping = list(self.workers.values())
        await asyncio.gather(*(self._stop_worker(w) for w in stopping))
        await asyncio.gather(*self._stop_tasks, return_exceptions=True)
        self.workers.clear()
        for worker in stopping:
            if worker.reader is not None:
                worker.reader.join(timeout=2.0)  # its last lines are shown
