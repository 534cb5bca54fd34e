"""`handlerctl`: the local dev loop, job commands against any gateway, render/crd, and build.

Thin typer glue over `runners.DevRunner`, `handler_protocol.clients.JobClient`, the operator's
pure builders and `projects`.
Exit codes: 0 ok, 1 a job failed (or timed out / was cancelled), 2 bad input, 3 gateway error,
4 image build failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from enum import StrEnum
from importlib import metadata
from pathlib import Path
from typing import Any

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from handler_operator import builders, crds, images
from handler_operator.conditions import timestamp
from handler_operator.models import GROUP, HandlerDeployment, describe_errors
from handler_operator.settings import OperatorSettings
from handler_protocol.clients import JobClient, Refused, Unavailable
from handler_protocol.ids import namespace_of
from handler_protocol.statuses import TERMINAL

EXIT_JOB_FAILED, EXIT_BAD_INPUT, EXIT_GATEWAY, EXIT_BUILD = 1, 2, 3, 4
# What `handlerctl dev` imports beyond the cli extra: the gateway's and the worker's.
DEV_NEEDS = ("redis", "prometheus_client", "runpod", "cloudpickle")
REQUEST_KEYS = {"input", "webhook", "policy", "s3Config"}
DEFAULT_URL = "http://127.0.0.1:8080"
CONFIG_ENV, URL_ENV, KEY_ENV = "HANDLERCTL_CONFIG", "HANDLERCTL_URL", "HANDLERCTL_API_KEY"

app = typer.Typer(
    help="Run handlers locally (`dev`), submit and manage jobs on any gateway, render manifests.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)
dlq_app = typer.Typer(help="The dead-letter queue of an endpoint.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")
out = Console()
err = Console(stderr=True)


class Output(StrEnum):
    json = "json"
    table = "table"


class Settings:
    """Where the gateway is and how to print: flags, then env, then the config file."""

    def __init__(self, url: str | None, api_key: str | None, output: Output, config: Path | None):
        file_values = self._read_config(config)
        self.url = url or os.environ.get(URL_ENV) or file_values.get("url") or DEFAULT_URL
        self.api_key = api_key or os.environ.get(KEY_ENV) or file_values.get("api_key") or ""
        self.output = output

    @staticmethod
    def _read_config(config: Path | None) -> dict[str, Any]:
        path = config or Path(
            os.environ.get(CONFIG_ENV) or Path.home() / ".config" / "handlerctl" / "config.toml"
        )
        if not path.is_file():
            if config is not None:
                fail(f"config file {config} not found", EXIT_BAD_INPUT)
            return {}
        try:
            return tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            fail(f"config file {path}: {exc}", EXIT_BAD_INPUT)

    def client(self) -> JobClient:
        return JobClient(self.url, self.api_key)


def fail(message: str, code: int) -> typer.Exit:
    # Escaped: messages carry brackets (extras, JSON, list reprs) that are not markup.
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def settings_of(ctx: typer.Context) -> Settings:
    return ctx.obj


def _print_version(value: bool) -> None:
    if value:
        out.print(f"handlerctl {metadata.version('handler-operator')}", highlight=False)
        raise typer.Exit(0)


# The global options (each takes a value), read by Click only before the command: given after
# it, they are moved there (`hoist_global_options`).
GLOBAL_OPTIONS = ("--url", "--api-key", "--output", "-o", "--config")


def hoist_global_options(argv: list[str]) -> list[str]:
    """`argv` with the global options given after the command moved before it (up to `--`)."""
    # The command is the first word that is no option and no global option's value.
    command = 0
    while command < len(argv) and argv[command].startswith("-"):
        command += 2 if argv[command] in GLOBAL_OPTIONS else 1
    before, after, rest = list(argv[:command]), [], argv[command:]
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg == "--":
            after.extend(rest[i:])
            break
        name = arg.split("=", 1)[0]
        if name in GLOBAL_OPTIONS and i > 0:
            takes = 1 if "=" in arg else 2
            before.extend(rest[i : i + takes])
            i += takes
            continue
        after.append(arg)
        i += 1
    return before + after


@app.callback()
def main_options(
    ctx: typer.Context,
    url: str = typer.Option(
        None, "--url", help=f"gateway URL [env {URL_ENV}; default {DEFAULT_URL}]"
    ),
    api_key: str = typer.Option(None, "--api-key", help=f"API key [env {KEY_ENV}]"),
    output: Output = typer.Option(Output.json, "--output", "-o", help="json or table"),
    config: Path = typer.Option(
        None, "--config", help=f"TOML file with url / api_key [env {CONFIG_ENV}]"
    ),
    version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_print_version, help="print the version"
    ),
) -> None:
    """Global options go before or after the command (`handlerctl run ... -o table`)."""
    ctx.obj = Settings(url, api_key, output, config)


def call(coroutine_factory) -> Any:
    """Run one client call; gateway errors become a message and exit code 3."""

    async def run() -> Any:
        try:
            return await coroutine_factory()
        except Refused as exc:
            fail(f"gateway said {exc.status}: {exc}", EXIT_GATEWAY)
        except Unavailable as exc:
            fail(str(exc), EXIT_GATEWAY)

    return asyncio.run(run())


def emit(settings: Settings, value: Any, columns: list[str] | None = None) -> None:
    """Print `value` as JSON, or as a table of `columns` (rows: a list of dicts or one dict)."""
    if settings.output == Output.json:
        print(json.dumps(value, default=str), flush=True)
        return
    rows = value if isinstance(value, list) else [value]
    columns = columns or sorted({key for row in rows for key in row})
    table = Table(*columns)
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    out.print(table)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


# -- dev ---------------------------------------------------------------------------------------
def dev_view(snapshots: list[Any]) -> Group:
    """The live table of `handlerctl dev`: the gateway's URL and key, then each endpoint."""
    first = snapshots[0]
    header = (
        f"gateway  {first.url}   API key  {first.api_key}\n"
        + "\n".join(f"endpoint [bold]{s.endpoint}[/]   {s.url}/v2/{s.endpoint}" for s in snapshots)
        + "\nworker output below, prefixed with the worker's name"
    )
    parts: list[Any] = [Panel(header, title="handlerctl dev")]
    for snapshot in snapshots:
        parts += endpoint_view(snapshot, titled=len(snapshots) > 1)
    return Group(*parts)


