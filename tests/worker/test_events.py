"""HandlerEvent, validate_input and the kind-preserving adapters, with plain values."""

from __future__ import annotations

import asyncio
import inspect
import json

import pytest
from pydantic import BaseModel

from handler_worker import HandlerEvent, InputValidationError, validate_input
from handler_worker.adapters import adapt, event_annotation


class Prompt(BaseModel):
    prompt: str
    steps: int = 10


def sync_plain(job):
    return job["input"]


async def async_event(event: HandlerEvent[Prompt]):
    return {"id": event.id, "steps": event.input.steps}


def gen_event(event: HandlerEvent):
    yield event["id"]
    yield event.get("missing", "default")


async def agen_plain(job):
    yield job["id"]


@validate_input(Prompt)
def sync_validated(job):
    return job["input"].prompt


def sync_raises_validation(job):
    raise InputValidationError(
        "custom check failed", [{"loc": "input.x", "msg": "bad", "type": "custom"}]
    )


KINDS = {
    "sync": (sync_plain, inspect.isfunction),
    "async": (async_event, inspect.iscoroutinefunction),
    "generator": (gen_event, inspect.isgeneratorfunction),
    "async generator": (agen_plain, inspect.isasyncgenfunction),
}


@pytest.mark.parametrize("kind", KINDS, ids=list(KINDS))
def test_adapt_keeps_the_handler_kind(kind):
    handler, check = KINDS[kind]
    wrapped = adapt(handler)
    assert check(wrapped)
    assert wrapped.__name__ == handler.__name__


def call(handler, job):
    wrapped = adapt(handler)
    if inspect.isasyncgenfunction(wrapped):

        async def collect():
            return [chunk async for chunk in wrapped(job)]

        return asyncio.run(collect())
    if inspect.isgeneratorfunction(wrapped):
        return list(wrapped(job))
    result = wrapped(job)
    return asyncio.run(result) if inspect.isawaitable(result) else result


def test_event_annotation_detection():
    assert event_annotation(async_event) is HandlerEvent[Prompt]
    assert event_annotation(gen_event) is HandlerEvent
    assert event_annotation(sync_plain) is None


def test_typed_event_handler_gets_a_model():
    assert call(async_event, {"id": "a", "input": {"prompt": "cat"}}) == {"id": "a", "steps": 10}


def test_event_behaves_like_the_job_dict():
    assert call(gen_event, {"id": "g", "input": {}}) == ["g", "default"]
    event = HandlerEvent(id="x", input=1, extra_field="kept")
    assert event["extra_field"] == "kept"
    with pytest.raises(KeyError):
        event["nope"]


def error_of(result):
    return json.loads(result["error"])


@pytest.mark.parametrize(
    ("handler", "job_input", "locs"),
    [
        (async_event, {"steps": "x"}, {"input.prompt", "input.steps"}),
        (sync_validated, None, {"input"}),
        (sync_validated, {"prompt": 3}, {"input.prompt"}),
    ],
    ids=["event", "decorator-none", "decorator-type"],
)
def test_invalid_input_is_a_400_error(handler, job_input, locs):
    error = error_of(call(handler, {"id": "v", "input": job_input}))
    assert error["status"] == 400
    assert error["error_type"] == "InputValidationError"
    assert {e["loc"] for e in error["errors"]} == locs
    assert error["error_message"].startswith("input does not match Prompt")


def test_validation_error_in_a_generator_becomes_the_job_error():
    def gen(event: HandlerEvent[Prompt]):
        yield 1

    chunks = call(gen, {"id": "v", "input": {}})
    assert len(chunks) == 1 and error_of(chunks[0])["status"] == 400


def test_handler_may_raise_input_validation_error_itself():
    error = error_of(call(sync_raises_validation, {"id": "r", "input": {}}))
    assert error["error_message"] == "custom check failed"
    assert error["errors"] == [{"loc": "input.x", "msg": "bad", "type": "custom"}]


def test_validate_input_requires_a_model():
    with pytest.raises(TypeError, match="pydantic model class"):
        validate_input(dict)


def test_callable_object_handler_is_supported():
    class Handler:
        async def __call__(self, event: HandlerEvent[Prompt]):
            return event.input.prompt

    assert call(Handler(), {"id": "o", "input": {"prompt": "dog"}}) == "dog"
