"""SIGTERM in a pod (scale-down, rollout, drain, eviction): the runpod SDK stops taking jobs and
finishes what it holds, but its take and stop long-polls keep the process alive for up to a
long-poll more, and a take still open can be handed a job. We also tell the gateway the worker
is leaving: both long-polls are answered at once, no job is handed over, and the process exits
as soon as its last job is done.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

log = logging.getLogger("handler_worker")

LEAVE_TIMEOUT_S = 5.0
TAKE_PATH = "/job-take/"


def leave_url(take_url: str, worker_id: str) -> str | None:
    """The gateway's leave route for this worker, from the SDK's job-take URL
    (`{base}/v2/{endpoint}/job-take/$ID?...`); None when that URL is not a gateway's."""
    base, found, _ = take_url.partition(TAKE_PATH)
    if not found or not worker_id:
        return None
    return f"{base}/leave/{quote(worker_id, safe='')}"


def announce_leaving(url: str, token: str, timeout: float = LEAVE_TIMEOUT_S) -> bool:
    """POST the leave; False (logged) when the gateway cannot be told: the SDK then ends its
    long-polls at its own pace, as an unmodified worker does. Never raises."""
    request = urllib.request.Request(
        url, data=b"{}", method="POST", headers={"Authorization": token}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return 200 <= response.status < 300
    except Exception as exc:  # noqa: BLE001 - URLError, HTTPException, ValueError: never raise
        log.warning("could not tell the gateway this worker is leaving: %s", exc)
        return False


def chain_sigterm(on_term: Callable[[], None]) -> None:
    """Run `on_term` (in a thread: a signal handler must not block) and then the handler
    already installed (the SDK's: stop taking, finish what is held)."""
    previous = signal.getsignal(signal.SIGTERM)

    def handle(signum: int, frame: Any) -> None:
        threading.Thread(target=on_term, name="leave", daemon=True).start()
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:  # the default: SIGTERM still ends the process
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, handle)


def _identity(current: int) -> int:
    return current


def leaver(env: Mapping[str, str]) -> Callable[[], bool] | None:
    """Tells the gateway of this worker's environment that it leaves; None without one."""
    url = leave_url(env.get("RUNPOD_WEBHOOK_GET_JOB", ""), env.get("RUNPOD_POD_ID", ""))
    if url is None:
        return None
    token = env.get("RUNPOD_AI_API_KEY", "")
    return lambda: announce_leaving(url, token)


def leave_on_sigterm(config: dict[str, Any], env: Mapping[str, str]) -> bool:
    """Arrange for SIGTERM to announce the leave. The SDK installs its own SIGTERM handler when
    it starts, so ours is chained in at the SDK's first call of `concurrency_modifier` (a
    public config key, called on the main thread inside its loop), wrapping any modifier set.
    False when there is no gateway to tell (local test runs)."""
    announce = leaver(env)
    if announce is None:
        return False
    modifier = config.get("concurrency_modifier") or _identity
    installed = False

    def modify(current: int) -> int:
        nonlocal installed
        if not installed:
            installed = True
            chain_sigterm(announce)
        return modifier(current)

    config["concurrency_modifier"] = modify
    return True
