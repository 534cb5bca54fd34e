"""An endpoint whose workers fail (reported by the operator or `handlerctl dev`): clients waiting
on its queued jobs are told why, in status, runsync and health; on every backend."""

from __future__ import annotations

import pytest

PROBLEM = {"reason": "HandlerCrashLoop", "message": "handler.py:1: ModuleNotFoundError: torch"}


async def report(api, body=None, method: str = "put", endpoint: str | None = None):
    path = f"/admin/v1/endpoints/{endpoint or api.endpoint}/handler-problem"
    call = getattr(api.client, method)
    kwargs = {"json": body} if body is not None else {}
    return await call(path, headers=api.admin_headers(), **kwargs)


async def health(api) -> dict:
    response = await api.client.get(f"/v2/{api.endpoint}/health", headers=api.client_headers())
    return await response.json()


async def test_a_queued_job_says_why_it_waits_until_the_workers_run_again(api):
    job = await api.run({"n": 1})
    assert "handlerProblem" not in await api.status(job)
    told = await report(api, PROBLEM)
    assert told.status == 200, await told.text()
    stored = (await told.json())["handlerProblem"]
    assert stored["reason"] == PROBLEM["reason"] and stored["since"] > 0
    view = await api.status(job)
    assert view["status"] == "IN_QUEUE"
    assert view["handlerProblem"]["message"] == PROBLEM["message"]
    assert (await health(api))["handlerProblem"]["reason"] == "HandlerCrashLoop"

    runsync = await api.client.post(
        f"/v2/{api.endpoint}/runsync?wait=300", json={"input": {}}, headers=api.client_headers()
    )
    assert (await runsync.json())["handlerProblem"]["reason"] == "HandlerCrashLoop"

    cleared = await report(api, method="delete")
    assert cleared.status == 200 and "handlerProblem" not in await cleared.json()
    assert "handlerProblem" not in await api.status(job)
    assert "handlerProblem" not in await health(api)


async def test_a_job_that_runs_or_ended_carries_no_problem(api):
    job = await api.run({"n": 1})
    taken = await api.take("w1")
    await report(api, PROBLEM)
    assert "handlerProblem" not in await api.status(job)  # in progress: a worker has it
    await api.done("w1", taken["id"], {"output": 1})
    assert "handlerProblem" not in await api.status(job)


async def test_a_problem_reported_again_keeps_its_start(api):
    first = (await (await report(api, PROBLEM)).json())["handlerProblem"]
    again = {**PROBLEM, "message": "handler.py:2: SyntaxError"}
    second = (await (await report(api, again)).json())["handlerProblem"]
    assert second["since"] == first["since"] and second["message"] == again["message"]


async def test_the_problem_goes_with_the_endpoint(api):
    await report(api, PROBLEM)
    deleted = await api.client.delete(
        f"/admin/v1/endpoints/{api.endpoint}", headers=api.admin_headers()
    )
    assert deleted.status in (200, 204)
    await api.register()
    api.gateway._problems.clear()  # another replica: nothing cached
    assert "handlerProblem" not in await health(api)


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"reason": "crash loop", "message": "x"}, 400, "reason"),
        ({"reason": "X"}, 400, "message"),
        ({**PROBLEM, "extra": 1}, 400, "extra"),
        ([PROBLEM], 400, "object"),
    ],
    ids=["reason-not-camel-case", "no-message", "unknown-field", "not-an-object"],
)
async def test_bad_reports_are_refused_with_a_reason(api, body, status, says):
    response = await report(api, body)
    assert response.status == status
    assert says in (await response.json())["error"]


async def test_reports_need_the_admin_key_and_a_known_endpoint(api):
    denied = await api.client.put(
        f"/admin/v1/endpoints/{api.endpoint}/handler-problem",
        json=PROBLEM,
        headers=api.client_headers(),
    )
    assert denied.status == 403
    unknown = await report(api, PROBLEM, endpoint="nope")
    assert unknown.status == 404