def endpoint_view(snapshot: Any, titled: bool) -> list[Any]:
    """One endpoint's rows of the live table: queue and jobs, workers, decision, crash."""
    figures, health = snapshot.figures or {}, snapshot.health or {}
    jobs = health.get("jobs", {})
    counts: dict[str, int] = {}
    for _, state, *_ in snapshot.worker_rows:
        counts[state] = counts.get(state, 0) + 1
    summary = Table(
        "queue",
        "in progress",
        "workers",
        "completed",
        "failed",
        "retried",
        title=snapshot.endpoint if titled else None,
        title_justify="left",
    )
    summary.add_row(
        str(figures.get("inQueue", 0)),
        str(figures.get("inProgress", 0)),
        f"{len(snapshot.worker_rows)} / {snapshot.replicas} wanted  "
        + " ".join(f"{state}:{n}" for state, n in sorted(counts.items())),
        str(jobs.get("completed", 0)),
        str(jobs.get("failed", 0)),
        str(jobs.get("retried", 0)),
    )
    parts: list[Any] = [summary]
    if snapshot.worker_rows:
        workers = Table("worker", "state", "pid", "up", "jobs", "last output", box=None)
        for name, state, pid, age, held, last in snapshot.worker_rows:
            workers.add_row(name, state, str(pid), f"{age:.0f} s", str(held), last[-60:])
        parts.append(workers)
    parts.append(f"last decision: {snapshot.decision or '-'}")
    if snapshot.crash:
        retry = snapshot.crash_retry_in
        when = f" (next start in {retry:.0f} s)" if retry else ""
        parts.append(f"[bold red]worker crashed{when}:[/] {escape(snapshot.crash)}")
    return parts


