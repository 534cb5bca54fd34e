"""Input validation for handlers: pydantic models in, 400-style structured job errors out.

Pure: no I/O. The structured error is a JSON string with the same keys the runpod SDK uses for
handler exceptions (`error_type`, `error_message`) plus `status: 400` and the field `errors`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

INPUT_MODEL_ATTRIBUTE = "__handler_input_model__"
F = TypeVar("F", bound=Callable[..., Any])


class InputValidationError(Exception):
    """The job's input does not fit the handler's declared model (a client error, HTTP-400 like).

    Raise it from a handler (or let `validate_input` / `HandlerEvent[Model]` raise it) and the
    job fails with `error_json()` as its error instead of a traceback.
    """

    def __init__(self, message: str, errors: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.message = message
        self.errors = errors or []

    @classmethod
    def from_pydantic(
        cls, exc: ValidationError, model_name: str, prefix: tuple[str | int, ...] = ()
    ) -> InputValidationError:
        errors = [
            {
                "loc": ".".join(str(part) for part in (*prefix, *error["loc"])),
                "msg": error["msg"],
                "type": error["type"],
            }
            for error in exc.errors(include_url=False, include_context=False, include_input=False)
        ]
        count = len(errors)
        noun = "error" if count == 1 else "errors"
        return cls(f"input does not match {model_name}: {count} validation {noun}", errors)

    def error_json(self) -> str:
        return json.dumps(
            {
                "error_type": "InputValidationError",
                "status": 400,
                "error_message": self.message,
                "errors": self.errors,
            }
        )


def parse_input(model: type[BaseModel], job_input: Any) -> BaseModel:
    """Validate a job's `input` against `model`, raising `InputValidationError` on mismatch."""
    try:
        return model.model_validate(job_input)
    except ValidationError as exc:
        raise InputValidationError.from_pydantic(exc, model.__name__, ("input",)) from None


def validate_input(model: type[BaseModel]) -> Callable[[F], F]:
    """Declare a handler's input model: `job["input"]` arrives as a validated `model` instance.

    A job whose input does not fit never reaches the handler; it fails with a structured
    400-style error naming each bad field (`input.<field>`).
    """
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise TypeError(f"validate_input expects a pydantic model class, got {model!r}")

    def mark(handler: F) -> F:
        setattr(handler, INPUT_MODEL_ATTRIBUTE, model)
        return handler

    return mark
