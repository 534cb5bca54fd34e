"""Our job loop with stand-in take/run/stop functions: counted and ordered, no clocks. The real
SDK functions and a real gateway run through it in tests/worker/test_worker_loop.py and
tests/e2e; here, what it relies on in the pinned runpod SDK is checked by name and signature."""

from __future__ import annotations

import asyncio
import inspect
from importlib import metadata

import pytest

from handler_worker import loops


class Script:
    """Stand-ins: `fetch` hands out the queued jobs (then waits like a long-poll), `run` records
    and holds each job until released, `stops` hands out stop ids once."""

    def __init__(self, jobs: list[dict], hold: bool = False):
        self.queue = list(jobs)
        self.events: list[tuple] = []
        self.release = asyncio.Event()
        self.hold = hold
        self.stop_ids: asyncio.Queue[list[str]] = asyncio.Queue()
        self.fetch_cancelled = 0
        self.left = asyncio.Event()  # the gateway heard the leave
        self.on_leave: list[dict] = []  # what the open take hands over in its answer to it

    def leave(self) -> bool:
        """The blocking announce (run in a thread by the loop)."""
        self.events.append(("leave",))
        asyncio.run_coroutine_threadsafe(self._left(), self.loop).result(5)
        return True

    async def _left(self) -> None:
        self.left.set()

    async def fetch(self, session, count):
        self.loop = asyncio.get_running_loop()
        self.events.append(("take", count))
        if self.queue:
            taken, self.queue = self.queue[:count], self.queue[count:]
            return taken
        try:
            await self.left.wait()  # a long-poll, answered at once once the worker leaves
            return self.on_leave or None
        except asyncio.CancelledError:
            self.fetch_cancelled += 1
            raise

    async def run(self, session, config, job, take):
        self.events.append(("start", job["id"]))
        if self.hold:
            await self.release.wait()
        self.events.append(("end", job["id"]))
        wanted = take()
        if wanted and self.queue:  # the result post's take: hands over what is queued
            self.events.append(("take with result", wanted))
            taken, self.queue = self.queue[:wanted], self.queue[wanted:]
            return taken
        return None

    async def stops(self, session):
        return await self.stop_ids.get()


def jobs(*ids: str) -> list[dict]:
    return [{"id": job_id, "input": {}} for job_id in ids]


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def until(predicate, limit: int = 5000) -> None:
    for _ in range(limit):
        if predicate():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("never happened")


async def test_each_result_post_takes_the_next_job_and_the_loop_takes_when_none_came():
    script = Script(jobs("a", "b", "c"))
    loop = loops.WorkerLoop({}, 1, script.fetch, script.run)
    running = asyncio.create_task(loop.run(None))
    await until(lambda: loop.takes == 2)
    await settle()
    loop.stop()
    await running
    assert script.events == [
        ("take", 1), ("start", "a"), ("end", "a"),
        ("take with result", 1), ("start", "b"), ("end", "b"),
        ("take with result", 1), ("start", "c"), ("end", "c"),
        ("take", 1),
    ]  # fmt: skip
    assert script.fetch_cancelled == 1, "the open take is abandoned on stop"


async def test_a_take_asks_for_the_free_slots_and_waits_for_one_when_full():
    script = Script(jobs("a", "b", "c"), hold=True)
    loop = loops.WorkerLoop({}, 2, script.fetch, script.run)
    running = asyncio.create_task(loop.run(None))
    await settle()
    assert script.events == [("take", 2), ("start", "a"), ("start", "b")]
    assert loop.takes == 1, "full: no take until a slot is free"
    script.release.set()
    await settle()
    assert ("take with result", 1) in script.events and ("start", "c") in script.events
    loop.stop()
    await running


