"""Worker slots: HANDLER_CONCURRENCY jobs at a time, with spare SDK slots that keep polling.

The runpod SDK sleeps a second whenever its slots look full, which caps a worker at about
`concurrency` short jobs per second; it also counts a freshly taken job twice (local queue and
in-progress) until its runner picks it up. So the SDK gets `2 * N + 1` slots and the gateway the
real capacity N (`&capacity=N` on the take URL): the gateway never lets the worker hold more
than N jobs, and the SDK's take long-poll stays open and receives the next job the moment one
ends. A module's own `concurrency_modifier` is left alone.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from handler_worker.loader import env_flag

SPARE_SLOT_ENV = "HANDLER_SPARE_SLOT"


def _constant(value: int, current: int) -> int:
    return value


def capacity_url(take_url: str, capacity: int) -> str:
    """The take URL with `capacity` appended (the SDK adds its own `&...` parameters after)."""
    return with_query(take_url, "capacity", str(capacity))


def with_query(take_url: str, name: str, value: str) -> str:
    """The take URL with `name=value` appended, unless it has `name` already."""
    if f"{name}=" in take_url:
        return take_url
    separator = "" if take_url.endswith(("?", "&")) else ("&" if "?" in take_url else "?")
    return f"{take_url}{separator}{name}={value}"


def sdk_slots(capacity: int) -> int:
    return 2 * capacity + 1


def spare_slot_enabled(env: Mapping[str, str]) -> bool:
    return env_flag(env, SPARE_SLOT_ENV, default=True)


def apply_spare_slot(
    config: dict[str, Any], module: Any, capacity: int, env: Mapping[str, str]
) -> bool:
    """Give the SDK `2 * capacity + 1` slots and the gateway the cap. False if not applicable."""
    if getattr(module, "concurrency_modifier", None) is not None or not spare_slot_enabled(env):
        return False
    from runpod.serverless.modules import rp_job

    if "/job-take/" not in rp_job.JOB_GET_URL:
        return False
    rp_job.JOB_GET_URL = capacity_url(rp_job.JOB_GET_URL, capacity)
    config["concurrency_modifier"] = functools.partial(_constant, sdk_slots(capacity))
    return True
