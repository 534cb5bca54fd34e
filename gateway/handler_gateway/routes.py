"""aiohttp routes of the gateway: RunPod client and worker routes, admin API, health, metrics.

Thin glue: parse, authenticate, call `Gateway` operations, render JSON. Every error is JSON
`{"error": ...}` with a 4xx/5xx status; a backend outage is a 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import WSCloseCode, web
from pydantic import BaseModel, ValidationError

from handler_gateway.backends import Backend, BackendUnavailable
from handler_gateway.errors import (
    BadRequest,
    ClientFault,
    Forbidden,
    NotFound,
    Unauthorized,
)
from handler_gateway.jobs import JobRecord, JobStatus
from handler_gateway.keys import (
    GATEWAY_SCOPES,
    INSECURE,
    Caller,
    Keys,
    Scope,
    bearer,
    endpoint_callers,
    may_call_client_routes,
)
from handler_gateway.metrics import GatewayMetrics
from handler_gateway.openapi import Operation, build_openapi
from handler_gateway.operations import Gateway, ResultPost, Timings
from handler_gateway.webhooks import WebhookSender
from handler_protocol.ids import ENDPOINT_ID
from handler_protocol.models import (
    DeadLetterList,
    DrainResult,
    EndpointConfig,
    EndpointList,
    EndpointSummary,
    HandlerProblem,
    HandlerProblemView,
    Health,
    JobList,
    JobSummary,
    JobView,
    PurgeResult,
    QueueFigures,
    QueuesView,
    ReplayRequest,
    ReplayResult,
    RunRequest,
    StreamChunk,
    StreamView,
    WorkerView,
    digest,
)

log = logging.getLogger("handler_gateway")

GATEWAY = web.AppKey("gateway", Gateway)
KEYS = web.AppKey("keys", Keys)
METRICS = web.AppKey("metrics", GatewayMetrics)
WEBHOOKS = web.AppKey("webhooks", WebhookSender)
SWEEPER = web.AppKey("sweeper", asyncio.Task)
RUN_SWEEPER = web.AppKey("run_sweeper", bool)
KEY_RELOADER = web.AppKey("key_reloader", asyncio.Task)
KEY_RELOAD_S = 2.0  # a mounted Secret's update shows within the kubelet's sync, plus this
MAX_BODY = web.AppKey("max_body", int)
CHANNELS = web.AppKey("channels", set)  # the job channels' sockets open here
CHECKS = web.AppKey("checks", dict)  # route -> its Auth (auth_middleware)
# Who made the request, once known (a Caller), and more: typed keys where aiohttp has them.
_request_key = getattr(web, "RequestKey", lambda name, _: name)
CALLER = _request_key("caller", Caller)
COUNT_AFTER = _request_key("count_after", Callable)  # starts a read's rate-limit count
ENDPOINT_KNOWN = _request_key("endpoint_known", str)  # the request's endpoint, once found
ENDPOINT = _request_key("endpoint", str)  # the endpoint the route's check let the caller call
DEFAULT_MAX_BODY = 10 * 1024 * 1024
MAX_BATCH = 256
MAX_JSON_DEPTH = 200  # nesting levels a request or a result may have

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# A route's check: raises 401/403/404 (and 429 for a client over its rate limit), else the
# endpoint the caller may call (None on endpoint-less admin routes).
Auth = Callable[[web.Request], Awaitable[str | None]]


def error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


def respond(model: BaseModel, status: int = 200) -> web.Response:
    return web.json_response(model.model_dump(mode="json", exclude_none=True), status=status)


def job_view_dict(job: JobRecord) -> dict[str, Any]:
    """A job as `run`, `runsync`, `status`, `cancel`, `retry` and webhooks show it (`JobView`'s
    fields, none left null), built without a model: every runsync answers one."""
    status = job.status
    output = error = None
    if status == JobStatus.IN_PROGRESS:
        output = job.progress
    elif status != JobStatus.IN_QUEUE:
        output, error = job.output, job.error
    view = {
        "id": job.id,
        "status": status.value,
        "delayTime": job.delay_ms(),
        "executionTime": job.execution_ms(),
        "output": output,
        "error": error,
        "retries": job.redeliveries or None,
        "workerId": job.worker_id,
    }
    if "attempts" in job.extra:  # retried on error: the runs that failed, the one it is on
        view["attempt"] = job.attempt
        view["attempts"] = job.extra["attempts"]
        view["retryAt"] = job.retry_at
    return {name: value for name, value in view.items() if value is not None}


def job_view(job: JobRecord) -> JobView:
    return JobView.model_validate(job_view_dict(job))


def error_for(exc: Exception) -> tuple[int, str, dict[str, str]]:
    """Status, message and headers answering a request that raised `exc` (500: unexpected)."""
    if isinstance(exc, ClientFault):
        return exc.status, str(exc), exc.headers()
    if isinstance(exc, BackendUnavailable):
        return 503, f"queue backend unavailable, retry shortly: {exc}", {"Retry-After": "1"}
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return 413, f"request body too large: {exc.text}", {}
    if isinstance(exc, web.HTTPException) and exc.status >= 400:
        allow = exc.headers.get("Allow")  # a 405 says which methods the route has
        return exc.status, exc.reason, {"Allow": allow} if allow else {}
    return 500, "internal error in the gateway", {}


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:
        if isinstance(exc, web.HTTPException) and exc.status < 400:
            raise
        status, message, headers = error_for(exc)
        if status == 500:
            log.exception("unhandled error on %s %s", request.method, request.path)
        elif status in (403, 429):
            key = caller_id(request) or "unknown"
            log.info("%s %s: %d for key %s", request.method, request.path, status, key)
        response = error(status, message, **headers)
    _count(request, response.status)
    count_after = request.get(COUNT_AFTER)
    if count_after is not None:
        # A read's rate-limit count waits until its answer is sent: its round trip to the
        # backend then delays nothing. Counted even if the caller went away meanwhile.
        try:
            await response.prepare(request)
            await response.write_eof()
        finally:
            count_after()
    return response


def _count(request: web.Request, status: int) -> None:
    """Requests of the authenticated routes, by the caller's key id."""
    caller = request.get(CALLER)
    if caller is not None or status == 401:
        endpoint = request.get(ENDPOINT_KNOWN, "")  # only registered ones: a bounded label
        request.app[METRICS].on_request(endpoint, caller.id if caller else "unknown", status)