async def test_a_stopping_loop_takes_nothing_with_its_results_but_runs_what_came():
    script = Script(jobs("a", "b", "c"), hold=True)
    loop = loops.WorkerLoop({}, 2, script.fetch, script.run)
    running = asyncio.create_task(loop.run(None))
    await until(lambda: len(loop.tasks) == 2)
    loop.stop()
    script.release.set()
    await asyncio.wait_for(running, 5)
    assert not any(e[0] == "take with result" for e in script.events)
    assert [e for e in script.events if e[0] == "end"] == [("end", "a"), ("end", "b")]


async def test_a_job_handed_over_with_a_result_runs_though_the_loop_stopped_meanwhile():
    script = Script(jobs("a", "b"), hold=True)
    loop = loops.WorkerLoop({}, 1, script.fetch, script.run)
    original = script.run

    async def run(session, config, job, take):
        handed = await original(session, config, job, lambda: 1)  # asked before the stop
        loop.stop()
        return handed

    loop.run_job = run
    running = asyncio.create_task(loop.run(None))
    await until(lambda: "a" in loop.tasks)
    script.release.set()
    await asyncio.wait_for(running, 5)
    assert ("end", "b") in script.events


async def test_stop_tells_the_gateway_once_and_lets_running_jobs_finish():
    script = Script(jobs("a"), hold=True)
    loop = loops.WorkerLoop({}, 2, script.fetch, script.run, leave=script.leave)
    running = asyncio.create_task(loop.run(None))
    await until(lambda: loop.takes == 2)
    loop.stop()
    loop.stop()
    await until(lambda: script.left.is_set())
    await settle()
    assert not running.done(), "a job is still running"
    script.release.set()
    await running
    assert script.events.count(("leave",)) == 1 and script.events[-1] == ("end", "a")
    assert script.fetch_cancelled == 0, "the open take was answered, not abandoned"


async def test_a_job_handed_over_in_the_answer_to_the_leave_still_runs():
    """Cancelling the open take on SIGTERM could lose a job the gateway already wrote to us."""
    script = Script([])
    script.on_leave = jobs("late")
    loop = loops.WorkerLoop({}, 1, script.fetch, script.run, leave=script.leave)
    running = asyncio.create_task(loop.run(None))
    await until(lambda: loop.takes == 1)
    loop.stop()
    await asyncio.wait_for(running, 5)
    assert ("start", "late") in script.events and ("end", "late") in script.events


async def test_stops_still_reach_jobs_while_the_worker_drains():
    script = Script(jobs("a"), hold=True)
    loop = loops.WorkerLoop({}, 1, script.fetch, script.run, stops=script.stops)
    running = asyncio.create_task(loop.run(None))
    await until(lambda: "a" in loop.tasks)
    loop.stop()
    script.stop_ids.put_nowait(["a"])  # a client cancels while the pod drains
    await asyncio.wait_for(running, 5)
    assert ("end", "a") not in script.events


async def test_a_job_handed_over_twice_runs_once_here():
    script = Script(jobs("a") + jobs("a"), hold=True)
    loop = loops.WorkerLoop({}, 2, script.fetch, script.run)
    running = asyncio.create_task(loop.run(None))
    await until(lambda: loop.takes >= 1 and "a" in loop.tasks)
    await settle()
    assert script.events.count(("start", "a")) == 1
    loop.stop()
    script.release.set()
    await running


async def test_a_stop_signal_cancels_just_that_job():
    script = Script(jobs("a", "b"), hold=True)
    loop = loops.WorkerLoop({}, 2, script.fetch, script.run, stops=script.stops)
    running = asyncio.create_task(loop.run(None))
    await settle()
    script.stop_ids.put_nowait(["a"])
    await until(lambda: "a" not in loop.tasks)
    assert "b" in loop.tasks
    loop.stop()
    script.release.set()
    await running
    assert ("end", "a") not in script.events and ("end", "b") in script.events