@app.command()
def dev(
    target: str = typer.Argument(
        ...,
        help="directory with handler.py / handlerdeployment.yaml, a .py file, a module, or an "
        "@remote project (every endpoint its functions and classes name)",
    ),
    port: int = typer.Option(8080, help="gateway port"),
    host: str = typer.Option("127.0.0.1", help="gateway address"),
    api_key: str = typer.Option(None, "--key", help="the API key to accept (default: random)"),
    file: Path = typer.Option(None, "--file", "-f", help="HandlerDeployment YAML (scaling, jobs)"),
    path: list[Path] = typer.Option(
        None, "--path", "-p", help="extra PYTHONPATH entry of the workers (repeatable)"
    ),
) -> None:
    """Run TARGET locally: an in-process gateway (memory queue) and worker processes scaled by
    the operator's policy, from zero, for each endpoint TARGET has. Ctrl-C drains and exits."""
    missing = [name for name in DEV_NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        fail(
            f"handlerctl dev runs a gateway and workers here; not installed: "
            f"{', '.join(missing)}. pip install 'handler-operator[cli,gateway,worker]'",
            EXIT_BAD_INPUT,
        )
    from handlerctl.runners import DevError, DevRunner, resolve_targets

    try:
        extra = tuple(str(p) for p in path or ())
        resolved, project = resolve_targets(target, str(file) if file else None, extra)
    except DevError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    interactive = out.is_terminal
    live = Live(console=out, refresh_per_second=4, transient=False) if interactive else None

    def on_change(snapshots: list[Any], events: list[str]) -> None:
        if live is not None:
            live.update(dev_view(snapshots))
        for event in events:
            (live.console if live else out).print(
                f"{time.strftime('%H:%M:%S')} {event}", highlight=False, soft_wrap=True
            )

    printer = live.console if live else out

    def on_output(worker: str, line: str) -> None:
        """A worker's line, prefixed with its name (from its reader thread; rich's console
        prints above the live table and is safe across threads)."""
        printer.print(f"[dim]{worker} |[/] {escape(line)}", highlight=False, soft_wrap=True)

    runner = DevRunner(
        resolved,
        host=host,
        port=port,
        api_key=api_key,
        on_change=on_change,
        on_output=on_output,
        project=project,
    )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        presses = 0

        def interrupt() -> None:
            nonlocal presses
            presses += 1
            if presses == 1:
                out.print("stopping: no new job starts; running ones finish first")
                runner.stop()
            else:
                runner.force = True

        # A closed terminal (SIGHUP) drains as Ctrl-C does; were handlerctl killed outright,
        # its workers end by themselves (handler_worker.parents).
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, interrupt)
        run = asyncio.ensure_future(runner.run())
        while not runner.ready and not run.done():
            await asyncio.sleep(0.05)
        if not run.done():
            served = "".join(f"endpoint {e} on {runner.url}/v2/{e}\n" for e in runner.endpoints)
            out.print(
                f"{served}export {URL_ENV}={runner.url} {KEY_ENV}={runner.api_key}",
                highlight=False,
                soft_wrap=True,
            )
        await run

    try:
        if live is not None:
            with live:
                asyncio.run(main())
        else:
            asyncio.run(main())
    except DevError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    out.print("stopped: no worker left running")


# -- jobs --------------------------------------------------------------------------------------
def as_request(value: Any) -> dict[str, Any]:
    """A run request: `{"input": ...}` as is (RunPod's test_input.json shape), else the input."""
    if isinstance(value, dict) and "input" in value and set(value) <= REQUEST_KEYS:
        return value
    return {"input": value}