# -- request helpers ---------------------------------------------------------------------------
async def json_body(request: web.Request, required: bool = True) -> Any:
    """The body parsed as JSON whatever its Content-Type (the runpod SDK claims form data)."""
    raw = await request.read()
    if not raw.strip():
        if required:
            raise BadRequest("request body is empty; expected JSON")
        return None
    try:
        return loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None


def _no_constant(name: str) -> None:
    return None


def loads(raw: str | bytes) -> Any:
    """JSON as Python reads it, but NaN and ±Infinity (not JSON; Python writes them) as null:
    what the gateway stores, it answers as valid JSON. Nesting deeper than MAX_JSON_DEPTH is
    refused (it would fail later, in a validation or a response)."""
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise BadRequest(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    opened = raw.count(b"[" if isinstance(raw, bytes) else "[")
    opened += raw.count(b"{" if isinstance(raw, bytes) else "{")
    if opened > MAX_JSON_DEPTH and nesting(value) > MAX_JSON_DEPTH:  # counted only if it may be
        raise BadRequest(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def nesting(value: Any) -> int:
    """How deep arrays and objects nest in `value` (a scalar: 0)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in item if isinstance(child, (dict, list)))
    return deepest


def parse_model(model: type[BaseModel], data: Any) -> Any:
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        if first["type"] == "missing":
            message = f'"{where}" is required'
        else:
            message = f"invalid {where}: {first['msg']}"
        raise BadRequest(message) from None


def int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    return number_query(request, name, default, low, high, int)


def number_query(
    request: web.Request, name: str, default: Any, low: float, high: float, kind: type = float
) -> Any:
    """Query parameter `name` as `kind` within [low, high]; `default` when absent (400 else)."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise BadRequest(f"query parameter {name} must be {noun}, got '{raw}'") from None
    if not low <= value <= high:
        raise BadRequest(f"query parameter {name} must be between {low} and {high}")
    return value


def wait_query(request: web.Request) -> float:
    """`wait` (ms) of runsync and status-sync, bounded by the gateway's runsync timings; s."""
    timings = request.app[GATEWAY].timings
    default, most = int(timings.runsync_wait * 1000), int(timings.runsync_wait_max * 1000)
    return int_query(request, "wait", default, 0, most) / 1000


def endpoint_id(request: web.Request) -> str:
    value = request.match_info["endpoint"]
    if not ENDPOINT_ID.match(value):
        raise NotFound(f"endpoint '{value}' not found")
    return value


async def _config(request: web.Request) -> EndpointConfig | None:
    try:
        return await request.app[GATEWAY].endpoint(endpoint_id(request))
    except NotFound:
        return None


async def identify(request: web.Request, config: EndpointConfig | None) -> list[Caller]:
    """Who the request's credential names: a gateway key and/or a key or the worker token of
    `config` (a credential may hold several grants), or another endpoint's (to tell a refused
    credential, 403, from an unknown one, 401). []: no credential, or an unknown one."""
    keys = request.app[KEYS]
    if keys.insecure:
        return [INSECURE]
    credential = bearer(request.headers.get("Authorization"))
    if not credential:
        return []
    sha256 = digest(credential)
    gateway_caller = keys.gateway_caller(sha256)
    found = [gateway_caller] if gateway_caller else []
    if config is not None:
        found += endpoint_callers(config, sha256)
    if found:
        return found
    owner = await request.app[GATEWAY].credential_owner(sha256)
    return [Caller(owner, Scope.FOREIGN)] if owner else []


# Credentials first, then existence: an unknown credential gets 401 whether or not the endpoint
# exists (ids cannot be probed), a known one 404 for an unknown endpoint, then 403 if it may
# not call the route.
async def authorize(
    request: web.Request,
    permits: Callable[[Caller, EndpointConfig | None], bool],
    needed: str,
    on_endpoint: bool = True,
) -> tuple[Caller, EndpointConfig | None]:
    """The caller (kept on the request for metrics and logs) and the endpoint's config."""
    config = await _config(request) if on_endpoint else None
    callers = await identify(request, config)
    if not callers:
        raise Unauthorized(f"missing or unknown credentials: this route needs {needed}")
    caller = next((c for c in callers if c is INSECURE or permits(c, config)), callers[0])
    request[CALLER] = caller
    if on_endpoint and config is None:
        raise NotFound(f"endpoint '{request.match_info['endpoint']}' not found")
    if config is not None:
        request[ENDPOINT_KNOWN] = config.id
    if caller is not INSECURE and not permits(caller, config):
        if config is not None and config.runsCallerCode and caller.scope in GATEWAY_SCOPES:
            raise Forbidden(
                f"endpoint '{config.id}' runs code its callers send: only keys scoped to it "
                "(its HandlerDeployment's spec.access, or its namespace's keys) may call it, "
                f"not the gateway's global or admin keys (this is '{caller.id}')"
            )
        raise Forbidden(f"'{caller.id}' may not call this route: it needs {needed}")
    return caller, config


# When a client route counts its caller's request against the rate limit: before it acts;
# with the creation of the job it submits (in the same backend step); or, for a read, as it
# answers (see Gateway.admit_read).
FIRST, WITH_CREATE, READ = "first", "with-create", "read"


async def authorize_client(request: web.Request, admission: str = FIRST) -> str:
    """The endpoint, once the caller may call it (and, as `admission` says, is within its
    rate limit)."""
    caller, config = await authorize(
        request, may_call_client_routes, "a client API key (Authorization: Bearer <key>)"
    )
    assert config is not None
    gateway = request.app[GATEWAY]
    if admission == FIRST:
        await gateway.admit(config, caller.id)
    elif admission == READ:
        count = gateway.admit_read(config, caller.id)
        if count is not None:
            request[COUNT_AFTER] = count  # once the answer is out (errors_middleware)
    return config.id


def caller_id(request: web.Request) -> str | None:
    caller = request.get(CALLER)
    return caller.id if caller else None


def _is_worker(caller: Caller, config: EndpointConfig | None) -> bool:
    return caller.scope == Scope.WORKER


def _is_admin(caller: Caller, config: EndpointConfig | None) -> bool:
    return caller.scope == Scope.ADMIN


def _is_admin_or_worker(caller: Caller, config: EndpointConfig | None) -> bool:
    return caller.scope in (Scope.ADMIN, Scope.WORKER)


async def authorize_worker(request: web.Request) -> str:
    endpoint = request.match_info["endpoint"]
    await authorize(request, _is_worker, f"the worker token of endpoint '{endpoint}'")
    return endpoint


async def authorize_admin(request: web.Request) -> None:
    await authorize(
        request, _is_admin, "an admin key (Authorization: Bearer <key>)", on_endpoint=False
    )


async def authorize_admin_or_worker(request: web.Request) -> str:
    """KEDA's queue route: the admin key or the endpoint's own worker token."""
    endpoint = admin_endpoint_id(request)
    needed = f"an admin key or the worker token of endpoint '{endpoint}'"
    await authorize(request, _is_admin_or_worker, needed)
    return endpoint


# -- client routes -----------------------------------------------------------------------------
async def run(request: web.Request) -> web.Response:
    endpoint = request[ENDPOINT]
    body = parse_model(RunRequest, await json_body(request))
    size = len(await request.read())
    job = await request.app[GATEWAY].submit(endpoint, body, size, caller_id(request))
    return web.json_response({"id": job.id, "status": job.status.value})


async def runsync(request: web.Request) -> web.Response:
    endpoint = request[ENDPOINT]
    body = parse_model(RunRequest, await json_body(request))
    gateway = request.app[GATEWAY]
    wait = wait_query(request)
    job = await gateway.submit(endpoint, body, len(await request.read()), caller_id(request))
    job = await gateway.wait_terminal(endpoint, job.id, wait, submitted=job)
    if job.terminal:
        return web.json_response(job_view_dict(job))
    view = {"id": job.id, "status": job.status.value}
    return web.json_response(await with_problem(request, endpoint, job, view))


async def with_problem(
    request: web.Request, endpoint: str, job: JobRecord, view: dict[str, Any]
) -> dict[str, Any]:
    """`view`, and for a job still queued, why the endpoint's workers fail when they do: a
    waiting client learns it at once, not after its timeout."""
    if job.status == JobStatus.IN_QUEUE:
        problem = await request.app[GATEWAY].problem(endpoint)
        if problem is not None:
            view["handlerProblem"] = problem.model_dump(mode="json", exclude_none=True)
    return view


async def list_jobs(request: web.Request) -> web.Response:
    """`?status=&limit=&cursor=`: the endpoint's jobs kept (within their ttl), newest first."""
    endpoint = request[ENDPOINT]
    raw_status = request.query.get("status") or None
    if raw_status is not None and raw_status not in JobStatus.__members__:
        allowed = ", ".join(JobStatus.__members__)
        raise BadRequest(f"query parameter status must be one of {allowed}, got '{raw_status}'")
    status = JobStatus(raw_status) if raw_status else None
    limit = int_query(request, "limit", 50, 1, 1000)
    after = read_cursor(request.query.get("cursor") or None)
    found, after = await request.app[GATEWAY].list_jobs(endpoint, status, limit, after)
    summaries = [job_summary(job) for job in found]
    next_cursor = write_cursor(after) if after is not None else None
    return respond(JobList(jobs=summaries, nextCursor=next_cursor))


def job_summary(job: JobRecord) -> JobSummary:
    return JobSummary(
        id=job.id,
        status=job.status.value,
        createdAt=job.created_at,
        delayTime=job.delay_ms(),
        executionTime=job.execution_ms(),
        workerId=job.worker_id,
        retries=job.redeliveries or None,
        lowPriority=job.low_priority or None,
        attempt=job.attempt if "attempts" in job.extra else None,
    )


def write_cursor(after: tuple[float, str]) -> str:
    """Where a listing page ended, opaque to clients."""
    return base64.urlsafe_b64encode(json.dumps(list(after)).encode()).decode().rstrip("=")


def read_cursor(cursor: str | None) -> tuple[float, str] | None:
    if cursor is None:
        return None
    try:
        created, job_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return float(created), str(job_id)
    except (ValueError, TypeError):
        raise BadRequest("query parameter cursor is not one this gateway gave out") from None


async def status_sync(request: web.Request) -> web.Response:
    """`status` that waits up to `wait` ms for the job to end (runpod's JavaScript client polls
    it for jobs that outlast `runsync`)."""
    endpoint = request[ENDPOINT]
    gateway = request.app[GATEWAY]
    job = await gateway.wait_terminal(endpoint, request.match_info["job"], wait_query(request))
    return web.json_response(await with_problem(request, endpoint, job, job_view_dict(job)))


async def status(request: web.Request) -> web.Response:
    endpoint = request[ENDPOINT]
    job = await request.app[GATEWAY].job(endpoint, request.match_info["job"])
    return web.json_response(await with_problem(request, endpoint, job, job_view_dict(job)))


async def stream(request: web.Request) -> web.Response:
    endpoint = request[ENDPOINT]
    cursor = request.query.get("cursor")
    start = int_query(request, "cursor", 0, 0, 10**9) if cursor is not None else None
    job, chunks, end = await request.app[GATEWAY].stream(endpoint, request.match_info["job"], start)
    status_value = job.status.value
    error_value = job.error
    if job.status == JobStatus.CANCELLED:
        # runpod's Job.stream() only stops on COMPLETED/FAILED/TIMED_OUT: end it with FAILED.
        status_value, error_value = JobStatus.FAILED.value, "job was cancelled"
    view = StreamView(
        id=job.id,
        status=status_value,
        stream=[StreamChunk(output=chunk) for chunk in chunks],
        cursor=end,
        error=error_value if job.terminal else None,
    )
    return web.json_response(view.model_dump(mode="json", exclude_none=True))


async def cancel(request: web.Request) -> web.Response:
    endpoint = request[ENDPOINT]
    job = await request.app[GATEWAY].cancel(endpoint, request.match_info["job"])
    return web.json_response(job_view_dict(job))


async def retry(request: web.Request) -> web.Response:
    endpoint = request[ENDPOINT]
    job = await request.app[GATEWAY].retry(endpoint, request.match_info["job"])
    return web.json_response({"id": job.id, "status": job.status.value})


async def purge_queue(request: web.Request) -> web.Response:
    endpoint = request[ENDPOINT]
    removed = await request.app[GATEWAY].purge(endpoint)
    return respond(PurgeResult(removed=removed))


async def health(request: web.Request) -> web.Response:
    endpoint = request[ENDPOINT]
    return respond(await request.app[GATEWAY].health(endpoint))


# -- worker routes -----------------------------------------------------------------------------
def take_payload(job: JobRecord) -> dict[str, Any]:
    """The job as a worker gets it; `delivery` (ours) is echoed by handler_worker's results."""
    payload: dict[str, Any] = {"id": job.id, "input": job.input, "delivery": job.deliveries}
    if job.webhook:
        payload["webhook"] = job.webhook
    if "s3Config" in job.extra:  # RunPod hands it to the handler with the job
        payload["s3Config"] = job.extra["s3Config"]
    return payload


def capacity_query(request: web.Request) -> int | None:
    """`capacity`: the most jobs this worker may hold (set by handler_worker's loader)."""
    if "capacity" not in request.query:
        return None
    return int_query(request, "capacity", 1, 1, MAX_BATCH)


def instance_query(request: web.Request) -> str | None:
    """`instance`: the worker process's id (handler_worker's loop sends it with its takes)."""
    value = request.query.get("instance")
    if value is not None and not 0 < len(value) <= 64:
        raise BadRequest("query parameter instance must have 1 to 64 characters")
    return value


def _connected(request: web.Request) -> bool:
    """Whether the caller is still there (aiohttp does not cancel a handler when it leaves)."""
    return request.transport is not None and not request.transport.is_closing()


async def _long_poll_take(request: web.Request, endpoint: str, size: int) -> list[JobRecord]:
    """A worker's take long-poll: jobs are claimed only while the caller is connected."""
    gateway = request.app[GATEWAY]
    return await gateway.take(
        endpoint,
        request.match_info["worker"],
        size,
        gateway.timings.take_hold,
        capacity_query(request),
        connected=lambda: _connected(request),
        instance=instance_query(request),
    )


async def _hand_over(
    request: web.Request, endpoint: str, taken: list[JobRecord], body: Any
) -> web.StreamResponse:
    """Answer with `body`, which carries `taken`: a job whose answer cannot be written goes
    straight back to the queue."""
    response = web.json_response(body)
    try:
        if not _connected(request):
            raise ConnectionResetError("the worker left before its jobs were handed over")
        await response.prepare(request)
        await response.write_eof()
    except ConnectionResetError:
        await request.app[GATEWAY].give_back(endpoint, request.match_info["worker"], taken)
    return response


async def _take(request: web.Request, size: int, batch: bool) -> web.StreamResponse:
    endpoint = request[ENDPOINT]
    taken = await _long_poll_take(request, endpoint, size)
    if not taken:
        return web.Response(status=204)
    payloads = [take_payload(job) for job in taken]
    return await _hand_over(request, endpoint, taken, payloads if batch else payloads[0])


async def job_take(request: web.Request) -> web.StreamResponse:
    return await _take(request, 1, batch=False)


async def job_take_batch(request: web.Request) -> web.StreamResponse:
    return await _take(request, int_query(request, "batch_size", 1, 1, MAX_BATCH), batch=True)


async def leave(request: web.Request) -> web.Response:
    """A worker shutting down (SIGTERM): its long-polls end now and it gets no new job."""
    endpoint = request[ENDPOINT]
    held = await request.app[GATEWAY].leave(endpoint, request.match_info["worker"])
    return web.json_response({"jobs": held})


async def job_stop(request: web.Request) -> web.Response:
    endpoint = request[ENDPOINT]
    gateway = request.app[GATEWAY]
    ids = await gateway.stop_signals(
        endpoint, request.match_info["worker"], gateway.timings.stop_hold
    )
    if not ids:
        return web.Response(status=204)
    return web.json_response({"jobsToStop": ids})


async def job_done(request: web.Request) -> web.StreamResponse:
    endpoint = request[ENDPOINT]
    body = await json_body(request)
    if not isinstance(body, dict):
        raise BadRequest("result body must be a JSON object")
    take = int_query(request, "take", 0, 0, MAX_BATCH)  # ours: the next take, same request
    posted = ResultPost(
        request.match_info["job"],
        body,
        request.query.get("isStream", "false").lower() == "true",
        int_query(request, "delivery", None, 1, 2**31),
    )
    outcome, taken = await request.app[GATEWAY].done_and_take(
        endpoint,
        request.match_info["worker"],
        posted,
        take,
        capacity_query(request),
        connected=lambda: _connected(request),
        instance=instance_query(request),
    )
    if not take:
        return web.json_response({"result": outcome})
    payloads = [take_payload(job) for job in taken]
    return await _hand_over(request, endpoint, taken, {"result": outcome, "jobs": payloads})


async def job_stream(request: web.Request) -> web.Response:
    endpoint = request[ENDPOINT]
    body = await json_body(request)
    if not isinstance(body, dict) or "output" not in body:
        raise BadRequest('stream body must be a JSON object with "output"')
    outcome = await request.app[GATEWAY].stream_chunk(
        endpoint,
        request.match_info["worker"],
        request.match_info["job"],
        body["output"],
        int_query(request, "delivery", None, 1, 2**31),  # ours, as with results
    )
    return web.json_response({"result": outcome})


async def ping(request: web.Request) -> web.Response:
    endpoint = request[ENDPOINT]
    job_ids = [j for j in request.query.get("job_id", "").split(",") if j]
    await request.app[GATEWAY].ping(endpoint, request.match_info["worker"], job_ids)
    return web.json_response({"status": "ok"})


# -- the job channel (ours: the runpod SDK speaks HTTP) -----------------------------------------
CHANNEL_HEARTBEAT_S = 20.0  # pings on an idle channel: a vanished worker is noticed
CHANNEL_ENVELOPE = 4096  # a result frame may exceed the body limit by its envelope


class JobChannel:
    """A worker's takes and results over one WebSocket, as handler_worker's loop sends them:
    each text frame is a request answered by one frame with its `seq`, requests run
    concurrently. `{"seq", "take": N}` -> `{"seq", "jobs"}` (a take long-poll);
    `{"seq", "done": job, "isStream", "result", "take": N}` -> `{"seq", "result", "jobs"}` (as
    `job-done?take=N`); a failure -> `{"seq", "error", "status"}` (the HTTP status it would
    have). Jobs are claimed only while the socket is open; those of an answer that cannot be
    sent go back to the queue, and a socket that closes ends its takes."""

    def __init__(self, request: web.Request, socket: web.WebSocketResponse, endpoint: str):
        self.gateway = request.app[GATEWAY]
        self.request, self.socket = request, socket
        self.endpoint, self.worker = endpoint, request.match_info["worker"]
        self.capacity, self.instance = capacity_query(request), instance_query(request)
        self.limit = request.app[MAX_BODY] + CHANNEL_ENVELOPE
        self.closed = False
        self._tasks: set[asyncio.Task[None]] = set()

    def receive(self, data: str) -> None:
        task = asyncio.create_task(self._answer(data))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """The socket closed: the takes waiting end at once (their caller is gone), and work
        under way is not cancelled but finishes: a result being stored is stored and observed,
        jobs claimed meanwhile go back to the queue."""
        self.closed = True
        self.gateway.wake_takes(self.endpoint, self.worker)
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _open(self) -> bool:
        return not self.closed and not self.socket.closed and _connected(self.request)

    async def _answer(self, data: str) -> None:
        seq, taken, answer = None, [], {}
        try:
            try:
                message = loads(data)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise BadRequest(f"channel message is not valid JSON: {exc}") from None
            if not isinstance(message, dict):
                raise BadRequest("a channel message must be a JSON object")
            seq = message.get("seq")
            if len(data) > self.limit:
                raise web.HTTPRequestEntityTooLarge(max_size=self.limit, actual_size=len(data))
            taken, answer = await self._serve(message)
        except Exception as exc:  # noqa: BLE001 - answered as the HTTP route would answer it
            status, text, _ = error_for(exc)
            if status == 500:
                log.exception("unhandled error on the job channel of %s", self.worker)
            answer = {"error": text, "status": status}
        answer["seq"] = seq
        try:
            if not self._open():
                raise ConnectionResetError("the worker left before its jobs were handed over")
            await self.socket.send_str(json.dumps(answer))
        except ConnectionResetError:
            if taken:
                await asyncio.shield(self.gateway.give_back(self.endpoint, self.worker, taken))

    async def _serve(self, message: dict[str, Any]) -> tuple[list[JobRecord], dict[str, Any]]:
        take = message.get("take", 0)
        if type(take) is not int or not 0 <= take <= MAX_BATCH:
            raise BadRequest(f"take must be an integer between 0 and {MAX_BATCH}")
        if "done" in message:
            job_id, body = message["done"], message.get("result")
            if not isinstance(job_id, str) or not job_id:
                raise BadRequest("done must be a job id")
            if not isinstance(body, dict):
                raise BadRequest("result must be a JSON object")
            delivery = message.get("delivery")
            if delivery is not None and type(delivery) is not int:
                raise BadRequest("delivery must be an integer")
            posted = ResultPost(job_id, body, message.get("isStream") is True, delivery)
            outcome, taken = await self.gateway.done_and_take(
                self.endpoint,
                self.worker,
                posted,
                take,
                self.capacity,
                connected=self._open,
                instance=self.instance,
            )
            return taken, {"result": outcome, "jobs": [take_payload(job) for job in taken]}
        if not take:
            raise BadRequest('a channel message carries "done" (a result) or "take" (1 or more)')
        hold = self.gateway.timings.take_hold
        taken = await self.gateway.take(
            self.endpoint, self.worker, take, hold, self.capacity, self._open, self.instance
        )
        return taken, {"jobs": [take_payload(job) for job in taken]}


async def job_channel(request: web.Request) -> web.StreamResponse:
    """The job channel's WebSocket (see `JobChannel`), authenticated as the worker routes."""
    endpoint = request[ENDPOINT]
    # Frames up to twice the limit are read (and answered 413 above it); larger ones close it.
    largest = 2 * (request.app[MAX_BODY] + CHANNEL_ENVELOPE)
    socket = web.WebSocketResponse(
        heartbeat=CHANNEL_HEARTBEAT_S, max_msg_size=largest, compress=False
    )
    if not socket.can_prepare(request).ok:
        raise BadRequest("job-channel is a WebSocket: connect with Upgrade: websocket")
    channel = JobChannel(request, socket, endpoint)
    await socket.prepare(request)
    open_channels = request.app[METRICS].channels.labels(endpoint)
    open_channels.inc()
    request.app[CHANNELS].add(socket)
    try:
        async for message in socket:
            if message.type == web.WSMsgType.TEXT:
                channel.receive(message.data)
            elif message.type == web.WSMsgType.BINARY:
                await socket.send_str(
                    json.dumps({"seq": None, "error": "send text frames (JSON)", "status": 400})
                )
    finally:
        request.app[CHANNELS].discard(socket)
        open_channels.dec()
        await channel.close()
    return socket


async def _close_channels(app: web.Application) -> None:
    """Shutting down: workers reconnect to another replica (their takes end here now)."""
    for socket in list(app[CHANNELS]):
        await socket.close(code=WSCloseCode.GOING_AWAY, message=b"gateway shutting down")


# -- admin routes ------------------------------------------------------------------------------
def summary(config: EndpointConfig) -> EndpointSummary:
    fields = config.model_dump(exclude={"workerToken", "workerTokenSha256", "clientKeys"})
    return EndpointSummary(
        **fields,
        clientKeys=[key.id for key in config.clientKeys],
        workerTokens=len(config.workerTokenSha256),
    )


def admin_endpoint_id(request: web.Request) -> str:
    value = request.match_info["endpoint"]
    if not ENDPOINT_ID.match(value):
        raise BadRequest(
            f"endpoint id '{value}' is invalid: use letters, digits, '.', '_' and '-' "
            "(at most 253 characters, starting and ending with a letter or digit)"
        )
    return value


async def put_endpoint(request: web.Request) -> web.Response:
    endpoint = admin_endpoint_id(request)
    data = await json_body(request)
    if isinstance(data, dict) and data.get("id") not in (None, endpoint):
        raise BadRequest(f"body id '{data['id']}' does not match the URL's '{endpoint}'")
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    config = parse_model(EndpointConfig, {**data, "id": endpoint})
    created = await request.app[GATEWAY].put_endpoint(config)
    return respond(summary(config), status=201 if created else 200)


async def get_endpoint(request: web.Request) -> web.Response:
    return respond(summary(await request.app[GATEWAY].endpoint(admin_endpoint_id(request))))


async def delete_endpoint(request: web.Request) -> web.Response:
    endpoint = admin_endpoint_id(request)
    await request.app[GATEWAY].delete_endpoint(endpoint)
    return web.json_response({"deleted": endpoint})


async def list_endpoints(request: web.Request) -> web.Response:
    configs = await request.app[GATEWAY].list_endpoints()
    return respond(EndpointList(endpoints=[summary(c) for c in configs]))


MAX_QUEUES_WAIT_S = 30


async def queues(request: web.Request) -> web.Response:
    """All endpoints' figures; `?wait=S&since=T` holds until a job is queued after T."""
    gateway = request.app[GATEWAY]
    wait = number_query(request, "wait", 0.0, 0, MAX_QUEUES_WAIT_S)
    since = number_query(request, "since", None, 0, float("inf"))
    figures = await gateway.queues_after(since, wait)
    return respond(QueuesView(endpoints=figures, time=gateway.clock()))


async def endpoint_queue(request: web.Request) -> web.Response:
    """One endpoint's figures, for KEDA's metrics-api scaler: admin key or its worker token."""
    return respond(await request.app[GATEWAY].queue(admin_endpoint_id(request)))


async def workers(request: web.Request) -> web.Response:
    records = await request.app[GATEWAY].workers(admin_endpoint_id(request))
    views = [
        WorkerView(id=w.id, state=w.state, jobs=sorted(w.jobs), lastSeen=w.last_seen)
        for w in records
    ]
    return web.json_response({"workers": [v.model_dump() for v in views]})


async def drain(request: web.Request) -> web.Response:
    endpoint = admin_endpoint_id(request)
    worker = request.match_info["worker"]
    draining = request.method == "POST"
    held = await request.app[GATEWAY].drain(endpoint, worker, draining)
    return respond(DrainResult(endpoint=endpoint, worker=worker, draining=draining, jobs=held))


async def admin_purge_queue(request: web.Request) -> web.Response:
    """`purge-queue` for the operator (a HandlerDeployment deleted with on-delete: purge), on
    any endpoint, also one whose client routes take no gateway key."""
    removed = await request.app[GATEWAY].purge(admin_endpoint_id(request))
    return respond(PurgeResult(removed=removed))


async def handler_problem(request: web.Request) -> web.Response:
    """PUT: the endpoint's workers fail (the operator's HandlerHealthy=False, `handlerctl
    dev`'s crash loop), told to clients waiting on its queued jobs; DELETE: they run again."""
    endpoint = admin_endpoint_id(request)
    gateway = request.app[GATEWAY]
    if request.method == "DELETE":
        await gateway.set_problem(endpoint, None)
    else:
        await gateway.set_problem(endpoint, parse_model(HandlerProblem, await json_body(request)))
    found = await gateway.problem(endpoint)
    return respond(HandlerProblemView(endpoint=endpoint, handlerProblem=found))


async def dead_letters(request: web.Request) -> web.Response:
    endpoint = admin_endpoint_id(request)
    found = await request.app[GATEWAY].dead_letters(endpoint)
    return respond(DeadLetterList(endpoint=endpoint, jobs=[job_view(job) for job in found]))


async def replay(request: web.Request) -> web.Response:
    endpoint = admin_endpoint_id(request)
    data = await json_body(request, required=False)
    body = parse_model(ReplayRequest, data if data is not None else {})
    replayed = await request.app[GATEWAY].replay(endpoint, body.ids)
    return respond(ReplayResult(replayed=replayed))


# -- service routes ----------------------------------------------------------------------------
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    try:
        await request.app[GATEWAY].ready()
    except BackendUnavailable as exc:
        return error(503, f"queue backend unavailable: {exc}", **{"Retry-After": "1"})
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    text = request.app[METRICS].render(await gateway.queues())
    return web.Response(body=text, content_type="text/plain", charset="utf-8")


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(document())


@dataclass(frozen=True)
class Route:
    """A route of one audience (its path under the audience's prefix), with what the OpenAPI
    document says of it: documentation cannot drift from what is served."""

    method: str
    path: str
    handler: Handler
    summary: str
    request: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    admission: str = FIRST  # client routes: when the request counts against the rate limit
    auth: Auth | None = None  # the check, when not its audience's (AUDIENCE_CHECKS)


CLIENT_ROUTES = [
    Route("POST", "run", run, "Queue a job", RunRequest, JobView, admission=WITH_CREATE),
    Route(
        "POST",
        "runsync",
        runsync,
        "Queue a job and wait (bounded) for its end",
        RunRequest,
        JobView,
        admission=WITH_CREATE,
    ),
    Route(
        "GET", "status/{job}", status, "A job's status and result", None, JobView, admission=READ
    ),
    Route(
        "POST",
        "status/{job}",
        status,
        "A job's status and result (as GET)",
        None,
        JobView,
        admission=READ,
    ),
    Route(
        "GET",
        "status-sync/{job}",
        status_sync,
        "A job's status, waiting up to wait ms for its end",
        None,
        JobView,
        admission=READ,
    ),
    Route(
        "POST",
        "status-sync/{job}",
        status_sync,
        "A job's status, waiting up to wait ms for its end (as GET)",
        None,
        JobView,
        admission=READ,
    ),
    Route(
        "GET",
        "stream/{job}",
        stream,
        "New stream chunks of a job",
        None,
        StreamView,
        admission=READ,
    ),
    Route(
        "POST",
        "stream/{job}",
        stream,
        "New stream chunks of a job (as GET)",
        None,
        StreamView,
        admission=READ,
    ),
    Route("POST", "cancel/{job}", cancel, "Cancel a job", None, JobView),
    Route(
        "POST", "retry/{job}", retry, "Re-queue a FAILED, TIMED_OUT or CANCELLED job", None, JobView
    ),
    Route("POST", "purge-queue", purge_queue, "Cancel every queued job", None, PurgeResult),
    Route("GET", "health", health, "Job and worker counts", None, Health, admission=READ),
    Route(
        "GET",
        "jobs",
        list_jobs,
        "The endpoint's jobs kept (within their ttl), newest first; ?status=&limit=&cursor=",
        None,
        JobList,
        admission=READ,
    ),
]
WORKER_ROUTES = [
    Route("GET", "job-take/{worker}", job_take, "Long-poll for one job (204: none)"),
    Route(
        "GET",
        "job-take-batch/{worker}",
        job_take_batch,
        "Long-poll for up to batch_size jobs (204: none)",
    ),
    Route("GET", "job-stop/{worker}", job_stop, "Long-poll for jobs to stop (204: none)"),
    Route(
        "POST",
        "job-done/{worker}/{job}",
        job_done,
        "Post a result or progress (take=N: then long-poll for up to N jobs, answered in jobs)",
    ),
    Route("POST", "job-stream/{worker}/{job}", job_stream, "Post one stream chunk"),
    Route("GET", "ping/{worker}", ping, "Worker heartbeat (job_id: running jobs)"),
    Route(
        "POST",
        "leave/{worker}",
        leave,
        "A worker shuts down: its long-polls end now, it gets no new job",
    ),
    Route(
        "GET",
        "job-channel/{worker}",
        job_channel,
        "WebSocket (ours): takes and results as JSON frames with a seq, each answered once",
    ),
]
ADMIN_ROUTES = [
    Route("GET", "endpoints", list_endpoints, "List endpoints", None, EndpointList),
    Route(
        "PUT",
        "endpoints/{endpoint}",
        put_endpoint,
        "Create or update an endpoint",
        EndpointConfig,
        EndpointSummary,
    ),
    Route("GET", "endpoints/{endpoint}", get_endpoint, "One endpoint", None, EndpointSummary),
    Route("DELETE", "endpoints/{endpoint}", delete_endpoint, "Delete an endpoint and its jobs"),
    Route("GET", "endpoints/{endpoint}/workers", workers, "Workers of an endpoint"),
    Route(
        "GET",
        "endpoints/{endpoint}/queue",
        endpoint_queue,
        "Queue figures of one endpoint (KEDA metrics-api; admin key or the worker token)",
        None,
        QueueFigures,
        auth=authorize_admin_or_worker,
    ),
    Route(
        "POST",
        "endpoints/{endpoint}/workers/{worker}/drain",
        drain,
        "Stop giving jobs to a worker",
        None,
        DrainResult,
    ),
    Route(
        "DELETE",
        "endpoints/{endpoint}/workers/{worker}/drain",
        drain,
        "Undo a drain",
        None,
        DrainResult,
    ),
    Route(
        "POST",
        "endpoints/{endpoint}/purge-queue",
        admin_purge_queue,
        "Cancel every queued job (the admin's purge-queue, on any endpoint)",
        None,
        PurgeResult,
    ),
    Route(
        "PUT",
        "endpoints/{endpoint}/handler-problem",
        handler_problem,
        "The endpoint's workers fail: queued jobs' status and health say why",
        HandlerProblem,
        HandlerProblemView,
    ),
    Route(
        "DELETE",
        "endpoints/{endpoint}/handler-problem",
        handler_problem,
        "The endpoint's workers run again",
        None,
        HandlerProblemView,
    ),
    Route(
        "GET", "endpoints/{endpoint}/dlq", dead_letters, "Dead-lettered jobs", None, DeadLetterList
    ),
    Route(
        "POST",
        "endpoints/{endpoint}/dlq/replay",
        replay,
        "Re-queue dead-lettered jobs",
        ReplayRequest,
        ReplayResult,
    ),
    Route(
        "GET",
        "queues",
        queues,
        "Queue figures of all endpoints (the autoscaler's one call); ?wait=S&since=T holds up to S seconds until a job is queued after T",
        None,
        QueuesView,
    ),
]
PREFIXES = {"client": "/v2/{endpoint}/", "worker": "/v2/{endpoint}/", "admin": "/admin/v1/"}
AUDIENCE_CHECKS: dict[str, Callable[..., Awaitable[str | None]]] = {
    "client": authorize_client,
    "worker": authorize_worker,
    "admin": authorize_admin,
}
ROUTES = {"client": CLIENT_ROUTES, "worker": WORKER_ROUTES, "admin": ADMIN_ROUTES}
OPERATIONS = tuple(
    Operation(r.method, PREFIXES[audience] + r.path, r.summary, audience, r.request, r.response)
    for audience, table in ROUTES.items()
    for r in table
)


def document() -> dict[str, Any]:
    """The OpenAPI document of the routes above."""
    return build_openapi(OPERATIONS)


async def _start_sweeper(app: web.Application) -> None:
    if app[RUN_SWEEPER]:
        app[SWEEPER] = asyncio.get_running_loop().create_task(app[GATEWAY].run_sweeper())
    if app[KEYS].client_files or app[KEYS].admin_files:
        app[KEY_RELOADER] = asyncio.get_running_loop().create_task(_reload_keys(app[KEYS]))


async def _reload_keys(keys: Keys) -> None:
    """Key files are checked for changes every KEY_RELOAD_S (a stat each); whatever goes
    wrong is logged and the keys stay as they were (never a silent end of rotations)."""
    while True:
        await asyncio.sleep(KEY_RELOAD_S)
        try:
            keys.reload()
        except Exception:
            log.exception("re-reading the key files failed; the keys stay as they were")


async def _stop(app: web.Application) -> None:
    app[GATEWAY].stopping = True
    if KEY_RELOADER in app:
        app[KEY_RELOADER].cancel()
    if SWEEPER in app:
        app[SWEEPER].cancel()
        await asyncio.wait([app[SWEEPER]], timeout=5)
    await app[WEBHOOKS].close()
    await app[GATEWAY].backend.close()


def _check(audience: str, route: Route) -> Auth:
    check = AUDIENCE_CHECKS[audience]
    if audience == "client":
        return functools.partial(check, admission=route.admission)
    return check


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every route of the tables is checked here, before its handler runs, as its audience (or
    its own `auth`) says; the handler finds its endpoint in `request[ENDPOINT]`. Other routes
    (public ones, `handlerctl dev`'s) check for themselves."""
    check = request.app[CHECKS].get(request.match_info.route)
    if check is not None:
        endpoint = await check(request)
        if endpoint is not None:
            request[ENDPOINT] = endpoint
    return await handler(request)


def create_app(
    backend: Backend,
    keys: Keys,
    timings: Timings | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    run_sweeper: bool = True,
) -> web.Application:
    """The gateway application on `backend` (closed with the app)."""
    app = web.Application(
        middlewares=[errors_middleware, auth_middleware], client_max_size=max_body
    )
    gateway_metrics = GatewayMetrics()
    webhooks = WebhookSender(job_view_dict)
    app[METRICS] = gateway_metrics
    app[WEBHOOKS] = webhooks
    app[GATEWAY] = Gateway(backend, timings, observers=[gateway_metrics, webhooks])
    app[KEYS] = keys
    app[RUN_SWEEPER] = run_sweeper
    app[MAX_BODY] = max_body
    app[CHANNELS] = set()
    checks: dict[web.AbstractRoute, Auth] = {}
    for audience, table in ROUTES.items():
        for route in table:
            added = app.router.add_route(
                route.method, PREFIXES[audience] + route.path, route.handler
            )
            checks[added] = route.auth or _check(audience, route)
    app[CHECKS] = checks
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    app.on_startup.append(_start_sweeper)
    app.on_shutdown.append(_close_channels)
    app.on_cleanup.append(_stop)
    return app