async def test_refresh_worker_ends_the_loop_after_its_job_without_leaving():
    script = Script(jobs("a", "b"))
    loop = loops.WorkerLoop(
        {"refresh_worker": True}, 1, script.fetch, script.run, leave=script.leave
    )
    await asyncio.wait_for(loop.run(None), 5)
    assert [e for e in script.events if e[0] == "start"] == [("start", "a")]
    assert ("leave",) not in script.events, "the next process takes jobs under the same name"


async def test_a_job_that_asks_for_a_fresh_worker_ends_the_loop_for_a_refresh():
    """A result's refresh_worker (the SDK's stopPod): nothing more is taken with it, the loop
    ends without leaving, and says a refresh is due (serve then starts the runtime afresh)."""
    script = Script(jobs("a", "b"))
    wanted = []

    async def run(session, config, job, finished):
        wanted.append(finished(job["id"] == "a"))
        script.events.append(("start", job["id"]))

    loop = loops.WorkerLoop({}, 1, script.fetch, run, leave=script.leave)
    await asyncio.wait_for(loop.run(None), 5)
    assert loop.refresh and wanted == [0] and not loop.leaving  # serve starts it afresh
    assert [e for e in script.events if e[0] == "start"] == [("start", "a")]
    assert ("leave",) not in script.events


async def test_a_refresh_asked_after_a_signal_does_not_restart_a_leaving_worker():
    script = Script(jobs("a"), hold=True)
    loop = loops.WorkerLoop({"refresh_worker": True}, 1, script.fetch, script.run)
    running = asyncio.create_task(loop.run(None))
    await settle()
    loop.stop()  # SIGTERM: the pod goes away
    script.release.set()
    await asyncio.wait_for(running, 5)
    assert loop.refresh and loop.leaving  # serve returns False: no exec


async def test_a_failing_take_backs_off_and_goes_on(monkeypatch):
    monkeypatch.setattr(loops, "ERROR_BACKOFF_S", 0)
    calls = []

    async def flaky(session, count):
        calls.append(count)
        if len(calls) == 1:
            raise ConnectionError("gateway restarting")
        return jobs("a") if len(calls) == 2 else await asyncio.Event().wait()

    script = Script([])
    loop = loops.WorkerLoop({}, 1, flaky, script.run)
    running = asyncio.create_task(loop.run(None))
    await until(lambda: len(calls) == 3)
    loop.stop()
    await running
    assert ("start", "a") in script.events and len(calls) == 3


@pytest.mark.parametrize(("failures", "base"), [(1, 1), (2, 2), (3, 4), (4, 8), (5, 15), (9, 15)])
def test_failed_takes_in_a_row_back_off_longer_and_jittered(failures, base):
    """Issue: workers retried takes in step during an outage (16,500 requests in 12 s)."""
    loop = loops.WorkerLoop({}, 1, None, None)
    loop._failures = failures
    waits = {loop._backoff(throttled=False) for _ in range(20)}
    assert all(base * 0.5 <= wait <= base * 1.5 for wait in waits) and len(waits) > 1
    assert loop._backoff(throttled=True) >= loops.THROTTLED_BACKOFF_S


async def test_a_successful_take_starts_the_backoff_again(monkeypatch):
    backoffs = []
    monkeypatch.setattr(
        loops.WorkerLoop, "_backoff", lambda self, throttled: backoffs.append(self._failures) or 0
    )
    calls = []

    async def flaky(session, count):
        calls.append(count)
        if len(calls) == 3:
            return jobs("a")
        if len(calls) == 5:
            await asyncio.Event().wait()
        raise ConnectionError("gateway unreachable")

    loop = loops.WorkerLoop({}, 1, flaky, Script([]).run)
    running = asyncio.create_task(loop.run(None))
    await until(lambda: len(calls) == 5)
    loop.stop()
    await running
    assert backoffs == [1, 2, 1]


