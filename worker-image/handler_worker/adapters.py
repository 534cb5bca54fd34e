"""Wrappers that adapt a user handler to the SDK's `handler(job)` call without changing its kind.

The SDK picks streaming vs. plain by `inspect` on the handler, so a sync, async, generator or
async-generator handler is wrapped by a function of the same kind. The wrapper turns the job
dict into a `HandlerEvent` when the handler asks for one, validates a declared input model, and
turns `InputValidationError` into a structured job error.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from handler_worker.events import is_event_type
from handler_worker.validation import INPUT_MODEL_ATTRIBUTE, InputValidationError, parse_input


def event_annotation(handler: Callable[..., Any]) -> type | None:
    """The `HandlerEvent` subclass the handler's first parameter is annotated with, if any."""
    target = handler if inspect.isroutine(handler) else handler.__call__
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolved forward references: fall back to raw annotations
        hints = getattr(target, "__annotations__", {}) or {}
    try:
        params = [p for p in inspect.signature(target).parameters.values() if p.name != "self"]
    except (TypeError, ValueError):
        return None
    if not params:
        return None
    annotation = hints.get(params[0].name)
    return annotation if is_event_type(annotation) else None


def _event_from_job(event_type: type, job: dict[str, Any]) -> Any:
    try:
        return event_type.model_validate(job)
    except ValidationError as exc:
        input_type = event_type.model_fields["input"].annotation
        name = getattr(input_type, "__name__", event_type.__name__)
        raise InputValidationError.from_pydantic(exc, name) from None


def make_preparer(handler: Callable[..., Any]) -> Callable[[dict[str, Any]], Any] | None:
    """A function job -> handler argument, or None when the handler takes the job dict as is."""
    event_type = event_annotation(handler)
    input_model = getattr(handler, INPUT_MODEL_ATTRIBUTE, None)
    if event_type is not None:
        return functools.partial(_event_from_job, event_type)
    if input_model is not None:
        return lambda job: {**job, "input": parse_input(input_model, job.get("input"))}
    return None


def _error(exc: InputValidationError) -> dict[str, str]:
    return {"error": exc.error_json()}


def adapt(handler: Callable[..., Any]) -> Callable[[dict[str, Any]], Any]:
    """Wrap `handler` so the SDK can call it with a job dict; keeps its sync/async/generator kind."""
    prepare = make_preparer(handler) or (lambda job: job)

    if inspect.isasyncgenfunction(handler):

        async def wrapper(job: dict[str, Any]) -> Any:
            try:
                async for chunk in handler(prepare(job)):
                    yield chunk
            except InputValidationError as exc:
                yield _error(exc)

    elif inspect.isgeneratorfunction(handler):

        def wrapper(job: dict[str, Any]) -> Any:
            try:
                yield from handler(prepare(job))
            except InputValidationError as exc:
                yield _error(exc)

    elif inspect.iscoroutinefunction(handler):

        async def wrapper(job: dict[str, Any]) -> Any:
            try:
                return await handler(prepare(job))
            except InputValidationError as exc:
                return _error(exc)

    else:

        def wrapper(job: dict[str, Any]) -> Any:
            try:
                result = handler(prepare(job))
            except InputValidationError as exc:
                return _error(exc)
            if inspect.isawaitable(result):
                return _await_guarded(result)
            return result

    functools.update_wrapper(wrapper, handler)
    del wrapper.__wrapped__  # the SDK must inspect the wrapper's kind, not the original's
    return wrapper


async def _await_guarded(result: Any) -> Any:
    try:
        return await result
    except InputValidationError as exc:
        return _error(exc)
