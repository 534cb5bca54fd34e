"""The job record and its state machine: pure transitions that return the new record + effects.

No I/O. Backends persist a `Change` atomically (record, queue, counters, signals); the
operations layer decides which transition to apply. Times are unix seconds (floats).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from handler_protocol.statuses import RETRYABLE, TERMINAL, JobStatus

# Counter names (kept per endpoint). inQueue/inProgress are gauges, the rest only grow.
STATUS_COUNTERS = {
    JobStatus.IN_QUEUE: "inQueue",
    JobStatus.IN_PROGRESS: "inProgress",
    JobStatus.COMPLETED: "completed",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "cancelled",
    JobStatus.TIMED_OUT: "timedOut",
}
# inQueueLow: the queued jobs (counted in inQueue too) that are low priority.
COUNTERS = (
    *STATUS_COUNTERS.values(),
    "inQueueLow",
    "retried",
    "ignoredResults",
    "deadLettered",
    "workerRefreshes",
    "retriedOnError",
    "retryWaiting",
)

# Errors the gateway itself puts on jobs.
LOST_WORKER_ERROR = "worker {worker} stopped sending heartbeats while running the job"
RETRIES_EXHAUSTED_ERROR = (
    "job failed: its worker was lost {attempts} times (maxRetries={max_retries}); "
    "moved to the dead-letter queue"
)
EXECUTION_TIMEOUT_ERROR = "job exceeded its execution timeout of {seconds:g} s"
TTL_EXPIRED_ERROR = "job expired in the queue after its ttl of {seconds:g} s"
# Terminal records stay readable at least this long, even when their ttl has passed.
MIN_RESULT_RETENTION_S = 60.0


class JobRecord(BaseModel):
    """Everything the gateway knows about one job (stored as JSON by the backends)."""

    model_config = ConfigDict(populate_by_name=True)

    id: str
    endpoint: str
    status: JobStatus = JobStatus.IN_QUEUE
    input: Any = None
    webhook: str | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    heartbeat_at: float | None = None
    worker_id: str | None = None
    output: Any = None
    progress: Any = None
    error: Any = None
    redeliveries: int = 0
    execution_timeout_s: float
    ttl_s: float
    max_retries: int
    stream_cursor: int = 0
    deliveries: int = 0  # times a worker took it; the last is the delivery id a result echoes
    stop_pod: bool = False
    extra: dict[str, Any] = Field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def low_priority(self) -> bool:
        """`policy.lowPriority`: queued apart, taken only when no other job waits, and no
        reason to scale up on its own."""
        return bool(self.extra.get("lowPriority"))

    @property
    def attempt(self) -> int:
        """The run the job is on: 1, then one more per retry after a handler error."""
        return len(self.extra.get("attempts") or []) + 1

    @property
    def retry_at(self) -> float | None:
        """When a retry waiting (IN_QUEUE, not in the queue yet) joins the queue."""
        value = self.extra.get("retryAt")
        return float(value) if value is not None else None

    @property
    def expires_at(self) -> float:
        """When the record may be deleted (terminal records are kept a minimum time)."""
        by_ttl = self.created_at + self.ttl_s
        if self.finished_at is not None:
            return max(by_ttl, self.finished_at + MIN_RESULT_RETENTION_S)
        return by_ttl

    def delay_ms(self) -> int | None:
        if self.started_at is None:
            return None
        return int(round((self.started_at - self.created_at) * 1000))

    def execution_ms(self) -> int | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return int(round((self.finished_at - self.started_at) * 1000))


@dataclass
class Effects:
    """What must happen atomically together with storing the new record."""

    enqueue: bool = False  # (re)append the job to its endpoint's queue
    to_head: bool = False  # with enqueue: at the queue's head (it was handed out before)
    stop_worker: str | None = None  # tell this worker (job-stop) to stop the job
    release_worker: str | None = None  # the job no longer belongs to this worker
    assign_worker: str | None = None  # the job now runs on this worker
    activity: bool = False  # record "now" as the endpoint's last activity (scale-to-zero clock)
    dead_letter: bool = False  # append to the endpoint's dead-letter list
    undead_letter: bool = False  # remove from the dead-letter list
    delay_until: float | None = None  # a retry: into the endpoint's delayed jobs until then
    undelay: bool = False  # out of the delayed jobs (its retry is due, or it ended)
    counters: dict[str, int] = field(default_factory=dict)

    def count(self, name: str, delta: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + delta


@dataclass
class Change:
    """A transition's result: the new record and what has to happen with it."""

    job: JobRecord
    effects: Effects = field(default_factory=Effects)
    note: str = ""


