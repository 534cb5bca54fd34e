"""Retries of jobs whose handler failed (`retryOnError`, opt-in, per endpoint or per job): the
failed run is kept, the job waits out its backoff outside the queue, runs again, and each
attempt shows in `status` and the listing; on every backend."""

from __future__ import annotations

import json

import pytest

from handler_gateway import jobs

T0 = 1_800_000_000.0
RETRY = {"maxAttempts": 3, "backoffSeconds": 10, "maxBackoffSeconds": 60}


def sdk_error(kind: str, message: str) -> dict:
    """A handler exception as the runpod SDK posts it."""
    return {"error": json.dumps({"error_type": f"<class '{kind}'>", "error_message": message})}


@pytest.fixture
def clock(api):
    """The gateway's clock, moved by hand (jobs, backoffs and sweeps all read it)."""
    now = [T0]
    api.gateway.clock = lambda: now[0]
    return now


async def queued(api) -> list[str]:
    """The ids a worker's take would find (a take itself would wait on the frozen clock)."""
    return await api.gateway.backend.queued_job_ids(api.endpoint, 10)


async def figures(api) -> dict:
    response = await api.client.get("/admin/v1/queues", headers=api.admin_headers())
    return (await response.json())["endpoints"][api.endpoint]


async def submit(api, retry: dict | None = RETRY, **policy) -> str:
    extra = {"policy": {"retryOnError": retry, **policy}} if retry else {}
    return await api.run({"n": 1}, **extra)


async def fail(api, job_id: str, body: dict | None = None, worker: str = "w1") -> None:
    taken = await api.take(worker)
    assert taken is not None and taken["id"] == job_id
    await api.done(worker, job_id, body or sdk_error("ValueError", "bad input"))


async def test_a_failed_run_waits_its_backoff_then_runs_again_and_completes(api, clock):
    job_id = await submit(api)
    await fail(api, job_id)
    view = await api.status(job_id)
    assert view["status"] == "IN_QUEUE" and view["attempt"] == 2
    assert view["attempts"][0]["attempt"] == 1 and "bad input" in view["attempts"][0]["error"]
    assert T0 + 5 <= view["retryAt"] <= T0 + 10  # 10 s, its second half jittered
    waiting = await figures(api)  # queued, but no worker could take it: it brings none
    assert (waiting["inQueue"], waiting["retriesWaiting"], waiting["load"]) == (1, 1, 0)
    clock[0] = T0 + 4
    await api.gateway.sweep()
    assert await queued(api) == []  # not due yet: no worker can get it
    clock[0] = T0 + 10.5
    await api.gateway.sweep()
    released = await figures(api)
    assert (released["inQueue"], released["retriesWaiting"], released["load"]) == (1, 0, 1)
    taken = await api.take("w2")
    assert taken["id"] == job_id
    await api.done("w2", job_id, {"output": {"ok": True}})
    done = await api.status(job_id)
    assert done["status"] == "COMPLETED" and done["output"] == {"ok": True}
    assert done["attempt"] == 2 and len(done["attempts"]) == 1 and "retryAt" not in done
    listed = await api.client.get(f"/v2/{api.endpoint}/jobs", headers=api.client_headers())
    assert (await listed.json())["jobs"][0]["attempt"] == 2
    health = await api.health()
    assert health["jobs"]["completed"] == 1 and health["jobs"]["failed"] == 0


async def test_the_last_attempt_fails_the_job_with_every_attempt_shown(api, clock):
    job_id = await submit(api, {**RETRY, "maxAttempts": 2, "backoffSeconds": 0})
    await fail(api, job_id)
    await api.gateway.sweep()
    await fail(api, job_id, sdk_error("ValueError", "still bad"))
    view = await api.status(job_id)
    assert view["status"] == "FAILED" and "still bad" in view["error"]
    assert view["attempt"] == 2 and [a["attempt"] for a in view["attempts"]] == [1]
    assert (await api.health())["jobs"]["failed"] == 1