def read_requests(
    input_json: str | None, input_file: Path | None, inputs_jsonl: Path | None
) -> list[dict[str, Any]]:
    given = [x for x in (input_json, input_file, inputs_jsonl) if x is not None]
    if len(given) != 1:
        fail("give exactly one of --input, --input-file or --inputs-jsonl", EXIT_BAD_INPUT)
    try:
        if input_json is not None:
            return [as_request(json.loads(input_json))]
        if input_file is not None:
            return [as_request(json.loads(input_file.read_text()))]
        requests = []
        for number, line in enumerate(inputs_jsonl.read_text().splitlines(), 1):
            if line.strip():
                try:
                    requests.append(as_request(json.loads(line)))
                except json.JSONDecodeError as exc:
                    fail(f"{inputs_jsonl}:{number}: not JSON: {exc.msg}", EXIT_BAD_INPUT)
        if not requests:
            fail(f"{inputs_jsonl} holds no jobs", EXIT_BAD_INPUT)
        return requests
    except OSError as exc:
        fail(f"{exc.filename}: {exc.strerror}", EXIT_BAD_INPUT)
    except json.JSONDecodeError as exc:
        fail(
            f"--input is not JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
            EXIT_BAD_INPUT,
        )


async def wait_terminal(client: JobClient, endpoint: str, job: dict, deadline: float | None):
    delay = 0.05
    while job.get("status") not in TERMINAL:
        say_problem(endpoint, job)
        if deadline is not None and time.monotonic() > deadline:
            return job
        await asyncio.sleep(delay)
        delay = min(1.0, delay * 1.5)
        job = await client.status(endpoint, job["id"])
    return job


SAID_PROBLEMS: set[tuple[str, str]] = set()


def problem_text(job: dict) -> str:
    """Why a queued job waits, when the gateway knows its endpoint's workers fail ("" else)."""
    problem = job.get("handlerProblem") or {}
    if not problem:
        return ""
    return f"the endpoint's workers fail ({problem.get('reason')}): {problem.get('message')}"


def say_problem(endpoint: str, job: dict) -> None:
    """Say once per endpoint and problem that the jobs waited for cannot run yet."""
    text = problem_text(job)
    if text and (endpoint, text) not in SAID_PROBLEMS:
        SAID_PROBLEMS.add((endpoint, text))
        err.print(f"waiting on {endpoint}: {escape(text)}", highlight=False, soft_wrap=True)


def progress(total: int, what: str) -> Progress:
    """A progress bar on stderr (stdout stays JSON), shown only for several jobs."""
    return Progress(
        TextColumn(what),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=total < 2,
    )


async def submit_all(
    client: JobClient, endpoint: str, requests: list[dict], sync: bool, concurrency: int
) -> list[dict]:
    gate = asyncio.Semaphore(concurrency)
    jobs: list[dict] = [{}] * len(requests)
    with progress(len(requests), "submitting") as bar:
        task = bar.add_task("submit", total=len(requests))

        async def one(index: int, request: dict) -> None:
            async with gate:
                send = client.runsync if sync else client.run
                jobs[index] = await send(endpoint, request)
                bar.advance(task)

        await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
    return jobs


async def wait_all(
    client: JobClient, endpoint: str, jobs: list[dict], timeout: float, concurrency: int
) -> list[dict]:
    deadline = time.monotonic() + timeout if timeout > 0 else None
    gate = asyncio.Semaphore(concurrency)
    with progress(len(jobs), "running") as bar:
        task = bar.add_task("wait", total=len(jobs))

        async def one(index: int) -> None:
            async with gate:
                jobs[index] = await wait_terminal(client, endpoint, jobs[index], deadline)
                bar.advance(task)

        await asyncio.gather(*(one(i) for i in range(len(jobs))))
    return jobs


async def stream_job(client: JobClient, endpoint: str, request: dict) -> dict:
    """Submit, then print each chunk (a JSON line) as it arrives; returns the final view."""
    job = await client.run(endpoint, request)
    delay = 0.05
    while True:
        view = await client.stream(endpoint, job["id"])
        for chunk in view.get("stream") or []:
            print(json.dumps(chunk.get("output"), default=str), flush=True)
        if view.get("status") in TERMINAL:
            return await client.status(endpoint, job["id"]) if view["status"] != "FAILED" else view
        delay = 0.05 if view.get("stream") else min(0.5, delay * 1.5)
        await asyncio.sleep(delay)


def report_failures(jobs: list[dict]) -> int:
    failed = [j for j in jobs if j.get("status") != "COMPLETED"]
    for job in failed:
        unfinished = "; ".join(filter(None, ["not finished in time", problem_text(job)]))
        reason = job.get("error") or (unfinished if job.get("status") not in TERMINAL else "")
        err.print(
            f"job {job.get('id')} {job.get('status')}: {reason}", highlight=False, soft_wrap=True
        )
    return EXIT_JOB_FAILED if failed else 0


