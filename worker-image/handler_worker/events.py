"""The typed job event (`HandlerEvent`) a handler may declare instead of a plain job dict.

Pure: pydantic only. The loader turns the SDK's job dict into this model when the handler's
first parameter is annotated with `HandlerEvent` or `HandlerEvent[SomeInputModel]`.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

InputT = TypeVar("InputT")


class HandlerEvent(BaseModel, Generic[InputT]):
    """One job as the worker receives it: `id`, `input` (typed when parametrised) and extras.

    `HandlerEvent[MyInput]` validates `input` against `MyInput`; a mismatch becomes a 400-style
    structured error in the job result without calling the handler. The event also behaves like
    the SDK's job dict for `event["id"]` / `event.get(...)`, so SDK helpers that take a job
    (`runpod.serverless.progress_update(event, ...)`) accept it unchanged.
    """

    model_config = ConfigDict(extra="allow", arbitrary_types_allowed=True, frozen=False)

    id: str
    input: InputT
    webhook: str | None = None

    def __getitem__(self, key: str) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def get(self, key: str, default: Any = None) -> Any:
        """Dict-style access, as on the SDK's job dict."""
        return getattr(self, key, default)


def is_event_type(annotation: Any) -> bool:
    """True when `annotation` is `HandlerEvent` or one of its (parametrised) subclasses."""
    return isinstance(annotation, type) and issubclass(annotation, HandlerEvent)
