"""The generic handler: runs a cloudpickled function or class sent in the job input.

Input (`GenericRequest`): `function` (base64 cloudpickle of a function or class) or
`function_name` (looked up in a registry), `args`/`kwargs`, for classes `constructor_args`/
`constructor_kwargs` + `method_name`. `serialization_format: "json"` takes plain JSON arguments
and returns `json_result`. Output: `{"success": true, "result": <b64>}` (a class call adds
`"instance": "built" | "reused"`: instances are kept per worker, `Instances`) or
`{"success": false, "error", "error_type", "traceback"}`. Source code strings are never executed.
Trust model: whoever can submit jobs to the endpoint can run code on its workers (as in
tetra-rp/flash); keep the endpoint's client API key private.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import traceback
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from handler_worker import chains, serialization
from handler_worker.serialization import PayloadError

MAX_PAYLOAD_ENV = "HANDLER_GENERIC_MAX_PAYLOAD_BYTES"
_METHOD_NAME = re.compile(r"^(__call__|[A-Za-z][A-Za-z0-9_]*)$")
_CODE_FIELDS = ("function_code", "class_code")
_INSTALL_FIELDS = ("dependencies", "system_dependencies")


class GenericRequest(BaseModel):
    """What a generic-handler job carries in `input`."""

    model_config = ConfigDict(extra="ignore")

    function: str | None = Field(None, description="base64 cloudpickle of a function or class")
    function_name: str | None = Field(None, description="name of a registered function/class")
    execution_type: Literal["function", "class"] | None = Field(
        None, description="'class' instantiates, then calls method_name; default: detected"
    )
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    constructor_args: list[Any] = Field(default_factory=list)
    constructor_kwargs: dict[str, Any] = Field(default_factory=dict)
    method_name: str = "__call__"
    serialization_format: Literal["cloudpickle", "json"] = "cloudpickle"
    call_chain: list[str] = Field(
        default_factory=list,
        max_length=32,
        description="ours: the endpoints whose jobs called this one (no call goes back to them)",
    )


class GenericRequestError(ValueError):
    """The job input is not a usable generic-handler request."""


def max_payload_bytes() -> int:
    raw = os.environ.get(MAX_PAYLOAD_ENV, "")
    return int(raw) if raw.isdigit() else serialization.DEFAULT_MAX_PAYLOAD_BYTES


def parse_request(raw: Any) -> GenericRequest:
    if not isinstance(raw, dict):
        raise GenericRequestError(
            f"generic handler input must be a JSON object, got {type(raw).__name__}"
        )
    for key in _CODE_FIELDS:
        if raw.get(key):
            raise GenericRequestError(
                f"'{key}' is not supported: source code is never executed; send the "
                "function or class cloudpickled and base64-encoded in 'function'"
            )
    for key in _INSTALL_FIELDS:
        if raw.get(key):
            raise GenericRequestError(
                f"'{key}' is not supported: install dependencies in the worker image"
            )
    try:
        request = GenericRequest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        raise GenericRequestError(f"invalid generic request at '{where}': {first['msg']}") from None
    if (request.function is None) == (request.function_name is None):
        raise GenericRequestError("exactly one of 'function' or 'function_name' is required")
    if not _METHOD_NAME.match(request.method_name):
        raise GenericRequestError(f"method_name '{request.method_name}' is not allowed")
    return request


def _decode_values(values: list[Any], field: str, fmt: str) -> list[Any]:
    if fmt == "json":
        return list(values)
    return [serialization.decode(value, f"{field}[{i}]") for i, value in enumerate(values)]


def _decode_mapping(values: dict[str, Any], field: str, fmt: str) -> dict[str, Any]:
    if fmt == "json":
        return dict(values)
    return {key: serialization.decode(value, f"{field}.{key}") for key, value in values.items()}


def resolve_target(
    request: GenericRequest, registry: Mapping[str, Any], allow_pickled: bool
) -> Any:
    if request.function_name is not None:
        if request.function_name not in registry:
            raise GenericRequestError(
                f"function '{request.function_name}' is not registered "
                f"(available: {sorted(registry)})"
            )
        return registry[request.function_name]
    if not allow_pickled:
        raise GenericRequestError("this endpoint only runs registered functions ('function_name')")
    target = serialization.decode(request.function, "function")
    if not callable(target):
        raise GenericRequestError(f"'function' decodes to a {type(target).__name__}, not callable")
    return target


INSTANCES_ENV = "HANDLER_INSTANCES"
DEFAULT_INSTANCES = 8


def instance_limit(env: Mapping[str, str] | None = None) -> int:
    """How many class instances a worker keeps (HANDLER_INSTANCES, default 8; 0: none, every
    call builds its own)."""
    raw = (os.environ if env is None else env).get(INSTANCES_ENV, "")
    try:
        return max(0, int(raw)) if raw.strip() else DEFAULT_INSTANCES
    except ValueError:
        return DEFAULT_INSTANCES


class Instances:
    """The `@remote` class instances a worker keeps, least recently used dropped first: one per
    class and constructor arguments, built by its first call (its `__init__`: the model loaded
    once) and reused by the calls after it, on this worker, until the worker ends."""

    def __init__(self, limit: int):
        self.limit = limit
        self.built = 0
        self._kept: OrderedDict[tuple[str, str, str], Any] = OrderedDict()

    def get(self, key: tuple[str, str, str], build: Callable[[], Any]) -> tuple[Any, bool]:
        """(the instance, whether this call built it)."""
        if key in self._kept:
            self._kept.move_to_end(key)
            return self._kept[key], False
        instance = build()
        self.built += 1
        if self.limit:
            self._kept[key] = instance
            while len(self._kept) > self.limit:
                self._kept.popitem(last=False)
        return instance, True


def instance_key(request: GenericRequest) -> tuple[str, str, str]:
    """Which instance a class call reuses: the class (registered name, or its pickled code's
    digest) and its constructor arguments as sent."""
    target = request.function_name or hashlib.sha256((request.function or "").encode()).hexdigest()
    arguments = json.dumps(
        [request.constructor_args, request.constructor_kwargs], sort_keys=True, default=str
    )
    return target, request.serialization_format, arguments


async def execute(
    request: GenericRequest, target: Any, instances: Instances | None = None
) -> tuple[Any, bool | None]:
    """The call's result, and for a class call whether it built its instance (None: a
    function)."""
    fmt = request.serialization_format
    args = _decode_values(request.args, "args", fmt)
    kwargs = _decode_mapping(request.kwargs, "kwargs", fmt)
    kind = request.execution_type or ("class" if isinstance(target, type) else "function")
    built: bool | None = None
    if kind == "class":

        def build() -> Any:
            return target(
                *_decode_values(request.constructor_args, "constructor_args", fmt),
                **_decode_mapping(request.constructor_kwargs, "constructor_kwargs", fmt),
            )

        instances = instances if instances is not None else Instances(0)
        instance, built = instances.get(instance_key(request), build)
        call = getattr(instance, request.method_name, None)
        if call is None or not callable(call):
            raise GenericRequestError(
                f"{type(instance).__name__} has no callable method '{request.method_name}'"
            )
    else:
        call = target
    result = call(*args, **kwargs)
    if inspect.isawaitable(result):
        result = await result
    return result, built


def _failure(exc: BaseException, with_traceback: bool) -> dict[str, Any]:
    return {
        "success": False,
        "error": str(exc) or type(exc).__name__,
        "error_type": type(exc).__name__,
        "traceback": traceback.format_exc() if with_traceback else "",
    }


def create_handler(
    registry: Mapping[str, Callable[..., Any]] | None = None, allow_pickled: bool = True
) -> Callable[[dict[str, Any]], Any]:
    """A runpod handler that runs registered or cloudpickled callables (see module doc)."""
    functions = dict(registry or {})
    instances = Instances(instance_limit())

    async def handler(job: dict[str, Any]) -> dict[str, Any]:
        raw = job.get("input")
        try:
            serialization.check_payload_size(serialization.payload_size(raw), max_payload_bytes())
            request = parse_request(raw)
            target = resolve_target(request, functions, allow_pickled)
        except (GenericRequestError, PayloadError) as exc:
            return _failure(exc, with_traceback=False)
        try:
            with chains.running_in(request.call_chain):
                result, built = await execute(request, target, instances)
        except (GenericRequestError, PayloadError) as exc:
            return _failure(exc, with_traceback=False)
        except Exception as exc:  # the user's function failed: report with its traceback
            return _failure(exc, with_traceback=True)
        # A class call says whether its instance was built for it (first call on this worker,
        # or rebuilt after an eviction or on another worker) or reused.
        shown = {} if built is None else {"instance": "built" if built else "reused"}
        if request.serialization_format == "json":
            return {"success": True, "json_result": result, **shown}
        try:
            return {"success": True, "result": serialization.encode(result), **shown}
        except PayloadError as exc:
            return _failure(exc, with_traceback=False)

    return handler


def _call_fields(
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    constructor: tuple[tuple[Any, ...], Mapping[str, Any]] | None,
    method_name: str | None,
) -> dict[str, Any]:
    """The encoded arguments of a call; with `constructor` (args, kwargs), a class method call."""
    request: dict[str, Any] = {
        "args": [serialization.encode(arg) for arg in args],
        "kwargs": {key: serialization.encode(value) for key, value in kwargs.items()},
    }
    if constructor is not None:
        constructor_args, constructor_kwargs = constructor
        request.update(
            execution_type="class",
            method_name=method_name or "__call__",
            constructor_args=[serialization.encode(arg) for arg in constructor_args],
            constructor_kwargs={
                key: serialization.encode(value) for key, value in constructor_kwargs.items()
            },
        )
    return request


def build_request(
    function: Callable[..., Any] | type,
    *args: Any,
    method_name: str | None = None,
    constructor_args: tuple[Any, ...] = (),
    constructor_kwargs: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """The job `input` that runs `function(*args, **kwargs)` (or a class method) remotely."""
    constructor = (constructor_args, constructor_kwargs or {})
    is_class = isinstance(function, type)
    return {
        "function": serialization.encode(function),
        **_call_fields(args, kwargs, constructor if is_class else None, method_name),
    }


def build_named_request(
    name: str,
    args: tuple[Any, ...] = (),
    kwargs: Mapping[str, Any] | None = None,
    constructor: tuple[tuple[Any, ...], Mapping[str, Any]] | None = None,
    method_name: str | None = None,
) -> dict[str, Any]:
    """The job `input` that calls the registered `name` (`function_name`, as handlers from
    `handlerctl build` serve); with `constructor` (args, kwargs), `name` is a class."""
    return {"function_name": name, **_call_fields(args, kwargs or {}, constructor, method_name)}


def decode_result(output: Mapping[str, Any]) -> Any:
    """The value a generic job returned; raises RuntimeError with the remote error on failure."""
    if not output.get("success"):
        raise RuntimeError(f"{output.get('error_type', 'Error')}: {output.get('error')}")
    if "json_result" in output:
        return output["json_result"]
    return serialization.decode(output["result"], "result")


handler = create_handler()