@app.command()
def run(
    ctx: typer.Context,
    endpoint: str = typer.Argument(..., help="endpoint id, e.g. default--hello"),
    input_json: str = typer.Option(None, "--input", help="one job's input as JSON"),
    input_file: Path = typer.Option(None, "--input-file", help="JSON file with one job's input"),
    inputs_jsonl: Path = typer.Option(None, "--inputs-jsonl", help="one job's input per line"),
    sync: bool = typer.Option(False, "--sync", help="submit with /runsync (waits server-side)"),
    stream: bool = typer.Option(False, "--stream", help="print the job's stream chunks live"),
    wait: bool = typer.Option(False, "--wait", help="wait for the results and print them"),
    timeout: float = typer.Option(0, help="seconds to wait for results (0: no limit)"),
    concurrency: int = typer.Option(32, help="requests in flight at once"),
) -> None:
    """Submit one or many jobs; print their ids, or (--wait/--sync) their results."""
    settings = settings_of(ctx)
    requests = read_requests(input_json, input_file, inputs_jsonl)
    if stream and len(requests) != 1:
        fail("--stream takes exactly one job", EXIT_BAD_INPUT)

    async def go() -> list[dict]:
        async with settings.client() as client:
            if stream:
                return [await stream_job(client, endpoint, requests[0])]
            jobs = await submit_all(client, endpoint, requests, sync, concurrency)
            if sync or wait:
                jobs = await wait_all(client, endpoint, jobs, timeout, concurrency)
            return jobs

    jobs = call(go)
    if stream:
        raise typer.Exit(report_failures(jobs))
    columns = ["id", "status", "executionTime", "output", "error"]
    if settings.output == Output.json:
        for job in jobs:
            emit(settings, job)
    else:
        emit(settings, jobs, columns)
    raise typer.Exit(report_failures(jobs) if (sync or wait) else 0)


def job_command(name: str, doc: str):
    def command(
        ctx: typer.Context,
        endpoint: str = typer.Argument(..., help="endpoint id"),
        job: str = typer.Argument(..., help="job id"),
    ) -> None:
        settings = settings_of(ctx)

        async def go() -> dict:
            async with settings.client() as client:
                return await getattr(client, name)(endpoint, job)

        view = call(go)
        emit(settings, view, ["id", "status", "executionTime", "retries", "output", "error"])

    command.__doc__ = doc
    app.command(name)(command)


job_command("status", "Show a job's status and output.")
job_command("cancel", "Cancel a queued or running job.")
job_command("retry", "Run a failed, timed-out or cancelled job again.")


@app.command()
def health(ctx: typer.Context, endpoint: str = typer.Argument(..., help="endpoint id")) -> None:
    """Job and worker counts of an endpoint."""
    settings = settings_of(ctx)

    async def go() -> dict:
        async with settings.client() as client:
            return await client.health(endpoint)

    view = call(go)
    if settings.output == Output.json:
        emit(settings, view)
    else:
        emit(settings, {**view["jobs"], **{f"workers.{k}": v for k, v in view["workers"].items()}})


@app.command()
def jobs(
    ctx: typer.Context,
    endpoint: str = typer.Argument(..., help="endpoint id"),
    status: str = typer.Option(None, help="only jobs in this status (e.g. FAILED)"),
    limit: int = typer.Option(50, min=1, max=1000, help="how many (newest first)"),
) -> None:
    """An endpoint's recent jobs (kept within their ttl), newest first."""
    settings = settings_of(ctx)

    async def go() -> list[dict]:
        found: list[dict] = []
        cursor = None
        async with settings.client() as client:
            while len(found) < limit:
                page = await client.jobs(endpoint, status, limit - len(found), cursor)
                found += page["jobs"]
                if not (cursor := page.get("nextCursor")):
                    break
        return found

    found = call(go)
    if settings.output != Output.json:  # a table shows when, not the Unix time
        found = [{**job, "createdAt": timestamp(job["createdAt"])} for job in found]
    columns = ["id", "status", "createdAt", "delayTime", "executionTime", "workerId", "retries"]
    emit(settings, found, columns)