async def test_the_concurrency_modifier_sets_the_slots_before_each_take():
    seen = []

    def modifier(current):
        seen.append(current)
        return 3

    script = Script(jobs("a", "b", "c", "d"), hold=True)
    loop = loops.WorkerLoop({"concurrency_modifier": modifier}, 1, script.fetch, script.run)
    running = asyncio.create_task(loop.run(None))
    await settle()
    assert script.events[0] == ("take", 3) and seen[0] == 1
    loop.stop()
    script.release.set()
    await running


async def test_a_stop_signal_does_not_cancel_a_result_post():
    """Past its handler, a job's task posts the result, which may carry the next jobs."""
    script = Script(jobs("a"))
    posting = asyncio.Event()
    loop = loops.WorkerLoop({}, 1, script.fetch, None, stops=script.stops)

    async def run(session, config, job, finished):
        finished()
        posting.set()
        await script.release.wait()  # the post's long-poll
        script.events.append(("posted", job["id"]))

    loop.run_job = run
    running = asyncio.create_task(loop.run(None))
    await posting.wait()
    script.stop_ids.put_nowait(["a"])
    await settle()
    loop.stop()
    script.release.set()
    await asyncio.wait_for(running, 5)
    assert ("posted", "a") in script.events


async def test_a_concurrency_modifier_answering_0_pauses_taking(monkeypatch):
    monkeypatch.setattr(loops, "MODIFIER_RETRY_S", 0.001)
    answers = [0, 0, 2]

    def modifier(current):
        return answers.pop(0) if answers else 2

    script = Script(jobs("a"))
    loop = loops.WorkerLoop({"concurrency_modifier": modifier}, 1, script.fetch, script.run)
    running = asyncio.create_task(loop.run(None))
    await until(lambda: ("start", "a") in script.events)
    loop.stop()
    await running
    assert script.events[0] == ("take", 2), "nothing taken while the modifier said 0"


# What the loop relies on in the pinned SDK: an upgrade that moves any of it fails here first.
SDK_SIGNATURES = {
    ("runpod.serverless.modules.rp_job", "get_job"): ["session", "num_jobs"],
    ("runpod.serverless.modules.rp_job", "run_job"): ["handler", "job"],
    ("runpod.serverless.modules.rp_job", "run_job_generator"): ["handler", "job"],
    ("runpod.serverless.modules.rp_http", "stream_result"): ["session", "job_data", "job"],
    ("runpod.serverless.modules.rp_handler", "is_generator"): ["handler"],
    ("runpod.serverless.utils.rp_debugger", "get_debugger_output"): [],
    ("runpod.serverless.utils.rp_debugger", "clear_debugger_output"): [],
    ("runpod.serverless.modules.rp_job", "get_stop_signals"): ["session"],
    ("runpod.serverless.modules.rp_fitness", "run_fitness_checks"): [],
    ("runpod.http_client", "AsyncClientSession"): ["args", "kwargs"],
}


def test_the_pinned_sdk_has_what_the_loop_uses():
    import importlib

    assert metadata.version("runpod") == "1.12.0"
    for (module, name), parameters in SDK_SIGNATURES.items():
        found = getattr(importlib.import_module(module), name)
        assert list(inspect.signature(found).parameters) == parameters, (module, name)
    from runpod.serverless.modules import rp_http, rp_job, rp_ping, worker_state
    from runpod.serverless.modules.worker_state import JobsProgress, PingJobMirror

    assert isinstance(rp_job.JOB_GET_URL, str) and isinstance(rp_http.JOB_DONE_URL, str)
    assert isinstance(worker_state.REF_COUNT_ZERO, float)
    assert all(hasattr(JobsProgress(), m) for m in ("add", "remove", "set_mirror"))
    assert callable(PingJobMirror)
    assert list(inspect.signature(rp_ping.Heartbeat.process_loop).parameters) == ["mirror", "test"]


@pytest.mark.parametrize("value", ["1", "true", "on"])
def test_handler_sdk_loop_chooses_the_sdk(value):
    from handler_worker.__main__ import sdk_loop

    assert sdk_loop({"HANDLER_SDK_LOOP": value}) and not sdk_loop({})
