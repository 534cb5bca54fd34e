"""End-to-end fixtures: a gateway subprocess per backend, worker subprocesses, the runpod client."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import runpod

from tests.gateway.conftest import backend_params, clean_redis_prefix, redis_url
from tests.processes import CLIENT_KEY, GatewayProcess, kill_group, start_worker

TOKEN = "e2e-worker-token-0123456789"


def serve_gateway(kind: str, tmp_path, *extra_args: str) -> Iterator[GatewayProcess]:
    """A gateway subprocess on `kind` ("memory" or "redis") with endpoint "ep" registered."""
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    if kind == "memory":
        process = GatewayProcess("memory://", tmp_path, extra_args=extra_args)
    else:
        args = ("--redis-prefix", prefix, *extra_args)
        process = GatewayProcess(redis_url(), tmp_path, extra_args=args)
    process.start()
    process.register("ep", TOKEN, heartbeatIntervalSeconds=1, heartbeatMisses=3)
    yield process
    process.stop()
    if kind != "memory":
        clean_redis_prefix(prefix)


@pytest.fixture(params=backend_params())
def gateway(request, tmp_path):
    yield from serve_gateway(request.param, tmp_path)


@pytest.fixture
def endpoint(gateway, monkeypatch):
    """An unmodified runpod.Endpoint pointed at the gateway."""
    monkeypatch.setattr(runpod, "endpoint_url_base", gateway.url + "/v2")
    monkeypatch.setattr(runpod, "api_key", CLIENT_KEY)
    return runpod.Endpoint("ep")


@pytest.fixture
def workers(gateway, tmp_path):
    started = []

    def start(module: str, pythonpath=(), worker_id: str | None = None, **env: str):
        worker_id = worker_id or f"worker-{len(started) + 1}"
        process = start_worker(
            gateway.worker_env("ep", TOKEN, worker_id, **env),
            module,
            list(pythonpath),
            tmp_path / f"{worker_id}.log",
        )
        started.append(process)
        return process

    yield start
    for process in started:
        kill_group(process)
