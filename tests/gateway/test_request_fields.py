"""Every field a `run`/`runsync` request may carry acts, and nothing else is accepted: each
field of the request schema (and of its `policy`) has a check of its effect here, and a field
the schema does not know is refused with 400, never silently dropped."""

from __future__ import annotations

import pytest

from handler_protocol.models import Policy, RunRequest, S3Config

S3 = {
    "accessId": "AKIA-test",
    "accessSecret": "secret-test",
    "bucketName": "outputs",
    "endpointUrl": "https://s3.example.com",
}


async def submit(api, body: dict) -> str:
    response = await api.client.post(
        f"/v2/{api.endpoint}/run", json=body, headers=api.client_headers()
    )
    assert response.status == 200, await response.text()
    return (await response.json())["id"]


async def record(api, job_id: str):
    return await api.gateway.job(api.endpoint, job_id)


async def acts_input(api):
    await submit(api, {"input": {"prompt": "a cat"}})
    assert (await api.take())["input"] == {"prompt": "a cat"}


async def acts_webhook(api):
    await submit(api, {"input": 1, "webhook": "https://hooks.example.com/done"})
    assert (await api.take())["webhook"] == "https://hooks.example.com/done"


async def acts_policy(api):  # a container: its fields each have their own check
    await submit(api, {"input": 1, "policy": {}})
    assert await api.take() is not None


async def acts_s3_config(api):
    job_id = await submit(api, {"input": 1, "s3Config": S3})
    taken = await api.take()
    assert taken["s3Config"] == S3  # handed to the handler with the job, as RunPod does
    assert "s3Config" not in await api.status(job_id)  # credentials are not shown back


async def acts_execution_timeout(api):
    job_id = await submit(api, {"input": 1, "policy": {"executionTimeout": 5000}})
    assert (await record(api, job_id)).execution_timeout_s == 5.0


async def acts_ttl(api):
    job_id = await submit(api, {"input": 1, "policy": {"ttl": 60000}})
    assert (await record(api, job_id)).ttl_s == 60.0


async def acts_low_priority(api):
    low = await submit(api, {"input": "low", "policy": {"lowPriority": True}})
    normal = await submit(api, {"input": "normal"})
    assert (await record(api, low)).low_priority
    assert (await api.take())["id"] == normal  # a normal job first, though queued after


async def acts_retry_on_error(api):
    retry = {"maxAttempts": 2, "backoffSeconds": 0}
    job_id = await submit(api, {"input": 1, "policy": {"retryOnError": retry}})
    taken = await api.take()
    await api.done("w1", taken["id"], {"error": "boom"})
    view = await api.status(job_id)
    assert view["status"] == "IN_QUEUE" and view["attempt"] == 2  # runs again


EFFECTS = {
    "input": acts_input,
    "webhook": acts_webhook,
    "policy": acts_policy,
    "s3Config": acts_s3_config,
    "policy.executionTimeout": acts_execution_timeout,
    "policy.ttl": acts_ttl,
    "policy.lowPriority": acts_low_priority,
    "policy.retryOnError": acts_retry_on_error,
}


def schema_fields() -> set[str]:
    return set(RunRequest.model_fields) | {f"policy.{name}" for name in Policy.model_fields}


def test_every_field_of_the_request_schema_has_a_checked_effect():
    assert set(EFFECTS) == schema_fields()


@pytest.mark.parametrize("field", sorted(EFFECTS))
async def test_the_field_acts(api, field):
    await EFFECTS[field](api)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"input": 1, "priority": 5}, "priority"),
        ({"input": 1, "policy": {"timeout": 5000}}, "policy.timeout"),
        ({"input": 1, "s3Config": {**S3, "region": "eu"}}, "s3Config.region"),
        ({"input": 1, "s3Config": {"bucketName": "b"}}, "s3Config.accessId"),
        ({"input": 1, "s3Config": "s3://bucket"}, "s3Config"),
    ],
    ids=["unknown-field", "unknown-policy-field", "unknown-s3-field", "partial-s3", "s3-string"],
)
@pytest.mark.parametrize("route", ["run", "runsync"])
async def test_what_the_schema_does_not_know_is_refused(api, body, says, route):
    response = await api.client.post(
        f"/v2/{api.endpoint}/{route}", json=body, headers=api.client_headers()
    )
    assert response.status == 400
    assert says in (await response.json())["error"]
    assert (await api.gateway.health(api.endpoint)).jobs.inQueue == 0  # nothing half-accepted


def test_s3_config_is_what_runpod_documents():
    assert set(S3Config.model_fields) == set(S3)