LOGS_WAIT_S = 20.0  # a `logs -f` long-poll


def kubectl_logs_command(endpoint: str, worker: str | None, follow: bool, tail: int) -> list[str]:
    """`kubectl logs` of an endpoint's worker pods (`namespace--name`), or of one (a worker's
    id is its pod's name), each line prefixed with its pod."""
    command = [
        "kubectl",
        "logs",
        "-n",
        namespace_of(endpoint) or "default",
        "-c",
        builders.WORKER_CONTAINER,
    ]
    if worker:
        command.append(worker)
    else:
        selector = f"{GROUP}/endpoint={builders.label_value(endpoint)}"
        command += ["-l", selector, "--prefix", "--max-log-requests", "50"]
    command.append(f"--tail={tail}")
    if follow:
        command.append("--follow")
    return command


@app.command()
def logs(
    ctx: typer.Context,
    endpoint: str = typer.Argument(..., help="endpoint id"),
    follow: bool = typer.Option(False, "--follow", "-f", help="keep printing new lines"),
    worker: str = typer.Option(None, "--worker", "-w", help="one worker's lines only"),
    tail: int = typer.Option(100, min=0, help="lines already printed to show first"),
) -> None:
    """What an endpoint's workers print: from handlerctl dev's gateway; from a cluster's
    gateway, the worker pods' logs through kubectl (its context and credentials)."""
    settings = settings_of(ctx)

    async def go() -> bool:
        async with settings.client() as client:
            after, first = 0, True
            while True:
                try:
                    page = await client.logs(endpoint, after, worker, 0 if first else LOGS_WAIT_S)
                except Refused as exc:
                    if exc.status == 404 and first and "handlerctl dev" not in str(exc):
                        return False  # not a dev gateway
                    raise
                lines = page["lines"][-tail:] if first else page["lines"]
                for entry in lines:
                    print(f"{entry['worker']} | {entry['line']}", flush=True)
                after, first = page["next"], False
                if not follow:
                    return True

    if call(go):
        return
    command = kubectl_logs_command(endpoint, worker, follow, tail)
    try:
        raise typer.Exit(subprocess.run(command, check=False).returncode)
    except FileNotFoundError:
        fail(
            "this gateway is no handlerctl dev one, and kubectl is not installed: run "
            + " ".join(command),
            EXIT_BAD_INPUT,
        )


@app.command()
def endpoints(ctx: typer.Context) -> None:
    """Every endpoint with its queue figures (admin key)."""
    settings = settings_of(ctx)

    async def go() -> tuple[list, dict]:
        async with settings.client() as client:
            return await client.endpoints(), await client.queues()

    configs, figures = call(go)
    rows = []
    for config in configs:
        queue = figures.get(config["id"], {})
        workers = queue.get("workers") or {}
        rows.append(
            {
                "endpoint": config["id"],
                "inQueue": queue.get("inQueue", 0),
                "inProgress": queue.get("inProgress", 0),
                "workers": sum(workers.values()),
                "idle": workers.get("idle", 0),
                "running": workers.get("running", 0),
                "draining": workers.get("draining", 0),
                "maxRetries": config.get("maxRetries"),
            }
        )
    emit(settings, rows, list(rows[0]) if rows else ["endpoint"])


@dlq_app.command("list")
def dlq_list(ctx: typer.Context, endpoint: str = typer.Argument(..., help="endpoint id")) -> None:
    """Jobs that ran out of retries."""
    settings = settings_of(ctx)

    async def go() -> list:
        async with settings.client() as client:
            return await client.dead_letters(endpoint)

    emit(settings, call(go), ["id", "status", "retries", "error"])


