"""The generic handler in-process: functions, classes, kwargs, JSON mode, errors and limits."""

from __future__ import annotations

import asyncio
import base64

import pytest

from handler_worker import serialization
from handler_worker.generic import (
    build_request,
    create_handler,
    decode_result,
    handler,
)


def run(job_input, job_handler=handler):
    return asyncio.run(job_handler({"id": "j", "input": job_input}))


def multiply(a, b=2):
    return a * b


async def async_double(x):
    await asyncio.sleep(0)
    return x * 2


def explode(message):
    raise KeyError(message)


class Model:
    def __init__(self, bias, *, scale=1):
        self.bias = bias
        self.scale = scale

    def predict(self, x):
        return x * self.scale + self.bias

    def __call__(self, x):
        return -x

    def _private(self):
        return "secret"


CASES = {
    "function positional": (build_request(multiply, 3, 4), 12),
    "function kwargs": (build_request(multiply, 5, b=10), 50),
    "async function": (build_request(async_double, 21), 42),
    "lambda": (build_request(lambda x: x + 1, 1), 2),
    "class + method": (
        build_request(
            Model, 3, method_name="predict", constructor_args=(1,), constructor_kwargs={"scale": 10}
        ),
        31,
    ),
    "class __call__": (build_request(Model, 5, constructor_args=(0,)), -5),
    "1 MB argument": (build_request(len, b"x" * (1024 * 1024)), 1024 * 1024),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_success(case):
    job_input, expected = CASES[case]
    output = run(job_input)
    assert output["success"] is True, output
    assert decode_result(output) == expected


def test_user_exception_is_structured_with_traceback():
    output = run(build_request(explode, "boom"))
    assert output["success"] is False
    assert output["error_type"] == "KeyError"
    assert output["error"] == "'boom'"
    assert "raise KeyError(message)" in output["traceback"]
    with pytest.raises(RuntimeError, match="KeyError"):
        decode_result(output)


def _corrupt(request, field, value):
    return {**request, field: value}


GOOD = build_request(multiply, 2, 3)
PICKLE_GARBAGE = base64.b64encode(b"\x80\x05not a pickle").decode()

ERRORS = {
    "not a dict": ("just a string", "must be a JSON object, got str"),
    "neither function nor name": ({"args": []}, "exactly one of 'function' or 'function_name'"),
    "non-base64 function": (
        _corrupt(GOOD, "function", "%%%not-base64%%%"),
        "function: not valid base64",
    ),
    "corrupted pickle": (
        _corrupt(GOOD, "function", PICKLE_GARBAGE),
        "function: could not unpickle",
    ),
    "non-base64 arg": (_corrupt(GOOD, "args", ["@@"]), "args[0]: not valid base64"),
    "arg not a string": (
        _corrupt(GOOD, "args", [5]),
        "args[0]: expected a base64-encoded cloudpickle string, got int",
    ),
    "kwargs not a dict": (_corrupt(GOOD, "kwargs", [1]), "invalid generic request at 'kwargs'"),
    "not callable": (
        _corrupt(GOOD, "function", serialization.encode(5)),
        "decodes to a int, not callable",
    ),
    "source code": ({"function_code": "import os"}, "source code is never executed"),
    "runtime installs": (
        {**GOOD, "dependencies": ["torch"]},
        "install dependencies in the worker image",
    ),
    "private method": (
        build_request(Model, method_name="_private", constructor_args=(1,)),
        "method_name '_private' is not allowed",
    ),
    "missing method": (
        build_request(Model, method_name="nope", constructor_args=(1,)),
        "has no callable method 'nope'",
    ),
    "unknown name": ({"function_name": "add"}, "function 'add' is not registered"),
    "bad format": ({**GOOD, "serialization_format": "xml"}, "serialization_format"),
}


@pytest.mark.parametrize("case", ERRORS, ids=list(ERRORS))
def test_bad_request_is_a_structured_error(case):
    job_input, message = ERRORS[case]
    output = run(job_input)
    assert output["success"] is False
    assert message in output["error"]
    assert output["traceback"] == ""


def test_oversize_payload_is_rejected_before_decoding(monkeypatch):
    monkeypatch.setenv("HANDLER_GENERIC_MAX_PAYLOAD_BYTES", "1000")
    output = run(build_request(len, b"x" * 2000))
    assert output["error_type"] == "PayloadError"
    assert "exceeds the limit of 1000 bytes" in output["error"]


def test_unpicklable_result():
    output = run(build_request(lambda: (i for i in range(3))))
    assert output["success"] is False and "could not serialize generator" in output["error"]


REGISTRY = {"multiply": multiply, "Model": Model}


@pytest.mark.parametrize(
    ("job_input", "expected"),
    [
        (
            {
                "function_name": "multiply",
                "serialization_format": "json",
                "args": [6],
                "kwargs": {"b": 7},
            },
            42,
        ),
        (
            {
                "function_name": "Model",
                "serialization_format": "json",
                "constructor_args": [1],
                "method_name": "predict",
                "args": [2],
            },
            3,
        ),
    ],
    ids=["function", "class"],
)
def test_registry_json_mode(job_input, expected):
    output = run(job_input, create_handler(REGISTRY, allow_pickled=False))
    assert {k: v for k, v in output.items() if k != "instance"} == {
        "success": True,
        "json_result": expected,
    }
    assert output.get("instance") == ("built" if "constructor_args" in job_input else None)


class Counted:
    """Its __init__ counts its calls (as a model load would show in the logs)."""

    built = 0

    def __init__(self, name):
        Counted.built += 1
        self.name, self.calls = name, 0

    def call(self):
        self.calls += 1
        return [self.name, self.calls]


def class_call(name: str) -> dict:
    return {
        "function_name": "Counted",
        "serialization_format": "json",
        "constructor_args": [name],
        "method_name": "call",
    }


@pytest.mark.parametrize(("limit", "built"), [(None, 1), ("0", 100)], ids=["kept", "cache-off"])
def test_a_hundred_method_calls_build_one_instance_per_worker(monkeypatch, limit, built):
    if limit is None:
        monkeypatch.delenv("HANDLER_INSTANCES", raising=False)
    else:
        monkeypatch.setenv("HANDLER_INSTANCES", limit)
    Counted.built = 0
    handler = create_handler({"Counted": Counted}, allow_pickled=False)
    outputs = [run(class_call("a"), handler) for _ in range(100)]
    assert Counted.built == built
    assert outputs[-1]["json_result"] == ["a", 100 if limit is None else 1]  # its state lives on
    assert [o["instance"] for o in outputs[:2]] == (
        ["built", "reused"] if limit is None else ["built", "built"]
    )


def test_instances_are_kept_per_constructor_arguments_least_recently_used_first(monkeypatch):
    monkeypatch.setenv("HANDLER_INSTANCES", "2")
    Counted.built = 0
    handler = create_handler({"Counted": Counted}, allow_pickled=False)
    for name in ("a", "b", "a", "c", "a", "b"):
        run(class_call(name), handler)
    # a, b built; a reused; c built (b evicted: least recently used); a reused; b built again
    assert Counted.built == 4


def test_registry_only_endpoint_refuses_pickled_functions():
    output = run(GOOD, create_handler(REGISTRY, allow_pickled=False))
    assert "only runs registered functions" in output["error"]


def test_a_remote_error_shows_its_message_and_the_remote_traceback():
    from handler_worker.remote import RemoteError

    error = RemoteError("ValueError: bad", 'Traceback (most recent call last):\n  File "f.py"\n')
    assert error.message == "ValueError: bad"
    assert str(error).startswith("ValueError: bad\n\nRemote traceback:\nTraceback")
    assert str(RemoteError("job x FAILED: y")) == "job x FAILED: y"