@pytest.mark.parametrize(
    ("error_types", "body", "retried"),
    [
        (["OutOfMemoryError"], sdk_error("torch.cuda.OutOfMemoryError", "CUDA OOM"), True),
        (["torch.cuda.OutOfMemoryError"], sdk_error("torch.cuda.OutOfMemoryError", "x"), True),
        (["OutOfMemoryError"], sdk_error("ValueError", "bad input"), False),
        (["OutOfMemoryError"], {"error": "the handler said no"}, False),
        (None, {"error": "the handler said no"}, True),
        (["TimeoutError"], {"error": "x", "output": {"error_type": "TimeoutError"}}, True),
    ],
    ids=["short-name", "full-name", "other-type", "no-type", "any-error", "generic-handler"],
)
async def test_only_the_named_error_types_are_retried(api, clock, error_types, body, retried):
    job_id = await submit(api, {**RETRY, "errorTypes": error_types})
    await fail(api, job_id, body)
    assert (await api.status(job_id))["status"] == ("IN_QUEUE" if retried else "FAILED")


async def test_a_retry_waiting_can_be_cancelled_or_purged_and_never_runs(api, clock):
    cancelled, purged = await submit(api), await submit(api)
    await fail(api, cancelled)
    await fail(api, purged)
    response = await api.client.post(
        f"/v2/{api.endpoint}/cancel/{cancelled}", headers=api.client_headers()
    )
    assert (await response.json())["status"] == "CANCELLED"
    response = await api.client.post(
        f"/v2/{api.endpoint}/purge-queue", headers=api.client_headers()
    )
    assert (await response.json())["removed"] == 1
    clock[0] = T0 + 3600
    await api.gateway.sweep()
    assert await queued(api) == []
    assert (await api.health())["jobs"]["inQueue"] == 0
    assert await api.gateway.backend.due_retries(api.endpoint, clock[0], 10) == []


async def test_the_endpoint_default_applies_and_a_jobs_policy_overrides_it(api, clock):
    await api.register(retryOnError={"maxAttempts": 2, "backoffSeconds": 0})
    api.gateway._endpoints.clear()
    by_endpoint = await submit(api, retry=None)
    await fail(api, by_endpoint)
    assert (await api.status(by_endpoint))["status"] == "IN_QUEUE"
    await api.gateway.sweep()
    await api.take("w1")  # the retry, taken out of the way
    own = await submit(api, {"maxAttempts": 2, "errorTypes": ["OutOfMemoryError"]})
    await fail(api, own, worker="w3")
    assert (await api.status(own))["status"] == "FAILED"  # its own policy: not that type


async def test_a_manual_retry_starts_the_attempts_afresh(api, clock):
    job_id = await submit(api, {**RETRY, "maxAttempts": 2, "backoffSeconds": 0})
    await fail(api, job_id)
    await api.gateway.sweep()
    await fail(api, job_id)
    response = await api.client.post(
        f"/v2/{api.endpoint}/retry/{job_id}", headers=api.client_headers()
    )
    assert (await response.json())["status"] == "IN_QUEUE"
    view = await api.status(job_id)
    assert "attempts" not in view  # a fresh start: two more runs if they fail


@pytest.mark.parametrize(
    ("attempt", "jitter", "expected"),
    [(1, 0.0, 5.0), (1, 0.999999, 10.0), (2, 0.0, 10.0), (3, 0.5, 30.0), (9, 0.0, 30.0)],
)
def test_the_backoff_doubles_to_its_cap_with_half_of_it_jittered(attempt, jitter, expected):
    delay = jobs.retry_delay(RETRY, attempt, jitter)
    assert delay == pytest.approx(expected, abs=1e-4)


def test_a_retry_is_released_only_when_due_and_only_once():
    """The sweeper's transition: a retry waiting for a later time (a sweep that read an older
    list) is left alone; a released one is no longer waiting."""
    job = jobs.JobRecord(
        id="j", endpoint="ep", created_at=T0, execution_timeout_s=60, ttl_s=3600, max_retries=1,
        extra={"retryOnError": RETRY, "attempts": [{"attempt": 1}], "retryAt": T0 + 10},
    )  # fmt: skip
    assert jobs.release_retry(job, T0 + 5) is None
    released = jobs.release_retry(job, T0 + 10)
    assert released is not None and released.effects.enqueue and released.effects.undelay
    assert jobs.release_retry(released.job, T0 + 11) is None
    assert released.effects.counters == {"retryWaiting": -1}