@dlq_app.command("replay")
def dlq_replay(
    ctx: typer.Context,
    endpoint: str = typer.Argument(..., help="endpoint id"),
    jobs: list[str] = typer.Argument(None, help="job ids (default: all)"),
) -> None:
    """Queue dead-lettered jobs again."""
    settings = settings_of(ctx)

    async def go() -> list:
        async with settings.client() as client:
            return await client.replay(endpoint, jobs or None)

    replayed = call(go)
    emit(settings, {"replayed": replayed})


# -- manifests ---------------------------------------------------------------------------------
@app.command()
def render(
    file: Path = typer.Argument(..., help="HandlerDeployment YAML (one or more documents)"),
    gateway_url: str = typer.Option(
        OperatorSettings().gateway_url, help="gateway URL as workers reach it"
    ),
) -> None:
    """Print the Kubernetes objects the operator would create (for review in GitOps PRs)."""
    try:
        documents = [d for d in yaml.safe_load_all(file.read_text()) if d]
    except (OSError, yaml.YAMLError) as exc:
        fail(f"{file}: {exc}", EXIT_BAD_INPUT)
    settings = OperatorSettings(gateway_url=gateway_url)
    objects = []
    for document in documents:
        if not isinstance(document, dict) or document.get("kind") != "HandlerDeployment":
            fail(f"{file}: not a HandlerDeployment: {str(document)[:80]}", EXIT_BAD_INPUT)
        body = {**document, "metadata": {"namespace": "default", **document.get("metadata", {})}}
        try:
            hd = HandlerDeployment.model_validate(body)
        except ValidationError as exc:
            fail(f"{file}: {describe_errors(exc)}", EXIT_BAD_INPUT)
        # The token and its Secret's name come from the live CR's uid and the admin key.
        rendered = json.dumps(builders.build_objects(hd, settings, builders.initial_replicas(hd)))
        for computed, shown in (
            (builders.secret_name(hd, settings), f"{hd.name}-worker-token-<fingerprint>"),
            (builders.worker_token(hd, settings), "<computed by the operator>"),
        ):
            rendered = rendered.replace(json.dumps(computed)[1:-1], shown)
        objects += json.loads(rendered)
    print(yaml.safe_dump_all(objects, sort_keys=False), end="")


@app.command()
def crd() -> None:
    """Print the HandlerDeployment CRD."""
    print(crds.render_crd(), end="")


@app.command()
def build(
    project: Path = typer.Argument(..., help="project directory with @remote functions/classes"),
    out_dir: Path = typer.Option(
        None, "--out", help="where to write (default: PROJECT/.handler_build)"
    ),
    image: str = typer.Option(
        None,
        help="image to build with the project's code (when a builder is found); the "
        "HandlerDeployments name it",
    ),
    worker_image: str = typer.Option(
        images.DEFAULT_WORKER_IMAGE, help="base of the project's image (FROM)"
    ),
    builder: str = typer.Option(
        "auto", help="docker, podman, buildah, auto (the first found) or none (write only)"
    ),
    namespace: str = typer.Option("default", help="namespace of the HandlerDeployments"),
) -> None:
    """Scan PROJECT for @remote (AST, no import); write the manifest, a handler module and a
    HandlerDeployment per endpoint, build.tar.gz (sources + handlers) and a Dockerfile; with
    --image, build that image (docker, podman or buildah)."""
    from handlerctl import projects
    from handlerctl.sources import read_sources

    if not project.is_dir():
        fail(f"{project} is not a directory", EXIT_BAD_INPUT)
    if builder not in ("auto", "none", *images.BUILDERS):
        fail(f"--builder must be auto, none or one of {', '.join(images.BUILDERS)}", EXIT_BAD_INPUT)
    target = (out_dir or project / ".handler_build").resolve()
    sources = read_sources(project.resolve(), target)
    result = projects.scan(sources)
    for problem in result.errors:
        err.print(
            f"{project / problem.path}:{problem.line}: {problem.message}",
            highlight=False,
            soft_wrap=True,
            markup=False,
        )
    if result.errors:
        raise typer.Exit(EXIT_BAD_INPUT)
    if not result.targets:
        fail(f"no @remote functions or classes in {project}", EXIT_BAD_INPUT)
    try:
        files = projects.build_outputs(result, image=image, namespace=namespace)
    except ValueError as exc:
        fail(f"the @remote settings make an invalid HandlerDeployment: {exc}", EXIT_BAD_INPUT)
    archive = "build.tar.gz"
    files["Dockerfile"] = images.build_dockerfile(archive, worker_image)
    files[".dockerignore"] = images.build_dockerignore(archive, "requirements.txt")
    for relative, text in files.items():
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    packed = {relative: project / relative for relative in sources} | {
        relative: target / relative
        for relative in files
        if relative.startswith(projects.PACKAGE) or relative == "requirements.txt"
    }
    write_archive(target / archive, packed)
    manifest = json.loads(files[projects.MANIFEST])
    for name, spec in manifest["endpoints"].items():
        functions = ", ".join(f["name"] for f in spec["functions"])
        out.print(
            f"endpoint {name}: {functions} -> {target / 'deploy' / (name + '.yaml')}",
            highlight=False,
            soft_wrap=True,
        )
    out.print(
        f"manifest {target / projects.MANIFEST}\narchive  {target / archive}\n"
        f"image    {target / 'Dockerfile'}",
        highlight=False,
        soft_wrap=True,
    )
    if image:
        build_image(builder, image, target, worker_image)
    else:
        out.print(
            "the HandlerDeployments run the default worker image, without this project's code: "
            "pass --image NAME to build one with it",
            highlight=False,
            soft_wrap=True,
        )
    out.print(
        f"try it: handlerctl dev {project}  (every endpoint, on one local gateway)",
        highlight=False,
        soft_wrap=True,
    )


