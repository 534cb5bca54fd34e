"""Where an `@remote` call made inside a worker goes: its own endpoint and the endpoints of the
job's call chain run in-process, others through the gateway carrying the chain; decided at
each call, for classes too. Plain values, `submit` replaced by a recorder."""

from __future__ import annotations

import pytest

from handler_worker import chains, remote

WORKER_ENV = {
    "RUNPOD_WEBHOOK_GET_JOB": "http://gw/v2/ns--a/job-take/$ID?",
    "RUNPOD_ENDPOINT_ID": "ns--a",
    "HANDLER_REMOTE_URL": "http://gw",
    "HANDLER_REMOTE_API_KEY": "calls-key",
}


@pytest.fixture
def sent(monkeypatch):
    """Requests `submit` would send, as (endpoint, request); answers 'remote'."""
    for name, value in WORKER_ENV.items():
        monkeypatch.setenv(name, value)
    found = []

    async def submit(config, endpoint, request):
        found.append((config.namespace, endpoint, request))
        return "remote"

    monkeypatch.setattr(remote, "submit", submit)
    return found


@remote.remote(endpoint="b")
def on_b():
    return "local"


@remote.remote(endpoint="a")
def on_a():
    return "local"


@remote.remote(endpoint="b")
class ModelB:
    def __init__(self, name):
        self.name = name

    def who(self):
        return "local"


def test_a_call_to_another_endpoint_goes_through_the_gateway_with_the_chain(sent):
    with chains.running_in(["ns--c"]):
        assert on_b() == "remote"
    namespace, endpoint, request = sent[0]
    assert (namespace, endpoint) == ("ns", "b")
    assert request["call_chain"] == ["ns--c", "ns--a"]  # built in the caller's context


def test_calls_to_its_own_endpoint_or_back_into_the_chain_stay_in_process(sent):
    assert on_a() == "local"
    with chains.running_in(["ns--b"]):
        assert on_b() == "local"
    assert sent == []


def test_a_class_instance_decides_at_each_call(sent):
    model = ModelB("m")  # made outside any chain: remote
    assert model.who() == "remote"
    with chains.running_in(["ns--b"]):  # a job that B called: back into B is in-process
        assert model.who() == "local"
    assert len(sent) == 1


def test_without_the_calls_key_everything_stays_in_process(sent, monkeypatch):
    monkeypatch.delenv("HANDLER_REMOTE_API_KEY")
    assert on_b() == "local" and ModelB("m").who() == "local"
    assert sent == []
