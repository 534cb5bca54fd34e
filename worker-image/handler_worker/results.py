"""A job run and its result posted back as the runpod SDK's `handle_job` does (its run_job,
run_job_generator, stream_result and result shape, byte for byte), except that the result's post
may carry the worker's next take (the gateway's `take=N`), over the job channel where there is one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from handler_worker.backoffs import backoff
from handler_worker.channels import ChannelRefused, ChannelUnavailable, JobChannel

log = logging.getLogger("handler_worker")

RESULT_ATTEMPTS = 3  # after a server error, as the SDK's FibonacciRetry(attempts=3)
RESULT_BACKOFF_S = (0.5, 1.0)
# A gateway that is down, unreachable or answers 503 (its Redis away) gets the result again for
# this long, backing off (doubling from 0.5 s up to MAX_RESULT_BACKOFF_S, jittered): the SDK's
# three tries in 1.5 s lost results of jobs that had run, to be run again.
RESULT_UNAVAILABLE_S = 600.0
MAX_RESULT_BACKOFF_S = 15.0
# Answers that say the gateway is away (a proxy before it too), not that it failed on the result.
UNAVAILABLE_STATUSES = (502, 503, 504)
RESULT_TIMEOUT_S = 90.0  # a result post that also takes long-polls as a take does
FORM_HEADERS = {"charset": "utf-8", "Content-Type": "application/x-www-form-urlencoded"}


async def job_result(session: Any, config: dict[str, Any], job: dict[str, Any]) -> tuple[Any, bool]:
    """Run the job as the SDK's handle_job does, streaming chunks as they come; returns the
    result to post and whether the handler streamed."""
    from runpod.serverless.modules import rp_job
    from runpod.serverless.modules.rp_handler import is_generator

    handler = config["handler"]
    if not is_generator(handler):
        result = await rp_job.run_job(handler, job)
    else:
        result = {"output": []}
        async for chunk in rp_job.run_job_generator(handler, job):
            if isinstance(chunk.get("output"), dict) and chunk["output"].get("error"):
                chunk = {"error": str(chunk["output"]["error"])}
            if chunk.get("error"):
                result = chunk
                break
            if config.get("return_aggregate_stream", False):
                result["output"].append(chunk["output"])
            await post_chunk(session, chunk, job)
    if config.get("refresh_worker", False):
        result["stopPod"] = True
    _debugger_output(config, result)
    return result, is_generator(handler)


async def post_chunk(session: Any, chunk: Any, job: dict[str, Any]) -> None:
    """A stream chunk, posted as the SDK's stream_result posts it, naming the delivery it is of
    (the gateway ignores a chunk of a delivery it no longer runs, as it ignores its result)."""
    from runpod.serverless.modules import rp_http

    delivery = delivery_of(job)
    if delivery is None:  # the SDK's own post, byte for byte
        await rp_http.stream_result(session, chunk, job)
        return
    url = result_url(rp_http.JOB_STREAM_URL, job["id"], False, 0, None, delivery)
    await post_result(session, url, chunk, job["id"], False)


def _debugger_output(config: dict[str, Any], result: Any) -> None:
    from runpod.serverless.modules.worker_state import REF_COUNT_ZERO
    from runpod.serverless.utils import rp_debugger

    if config.get("rp_args", {}).get("rp_debugger", False) and isinstance(result, dict):
        result["output"]["rp_debugger"] = rp_debugger.get_debugger_output()
        ready_delay = (config["reference_counter_start"] - REF_COUNT_ZERO) * 1000
        result["output"]["rp_debugger"]["ready_delay_ms"] = ready_delay
    else:
        rp_debugger.clear_debugger_output()


def result_url(
    done_url: str,
    job_id: str,
    is_stream: bool,
    take: int,
    capacity: int | None,
    delivery: int | None = None,
) -> str:
    """The SDK's result URL, plus ours: the next take, and the delivery the result is of."""
    url = done_url.replace("$ID", job_id) + f"&isStream={'true' if is_stream else 'false'}"
    if take:
        url += f"&take={take}" + (f"&capacity={capacity}" if capacity else "")
    if delivery is not None:
        url += f"&delivery={delivery}"
    return url