def write_archive(archive: Path, members: dict[str, Path]) -> None:
    """A reproducible tar.gz (archive name -> file): owned by root and world-readable, so the
    image's non-root user can read what ADD unpacks."""
    import gzip
    import tarfile

    def normalized(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mode = 0o755 if info.isdir() else 0o644
        info.mtime = 0
        return info

    with (
        open(archive, "wb") as raw,
        gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as zipped,
        tarfile.open(fileobj=zipped, mode="w") as tar,
    ):
        for name, path in sorted(members.items()):
            tar.add(path, arcname=name, filter=normalized)


def build_image(builder: str, image: str, context: Path, worker_image: str) -> None:
    """Build the project's image with the builder named (auto: the first found), streaming its
    output; without a builder, say how to build it."""
    import shutil
    import subprocess

    def usable(name: str) -> bool:
        # A docker CLI without a reachable engine cannot build: skip it when choosing.
        if not shutil.which(name):
            return False
        if name != "docker" or builder == "docker":
            return True
        return subprocess.run(["docker", "info"], capture_output=True, check=False).returncode == 0

    if builder in images.BUILDERS:
        chosen: str | None = builder
    elif builder == "auto":  # probe only when asked to choose (`docker info` may take seconds)
        chosen = next((name for name in images.BUILDERS if usable(name)), None)
    else:
        chosen = None
    command = images.build_command(chosen or "docker", image, str(context), worker_image)
    if builder == "none" or chosen is None:
        reason = (
            "--builder none" if builder == "none" else "no docker engine, podman or buildah found"
        )
        out.print(
            f"{reason}: build it with\n  {' '.join(command)}", highlight=False, soft_wrap=True
        )
        return
    if not usable(chosen):
        fail(f"{chosen} is not on PATH", EXIT_BAD_INPUT)
    err.print(f"building {image} with {chosen}", highlight=False, soft_wrap=True)
    started = time.monotonic()
    built = subprocess.run(command, check=False)
    if built.returncode != 0:
        fail(f"{chosen} build failed with exit code {built.returncode}", EXIT_BUILD)
    out.print(
        f"image {image} built in {time.monotonic() - started:.0f} s: push it where your cluster "
        f"pulls from, then kubectl apply -f {context / 'deploy'}",
        highlight=False,
        soft_wrap=True,
    )


def main() -> None:
    with contextlib.suppress(BrokenPipeError):
        app(args=hoist_global_options(sys.argv[1:]), prog_name="handlerctl")


if __name__ == "__main__":
    sys.exit(main())