def status_counter_deltas(old: JobStatus | None, new: JobStatus) -> dict[str, int]:
    """Counter deltas of moving a job from `old` (None: new job) to `new`."""
    deltas: dict[str, int] = {}
    if old == new:
        return deltas
    if old in (JobStatus.IN_QUEUE, JobStatus.IN_PROGRESS):
        deltas[STATUS_COUNTERS[old]] = -1
    if new in (JobStatus.IN_QUEUE, JobStatus.IN_PROGRESS) or new in TERMINAL:
        deltas[STATUS_COUNTERS[new]] = deltas.get(STATUS_COUNTERS[new], 0) + 1
    return deltas


def _change(
    old: JobRecord, new: JobRecord, effects: Effects | None = None, note: str = ""
) -> Change:
    effects = effects or Effects()
    for name, delta in status_counter_deltas(old.status, new.status).items():
        effects.count(name, delta)
    if new.low_priority and old.status != new.status == JobStatus.IN_QUEUE:
        effects.count("inQueueLow")
    if old.low_priority and new.status != old.status == JobStatus.IN_QUEUE:
        effects.count("inQueueLow", -1)
    if old.retry_at is not None and new.status != JobStatus.IN_QUEUE:
        effects.undelay = True  # a retry that waited ended otherwise (cancelled, expired)
    if effects.undelay and not old.low_priority:
        effects.count("retryWaiting", -1)  # queued, but no worker could take it meanwhile
    return Change(new, effects, note)