def delivery_of(job: dict[str, Any]) -> int | None:
    """The gateway's delivery id of a taken job (echoed with its result: a result of an
    earlier delivery is told apart); None from a gateway that sends none."""
    delivery = job.get("delivery")
    return delivery if type(delivery) is int else None


async def post_result(
    session: Any,
    url: str,
    result: Any,
    job_id: str,
    takes: bool,
    send: Callable[[str], Awaitable[list[dict[str, Any]]]] | None = None,
) -> list[dict[str, Any]]:
    """POST the result (retried on 5xx as the SDK does, and for RESULT_UNAVAILABLE_S while the
    gateway is unreachable or answers 503); the jobs the
    gateway handed over in its answer when the post also `takes`. `send(body)`: the job
    channel's post of it instead (HTTP when the channel cannot be had, and for the attempts
    after one the channel failed: a result posted again is answered as a duplicate)."""
    try:
        body = json.dumps(result, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        log.error("job %s: its result is not JSON: %s", job_id, exc)
        return []
    error: Exception | None = None
    started, unavailable_tries, server_errors = time.monotonic(), 0, 0
    while True:
        unavailable = True  # the gateway down, unreachable, restarting or without its storage
        try:
            if send is not None:
                try:
                    return await asyncio.wait_for(send(body), RESULT_TIMEOUT_S)
                except ChannelUnavailable:
                    send = None
            return await _post(session, url, body, takes)
        except (ChannelRefused, aiohttp.ClientResponseError) as exc:
            if exc.status < 500:
                log.error("job %s: the gateway refused its result: %s", job_id, exc)
                return []
            error, unavailable = exc, exc.status in UNAVAILABLE_STATUSES
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            # A retry is safe: the gateway answers a result it has as a duplicate and hands
            # over again what the unread answer carried. It goes over HTTP.
            error, send = exc, None
            unavailable = not isinstance(exc, ValueError)
        if unavailable:  # kept: the job's pings go on meanwhile, so it is not presumed lost
            if time.monotonic() - started >= RESULT_UNAVAILABLE_S:
                break
            unavailable_tries += 1
            await asyncio.sleep(
                backoff(unavailable_tries, RESULT_BACKOFF_S[0], MAX_RESULT_BACKOFF_S)
            )
            continue
        server_errors += 1  # the gateway failed on it: the SDK's three tries
        if server_errors >= RESULT_ATTEMPTS:
            break
        await asyncio.sleep(RESULT_BACKOFF_S[server_errors - 1])
    log.error("job %s: failed to return its result: %s", job_id, error)
    return []


async def _post(session: Any, url: str, body: str, takes: bool) -> list[dict[str, Any]]:
    async with session.post(
        url,
        data=body,
        headers=FORM_HEADERS,
        timeout=aiohttp.ClientTimeout(total=RESULT_TIMEOUT_S),
    ) as response:
        response.raise_for_status()
        answer = await response.json(content_type=None) if takes else {}
        return list(answer.get("jobs") or [])


def runner(
    done_url: str, capacity: int | None, channel: JobChannel | None = None
) -> Callable[..., Any]:
    """The loop's `run`: the job, then its result posted (over the job `channel` where there is
    one) with the next jobs `finished()` asks for."""

    async def run(
        session: Any,
        config: dict[str, Any],
        job: dict[str, Any],
        finished: Callable[[bool], int],
    ) -> list[dict[str, Any]]:
        result, is_stream = await job_result(session, config, job)
        # stopPod: the handler asked for a fresh worker after this job (RunPod's refresh).
        wanted, delivery = finished(bool(result.get("stopPod"))), delivery_of(job)
        url = result_url(done_url, job["id"], is_stream, wanted, capacity, delivery)
        send = None
        if channel is not None and channel.usable():

            def send(body: str) -> Awaitable[list[dict[str, Any]]]:
                return channel.done(session, job["id"], is_stream, body, wanted, delivery)

        return await post_result(session, url, result, job["id"], wanted > 0, send)

    return run
