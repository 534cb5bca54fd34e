"""Many teams on one gateway, through the unmodified runpod client and worker: keys scoped to
an endpoint, the refusal of a global key where callers' code runs, per-key rate limits, and
low-priority jobs waiting behind normal ones."""

from __future__ import annotations

import pytest
import requests
import runpod

from handler_protocol.models import digest
from tests.e2e.conftest import TOKEN
from tests.processes import http_json

TEAM_KEY = "team-a-key-0123456789abcdef"
OTHER_KEY = "team-b-key-0123456789abcdef"


def scoped(gateway, **config) -> None:
    keys = [
        {"id": "team-a/keys/ci", "sha256": digest(TEAM_KEY)},
        {"id": "team-b/keys/ci", "sha256": digest(OTHER_KEY), "scope": "namespace"},
    ]
    gateway.register("ep", TOKEN, namespace="team-a", clientKeys=keys[:1], **config)
    gateway.register("other", TOKEN + "-other", namespace="team-b", clientKeys=keys[1:])


def refusal(call) -> requests.Response:
    with pytest.raises(requests.HTTPError) as refused:
        call()
    return refused.value.response


def test_a_key_scoped_to_the_endpoint_runs_jobs_and_another_teams_key_gets_403(
    endpoint, workers, gateway, monkeypatch
):
    scoped(gateway)
    workers("handlers.echo_async")
    monkeypatch.setattr(runpod, "api_key", TEAM_KEY)
    assert runpod.Endpoint("ep").run_sync({"n": 1}, timeout=60)["echo"] == {"n": 1}
    monkeypatch.setattr(runpod, "api_key", OTHER_KEY)
    response = refusal(lambda: runpod.Endpoint("ep").run({"n": 2}))
    assert response.status_code == 403
    assert "'team-b/keys/ci' may not call this route" in response.json()["error"]


def test_a_global_key_cannot_run_code_on_an_endpoint_that_runs_callers_code(endpoint, gateway):
    scoped(gateway, runsCallerCode=True)
    response = refusal(lambda: endpoint.run({"function_name": "anything"}))
    assert response.status_code == 403
    assert "runs code its callers send" in response.json()["error"]
    assert endpoint_queue(gateway)["inQueue"] == 0


def endpoint_queue(gateway) -> dict:
    status, body = http_json("GET", f"{gateway.url}/admin/v1/endpoints/ep/queue")
    assert status == 200
    return body


def test_a_caller_over_its_rate_gets_429_with_retry_after(endpoint, gateway):
    scoped(gateway, rateLimit={"requestsPerSecond": 0.2, "burst": 2})
    endpoint.run({"n": 1})
    endpoint.run({"n": 2})
    response = refusal(lambda: endpoint.run({"n": 3}))
    assert response.status_code == 429 and int(response.headers["Retry-After"]) >= 1
    assert "rate limit" in response.json()["error"]
    assert endpoint_queue(gateway)["inQueue"] == 2  # nothing of the refused one remains


def started_at(job) -> float:
    return job["createdAt"] + job["delayTime"] / 1000


def test_low_priority_jobs_wait_behind_normal_ones(endpoint, workers, gateway):
    """Submitted first, the low-priority job starts last: the worker takes normal jobs while
    any waits (RunPod's policy.lowPriority)."""
    low = endpoint.run({"input": {"sleep": 0.2, "n": "low"}, "policy": {"lowPriority": True}})
    normal = [endpoint.run({"sleep": 0.2, "n": n}) for n in range(2)]
    assert endpoint_queue(gateway)["lowPriorityQueued"] == 1
    workers("handlers.echo_async")
    for job in (low, *normal):
        job.output(timeout=60)
    status, listing = http_json("GET", f"{gateway.url}/v2/ep/jobs?status=COMPLETED")
    assert status == 200
    by_id = {job["id"]: job for job in listing["jobs"]}
    assert by_id[low.job_id]["lowPriority"] is True
    starts = sorted(by_id, key=lambda job_id: started_at(by_id[job_id]))
    assert starts[-1] == low.job_id
