"""Fixtures for worker tests: the stub gateway and worker subprocesses started like a pod."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import EXAMPLES, REPO_ROOT, child_pythonpath, subprocess_env
from tests.worker.stub_gateway import StubGateway


@pytest.fixture
def stub_gateway() -> Iterator[StubGateway]:
    gateway = StubGateway().start()
    yield gateway
    gateway.stop()


def run_worker(
    module: str, *args: str, extra_path: tuple[str, ...] = (), timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run `python -m handler_worker ARGS` to completion with HANDLER_MODULE=module."""
    return subprocess.run(
        [sys.executable, "-m", "handler_worker", *args],
        env=subprocess_env(HANDLER_MODULE=module, PYTHONPATH=child_pythonpath(*extra_path), **env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )


def example_path(name: str) -> str:
    return str(EXAMPLES / name)


@pytest.fixture
def worker_process() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start production-mode workers; kills each one's whole process group afterwards."""
    started: list[subprocess.Popen[str]] = []

    def start(module: str, env: dict[str, str], extra_path: tuple[str, ...] = ()):
        process = subprocess.Popen(
            [sys.executable, "-m", "handler_worker"],
            env=subprocess_env(
                HANDLER_MODULE=module, PYTHONPATH=child_pythonpath(*extra_path), **env
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO_ROOT,
            start_new_session=True,  # the SDK forks a ping process: kill the group
        )
        started.append(process)
        return process

    yield start
    for process in started:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(5)
                break
            except subprocess.TimeoutExpired:
                continue
        if process.stdout:
            process.stdout.close()
