"""SIGTERM → leave, in pieces: the leave URL from the SDK's take URL, the chained handler, the
wrapped concurrency modifier (the whole path runs in tests/e2e/test_shutdown.py)."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from handler_worker import signals


@pytest.mark.parametrize(
    ("take_url", "worker", "expected"),
    [
        (
            "http://gw:8080/v2/ns--hello/job-take/$ID?capacity=2",
            "hello-7d9-x",
            "http://gw:8080/v2/ns--hello/leave/hello-7d9-x",
        ),
        ("https://gw/v2/ep/job-take/$ID?", "pod/1", "https://gw/v2/ep/leave/pod%2F1"),
        ("https://api.runpod.ai/v2/ep/job-take", "pod", None),
        ("http://gw/v2/ep/job-take/$ID?", "", None),
        ("", "pod", None),
    ],
)
def test_leave_url(take_url, worker, expected):
    assert signals.leave_url(take_url, worker) == expected


def test_no_gateway_no_hook():
    config = {"handler": print}
    assert signals.leave_on_sigterm(config, {"RUNPOD_POD_ID": "p"}) is False
    assert "concurrency_modifier" not in config


def test_an_unreachable_gateway_is_logged_not_raised():
    assert signals.announce_leaving("http://127.0.0.1:9/v2/ep/leave/w", "t", timeout=1) is False


def test_the_hook_chains_the_sdk_handler_at_the_first_modifier_call(monkeypatch):
    calls = []
    announced = threading.Event()
    monkeypatch.setattr(
        signals,
        "announce_leaving",
        lambda url, token: (calls.append((url, token)), announced.set()),
    )
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, lambda signum, frame: calls.append("sdk"))
        config = {"concurrency_modifier": lambda current: current + 1}
        env = {
            "RUNPOD_WEBHOOK_GET_JOB": "http://gw/v2/ep/job-take/$ID?",
            "RUNPOD_POD_ID": "w1",
            "RUNPOD_AI_API_KEY": "tok",
        }
        assert signals.leave_on_sigterm(config, env) is True
        assert config["concurrency_modifier"](1) == 2  # the module's modifier still decides
        assert config["concurrency_modifier"](2) == 3  # installed once
        os.kill(os.getpid(), signal.SIGTERM)
        assert announced.wait(5)
        assert len(calls) == 2 and "sdk" in calls  # the SDK still stops taking and drains
        assert ("http://gw/v2/ep/leave/w1", "tok") in calls
    finally:
        signal.signal(signal.SIGTERM, previous)
