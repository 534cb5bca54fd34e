"""The worker's heartbeat: the runpod SDK's ping loop (`Heartbeat.process_loop`), in a process
that dies with the worker. The SDK's own ping process outlives a worker killed by the OOM
killer or `os._exit`, so its jobs looked alive until their execution timeout.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Any

log = logging.getLogger("handler_worker")

PR_SET_PDEATHSIG = 1  # linux/prctl.h
PARENT_POLL_S = 1.0  # elsewhere: how often the ping process looks for its parent


def start(mirror: Any) -> Any:
    """Start the ping process (as the SDK's `start_ping` would, with its checks); None when
    there is nothing to ping (no API key, worker id or ping URL)."""
    url = os.environ.get("RUNPOD_WEBHOOK_PING", "")
    if not (os.environ.get("RUNPOD_AI_API_KEY") and os.environ.get("RUNPOD_POD_ID") and url):
        log.info("no ping URL, worker id or key: no heartbeat is sent")
        return None
    # Forked where possible, as the SDK's: a forkserver would be the ping process's parent.
    fork = "fork" in multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if fork else None)
    process = context.Process(
        target=_ping, args=(mirror, os.getpid()), name="heartbeat", daemon=True
    )
    process.start()
    return process


def _ping(mirror: Any, parent: int) -> None:
    from runpod.serverless.modules.rp_ping import Heartbeat

    die_with(parent)
    Heartbeat.process_loop(mirror)


def die_with(parent: int) -> None:
    """End this process when `parent` does: the kernel's parent-death signal on Linux, a
    thread watching the parent elsewhere (or when prctl is unavailable)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) == 0:
                if os.getppid() != parent:  # it died before the signal was armed
                    os._exit(0)
                return
    threading.Thread(target=_watch, args=(parent,), name="parent-watch", daemon=True).start()


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(0)
