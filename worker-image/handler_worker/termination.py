"""Writes fatal worker errors where Kubernetes shows them: the container's termination log.

The operator reads this message from the pod status to explain a crash loop in the CR status.
"""

from __future__ import annotations

import os

TERMINATION_LOG_ENV = "HANDLER_TERMINATION_LOG"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
# Kubernetes keeps at most 4096 bytes of a termination message per container.
TERMINATION_MESSAGE_LIMIT = 4096


def termination_log_path() -> str:
    return os.environ.get(TERMINATION_LOG_ENV, DEFAULT_TERMINATION_LOG)


def write_termination_message(message: str, path: str | None = None) -> bool:
    """Write `message` (truncated to Kubernetes' limit) to the termination log; never raises."""
    path = path or termination_log_path()
    data = message.encode("utf-8")
    if len(data) > TERMINATION_MESSAGE_LIMIT:
        data = b"..." + data[-(TERMINATION_MESSAGE_LIMIT - 3) :]
    try:
        with open(path, "wb") as handle:
            handle.write(data)
    except OSError:
        return False
    return True
