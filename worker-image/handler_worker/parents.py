"""The parent watch of workers that `handlerctl dev` starts: when handlerctl goes (killed, its
terminal closed), its workers go too, with every process they started."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Mapping

PARENT_PID_ENV = "HANDLER_PARENT_PID"
CHECK_S = 0.5


def parent_gone(expected: int, current: Callable[[], int] = os.getppid) -> bool:
    """Whether the process that started this one has exited (this one was re-parented)."""
    return current() != expected


def _end_process_group() -> None:
    """SIGKILL this process's group: the worker (a session leader, as handlerctl dev starts it)
    and whatever its handler started."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os._exit(1)


def watch_parent(env: Mapping[str, str], interval: float = CHECK_S) -> threading.Thread | None:
    """With HANDLER_PARENT_PID set: a daemon thread that ends the process group once that
    parent is gone (checked every `interval` s; portable, unlike Linux's PR_SET_PDEATHSIG,
    which would also spare the handler's own children)."""
    raw = env.get(PARENT_PID_ENV)
    if not raw or not raw.isdigit():
        return None
    expected = int(raw)
    if parent_gone(expected):  # gone before this process got here
        _end_process_group()

    def loop() -> None:
        event = threading.Event()
        while not event.wait(interval):
            if parent_gone(expected):
                _end_process_group()

    thread = threading.Thread(target=loop, name="parent-watch", daemon=True)
    thread.start()
    return thread
