"""The call chain a worker's job runs in: the endpoints whose jobs led to it (from the job's
`call_chain`) and the worker's own. `@remote` runs a call back into one of them in-process, so
endpoints calling each other can never wait on themselves."""

from __future__ import annotations

import contextvars
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

CALL_CHAIN: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "call_chain", default=()
)


def own_endpoint(env: Mapping[str, str] | None = None) -> str:
    """This worker's endpoint id ("" outside a worker)."""
    env = os.environ if env is None else env
    return env.get("RUNPOD_ENDPOINT_ID", "") if env.get("RUNPOD_WEBHOOK_GET_JOB") else ""


def current(env: Mapping[str, str] | None = None) -> list[str]:
    """What a call made here carries: the chain it is in, this worker's endpoint last."""
    chain = list(CALL_CHAIN.get())
    own = own_endpoint(env)
    if own and own not in chain:
        chain.append(own)
    return chain


@contextmanager
def running_in(chain: list[str]) -> Iterator[None]:
    """A job of `chain` runs here (its calls carry the chain on)."""
    token = CALL_CHAIN.set(tuple(chain))
    try:
        yield
    finally:
        CALL_CHAIN.reset(token)