def new_job(
    job_id: str,
    endpoint: str,
    job_input: Any,
    now: float,
    *,
    execution_timeout_s: float,
    ttl_s: float,
    max_retries: int,
    webhook: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Change:
    job = JobRecord(
        id=job_id,
        endpoint=endpoint,
        input=job_input,
        webhook=webhook,
        created_at=now,
        execution_timeout_s=execution_timeout_s,
        ttl_s=ttl_s,
        max_retries=max_retries,
        extra=extra or {},
    )
    effects = Effects(enqueue=True, activity=True)
    effects.count("inQueue")
    if job.low_priority:
        effects.count("inQueueLow")
    return Change(job, effects, "submitted")


def start(job: JobRecord, worker: str, now: float) -> Change | None:
    """A worker took the job. None when it is no longer queued (cancelled, purged, expired)."""
    if job.status != JobStatus.IN_QUEUE:
        return None
    if now >= job.created_at + job.ttl_s:
        return expire_in_queue(job, now)
    new = job.model_copy(
        update={
            "status": JobStatus.IN_PROGRESS,
            "started_at": now,
            "heartbeat_at": now,
            "worker_id": worker,
            "deliveries": job.deliveries + 1,
        }
    )
    return _change(job, new, Effects(assign_worker=worker, activity=True), "started")


def expire_in_queue(job: JobRecord, now: float) -> Change | None:
    if job.status != JobStatus.IN_QUEUE or now < job.created_at + job.ttl_s:
        return None
    new = job.model_copy(
        update={
            "status": JobStatus.TIMED_OUT,
            "finished_at": now,
            "error": TTL_EXPIRED_ERROR.format(seconds=job.ttl_s),
        }
    )
    return _change(job, new, note="expired")


def runs_on(job: JobRecord, worker: str, delivery: int | None = None) -> bool:
    """Whether `job` runs on `worker` now, in delivery `delivery` when that is named (handler_worker
    echoes it; the SDK does not): what a result, progress, chunk or heartbeat must come from."""
    if job.status != JobStatus.IN_PROGRESS or job.worker_id != worker:
        return False
    return delivery is None or delivery == job.deliveries


def finish(
    job: JobRecord,
    worker: str,
    body: dict[str, Any],
    now: float,
    delivery: int | None = None,
    jitter: float = 0.5,
) -> Change | None:
    """A worker posted a final result. None when it must be ignored (stale or duplicate):
    `delivery`, echoed by handler_worker, fences off a result of an earlier delivery to the
    same worker name (it was presumed lost, and took the job again)."""
    if not runs_on(job, worker, delivery):
        return None
    error = body.get("error")
    output = body.get("output")
    update: dict[str, Any] = {
        "finished_at": now,
        "stop_pod": bool(body.get("stopPod")),
        "progress": None,
    }
    if error not in (None, ""):
        update.update(status=JobStatus.FAILED, error=error, output=output)
    else:
        update.update(status=JobStatus.COMPLETED, output=output)
    new = job.model_copy(update=update)
    effects = Effects(release_worker=worker, activity=True)
    if new.stop_pod:  # the handler asked for a fresh worker: it starts afresh (counted)
        effects.count("workerRefreshes")
    if new.status == JobStatus.FAILED and retries_on_error(job, body):
        return _retry_later(job, new, effects, now, jitter)
    return _change(job, new, effects, new.status.value.lower())


def error_type(body: dict[str, Any]) -> str:
    """The exception class of a failed run, as the runpod SDK reports it (`error` is a JSON
    text with `error_type` "<class 'module.Name'>") or the generic handler does (`output`'s
    `error_type`); "" for an error the handler returned itself."""
    output = body.get("output")
    if isinstance(output, dict) and isinstance(output.get("error_type"), str):
        return str(output["error_type"])
    error = body.get("error")
    info: Any = error
    if isinstance(error, str):
        try:
            info = json.loads(error)
        except ValueError:
            return ""
    found = info.get("error_type") if isinstance(info, dict) else None
    if not isinstance(found, str):
        return ""
    match = re.fullmatch(r"<class '([^']+)'>", found)
    return match.group(1) if match else found


def retries_on_error(job: JobRecord, body: dict[str, Any]) -> bool:
    """Whether a failed run is retried: the job's retry policy allows another attempt and
    names this error's type (or any)."""
    policy = job.extra.get("retryOnError")
    if not policy or job.attempt >= int(policy.get("maxAttempts", 1)):
        return False
    wanted = policy.get("errorTypes")
    if not wanted:
        return True
    found = error_type(body)
    return bool(found) and (found in wanted or found.rsplit(".", 1)[-1] in wanted)


def retry_delay(policy: dict[str, Any], attempt: int, jitter: float) -> float:
    """The wait before run `attempt + 1`: exponential, capped, its second half jittered
    (`jitter` in [0, 1))."""
    base = float(policy.get("backoffSeconds", 1.0)) * 2.0 ** max(0, attempt - 1)
    delay: float = min(float(policy.get("maxBackoffSeconds", 60.0)), base)
    return delay / 2 + delay / 2 * jitter


def _retry_later(
    job: JobRecord, failed: JobRecord, effects: Effects, now: float, jitter: float
) -> Change:
    """The failed run is kept in `attempts`; the job waits IN_QUEUE (out of the queue) for
    its next run until its retry is due (the sweeper then queues it: `release_retry`)."""
    attempts = [
        *(job.extra.get("attempts") or []),
        {"attempt": job.attempt, "error": failed.error, "workerId": job.worker_id,
         "finishedAt": now},
    ]  # fmt: skip
    retry_at = now + retry_delay(job.extra["retryOnError"], job.attempt, jitter)
    new = job.model_copy(
        update={
            "status": JobStatus.IN_QUEUE,
            "worker_id": None,
            "started_at": None,
            "heartbeat_at": None,
            "progress": None,
            "output": None,
            "error": None,
            "stop_pod": failed.stop_pod,
            "extra": {**job.extra, "attempts": attempts, "retryAt": retry_at},
        }
    )
    effects.delay_until = retry_at
    effects.count("retriedOnError")
    if not job.low_priority:  # (low-priority ones bring no worker anyway)
        effects.count("retryWaiting")
    return _change(job, new, effects, f"failed; retry {job.attempt + 1} at {retry_at:.3f}")


def release_retry(job: JobRecord, now: float) -> Change | None:
    """A retry whose time came joins the queue (at its tail). None when it no longer waits
    (cancelled, purged, expired): its delayed entry just goes."""
    if job.status != JobStatus.IN_QUEUE or job.retry_at is None or job.retry_at > now:
        return None  # no longer waiting, or waiting again for a later retry
    extra = {k: v for k, v in job.extra.items() if k != "retryAt"}
    new = job.model_copy(update={"extra": extra})
    return _change(job, new, Effects(enqueue=True, undelay=True), "retry queued")


def progress(
    job: JobRecord, worker: str, value: Any, now: float, delivery: int | None = None
) -> Change | None:
    """A progress update (`{"status": "IN_PROGRESS", "output": ...}`); never overwrites a result.
    The SDK's `progress_update` names no delivery; one that does is fenced as a result is."""
    if not runs_on(job, worker, delivery):
        return None
    return Change(job.model_copy(update={"progress": value, "heartbeat_at": now}), note="progress")


def heartbeat(job: JobRecord, worker: str, now: float, min_interval: float = 0.0) -> Change | None:
    """The worker is still on the job (ping, stream chunk); skipped when touched very recently."""
    if not runs_on(job, worker):
        return None
    if job.heartbeat_at is not None and now - job.heartbeat_at < min_interval:
        return None
    return Change(job.model_copy(update={"heartbeat_at": now}), note="heartbeat")


def cancel(job: JobRecord, now: float) -> Change | None:
    if job.terminal:
        return None
    new = job.model_copy(update={"status": JobStatus.CANCELLED, "finished_at": now})
    effects = Effects()
    if job.status == JobStatus.IN_PROGRESS and job.worker_id:
        effects.stop_worker = job.worker_id
        effects.release_worker = job.worker_id
    return _change(job, new, effects, "cancelled")


def purge(job: JobRecord, now: float) -> Change | None:
    """`purge-queue` removes a job still waiting in the queue; one a worker took meanwhile (or
    any other) is left alone."""
    if job.status != JobStatus.IN_QUEUE:
        return None
    new = job.model_copy(update={"status": JobStatus.CANCELLED, "finished_at": now})
    return _change(job, new, Effects(), "purged")


def time_out(job: JobRecord, now: float) -> Change | None:
    """Enforce the execution timeout of a running job (older SDKs never call job-stop)."""
    if job.status != JobStatus.IN_PROGRESS or job.started_at is None:
        return None
    if now < job.started_at + job.execution_timeout_s:
        return None
    new = job.model_copy(
        update={
            "status": JobStatus.TIMED_OUT,
            "finished_at": now,
            "error": EXECUTION_TIMEOUT_ERROR.format(seconds=job.execution_timeout_s),
        }
    )
    effects = Effects(stop_worker=job.worker_id, release_worker=job.worker_id)
    return _change(job, new, effects, "timed out")


def lose_worker(
    job: JobRecord, now: float, lost_after_s: float, seen_from: float = 0.0
) -> Change | None:
    """Re-queue a running job whose worker went silent; dead-letter it after maxRetries.
    `seen_from`: since when the gateway could see heartbeats (its start, the end of a backend
    outage): a silence before that is not the worker's."""
    if job.status != JobStatus.IN_PROGRESS:
        return None
    last = max(job.heartbeat_at or job.started_at or job.created_at, seen_from)
    if now - last < lost_after_s:
        return None
    return _redeliver(job, now)


def lose_restarted(job: JobRecord, worker: str, now: float) -> Change | None:
    """A job `worker` held when a new process started under its name: its process is gone, so
    the job is redelivered at once (as for a silent worker, without waiting for heartbeats)."""
    if not runs_on(job, worker):
        return None
    return _redeliver(job, now)


def _redeliver(job: JobRecord, now: float) -> Change:
    worker = job.worker_id
    attempts = job.redeliveries + 1
    effects = Effects(release_worker=worker)
    if attempts > job.max_retries:
        new = job.model_copy(
            update={
                "status": JobStatus.FAILED,
                "finished_at": now,
                "redeliveries": attempts,
                "error": RETRIES_EXHAUSTED_ERROR.format(
                    attempts=attempts, max_retries=job.max_retries
                ),
            }
        )
        effects.dead_letter = True
        effects.count("deadLettered")
        return _change(job, new, effects, f"dead-lettered (lost {worker})")
    new = _queued_again(
        job,
        progress=None,
        redeliveries=attempts,
        error=None,
        extra={**job.extra, "lastError": LOST_WORKER_ERROR.format(worker=worker)},
    )
    effects.enqueue = effects.to_head = True  # started before: ahead of the jobs queued since
    effects.count("retried")
    return _change(job, new, effects, f"re-queued (lost {worker})")


def _queued_again(job: JobRecord, **update: Any) -> JobRecord:
    """The job back in its queue, on no worker (plus `update`)."""
    fields = {"status": JobStatus.IN_QUEUE, "started_at": None, "heartbeat_at": None}
    return job.model_copy(update={**fields, "worker_id": None, **update})


def give_back(job: JobRecord, worker: str) -> Change | None:
    """A job claimed for `worker` whose take answer never reached it: queued again as it was
    (not a delivery: no retry counted, nothing ran)."""
    if not runs_on(job, worker):
        return None
    new = _queued_again(job)
    return _change(
        job,
        new,
        Effects(release_worker=worker, enqueue=True, to_head=True),
        f"given back by {worker}",
    )


def requeue(job: JobRecord, now: float, reset_attempts: bool) -> Change | None:
    """Client `retry` of a finished-unsuccessfully job, or an admin dead-letter replay."""
    if job.status not in RETRYABLE:
        return None
    new = _queued_again(
        job,
        created_at=now,
        finished_at=None,
        output=None,
        progress=None,
        error=None,
        stream_cursor=0,
        redeliveries=0 if reset_attempts else job.redeliveries,
        # a fresh start for its retries on error too
        extra={k: v for k, v in job.extra.items() if k not in ("attempts", "retryAt")},
    )
    effects = Effects(enqueue=True, undead_letter=True)
    effects.count("retried")
    return _change(job, new, effects, "retried")


def advance_cursor(job: JobRecord, start: int, cursor: int) -> Change | None:
    """A reader took the chunks from `start` to `cursor`: only if no other reader moved the
    shared cursor since it looked (each chunk goes to one reader)."""
    if job.stream_cursor != start or cursor <= start:
        return None
    return Change(job.model_copy(update={"stream_cursor": cursor}), note="stream read")
