"""Workers that go away, on every backend: a worker shutting down (SIGTERM → `leave`) has its
long-polls answered at once and is handed nothing more; a take whose caller left claims nothing,
and a job claimed for an answer that cannot be written goes straight back to the queue."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from handler_gateway import jobs, operations, routes
from handler_gateway.backends import BackendUnavailable
from handler_gateway.jobs import JobStatus
from handler_protocol.models import EndpointConfig, RunRequest
from tests.gateway.conftest import FAST

# Long-polls far longer than any wait below: a poll that ends did so because of a departure.
LONG = dataclasses.replace(FAST, take_hold=120.0, stop_hold=120.0)
ENDS_SOON = 30.0  # seconds: generous, and still a quarter of the hold


async def leave(api, worker: str) -> dict:
    response = await api.client.post(
        f"/v2/{api.endpoint}/leave/{worker}", headers=api.worker_headers()
    )
    assert response.status == 200, await response.text()
    return await response.json()


async def test_leave_answers_the_take_long_poll_and_hands_the_worker_nothing(make_api):
    api = await make_api(LONG)
    waiting = asyncio.create_task(api.take("w1"))
    await asyncio.sleep(0.2)
    assert await leave(api, "w1") == {"jobs": []}
    assert await asyncio.wait_for(waiting, ENDS_SOON) is None
    job_id = await api.run({"after": "leave"})
    assert await asyncio.wait_for(api.take("w1"), ENDS_SOON) is None
    assert (await api.status(job_id))["status"] == "IN_QUEUE"
    assert (await api.take("w2"))["id"] == job_id


async def test_leave_answers_the_stop_long_poll(make_api):
    api = await make_api(LONG)
    waiting = asyncio.create_task(
        api.client.get(f"/v2/{api.endpoint}/job-stop/w1", headers=api.worker_headers())
    )
    await asyncio.sleep(0.2)
    await leave(api, "w1")
    response = await asyncio.wait_for(waiting, ENDS_SOON)
    assert response.status == 204


async def test_a_leaving_worker_finishes_what_it_holds(api):
    job_id = await api.run({"n": 1})
    await api.take("w1")
    assert await leave(api, "w1") == {"jobs": [job_id]}
    assert await api.done("w1", job_id, {"output": "done"}) == {"result": "accepted"}
    view = await api.status(job_id)
    assert view["status"] == "COMPLETED" and view["output"] == "done"


async def test_leaving_expires_so_a_worker_back_under_its_name_is_served(api, monkeypatch):
    monkeypatch.setattr(operations, "LEAVING_MARGIN_S", 0.0)
    await leave(api, "w1")
    job_id = await api.run({})
    assert await api.take("w1") is None
    await asyncio.sleep(max(FAST.take_hold, FAST.stop_hold) + 0.2)
    assert (await api.take("w1"))["id"] == job_id


async def test_a_take_whose_caller_left_claims_nothing(make_api):
    api = await make_api(LONG)
    abandoned = asyncio.create_task(api.take("ghost"))
    await asyncio.sleep(0.2)
    abandoned.cancel()  # the worker's request is gone (timeout, killed pod, cut network)
    await asyncio.sleep(0.3)
    job_id = await api.run({"for": "a live worker"})
    await asyncio.sleep(FAST.recheck * 2)
    view = await api.status(job_id)
    assert view["status"] == "IN_QUEUE", view
    assert (await api.take("w2"))["id"] == job_id


async def test_a_job_whose_take_answer_cannot_be_written_goes_back(api, monkeypatch):
    """The caller leaves between the claim and the answer: the job is queued again at once,
    not a delivery (no retry counted), and the next worker gets it."""
    claimed = asyncio.Event()
    take = api.gateway.take

    async def claiming_take(*args, **kwargs):
        taken = await take(*args, **kwargs)
        claimed.set()
        return taken

    monkeypatch.setattr(api.gateway, "take", claiming_take)
    monkeypatch.setattr(routes, "_connected", lambda request: not claimed.is_set())
    job_id = await api.run({"n": 1})
    await api.take("gone")  # its answer never reaches the worker
    view = await api.status(job_id)
    assert view["status"] == "IN_QUEUE", view
    monkeypatch.setattr(routes, "_connected", lambda request: True)
    monkeypatch.setattr(api.gateway, "take", take)
    assert (await api.take("w2"))["id"] == job_id
    await api.done("w2", job_id, {"output": 1})
    assert (await api.status(job_id))["status"] == "COMPLETED"
    assert (await api.health())["jobs"].get("retried", 0) == 0


def test_give_back_is_not_a_delivery():
    queued = jobs.new_job("j1", "ep", {}, 0.0, execution_timeout_s=60, ttl_s=600, max_retries=2).job
    started = jobs.start(queued, "w1", 1.0).job
    back = jobs.give_back(started, "w1")
    assert back.job.status == JobStatus.IN_QUEUE and back.job.worker_id is None
    assert back.job.redeliveries == 0 and back.job.started_at is None
    assert back.effects.enqueue and back.effects.release_worker == "w1"
    assert jobs.give_back(started, "someone-else") is None
    assert jobs.give_back(queued, "w1") is None


@pytest.mark.parametrize("status", [JobStatus.COMPLETED, JobStatus.CANCELLED])
def test_give_back_leaves_finished_jobs_alone(status):
    job = jobs.new_job("j1", "ep", {}, 0.0, execution_timeout_s=60, ttl_s=600, max_retries=2).job
    assert (
        jobs.give_back(job.model_copy(update={"status": status, "worker_id": "w1"}), "w1") is None
    )


class Outage:
    """A backend that fails (BackendUnavailable) while `down`, as Redis does when unreachable."""

    def __init__(self, backend):
        self.backend, self.down = backend, False

    def __getattr__(self, name):
        attribute = getattr(self.backend, name)
        if not callable(attribute) or name.startswith("_") or name in ("notifier", "unseen_until"):
            return attribute

        async def call(*args, **kwargs):
            if self.down:
                raise BackendUnavailable("unreachable")
            return await attribute(*args, **kwargs)

        return call


async def test_an_outage_longer_than_the_heartbeat_window_redelivers_no_live_workers_job(
    make_backend,
):
    """Issue: after a Redis outage longer than the window, the jobs of live workers (whose
    pings failed meanwhile) were redelivered and ran twice. Their silence counts from its end."""
    now = [1_800_000_000.0]
    outage = Outage(make_backend())
    gateway = operations.Gateway(outage, FAST, clock=lambda: now[0])
    config = EndpointConfig(
        id="ep", workerToken="t" * 20, heartbeatIntervalSeconds=1, heartbeatMisses=3
    )
    await gateway.put_endpoint(config)
    job = await gateway.submit("ep", RunRequest(input={}))
    assert [j.id for j in await gateway.take("ep", "w1", 1, 0)] == [job.id]
    outage.down = True
    now[0] += 2
    with pytest.raises(BackendUnavailable):
        await gateway.sweep()
    now[0] += 20  # far past the 3 s window, all of it unseen
    outage.down = False
    assert await gateway.sweep() == []
    assert (await gateway.job("ep", job.id)).status == JobStatus.IN_PROGRESS
    now[0] += 2
    await gateway.ping("ep", "w1", [job.id])  # the live worker is heard again
    now[0] += 2.5
    assert await gateway.sweep() == []
    now[0] += 3.5  # and now it really is silent
    assert [c.note for c in await gateway.sweep()] == ["re-queued (lost w1)"]
    await outage.backend.close()
