"""Gateway fixtures: an app per backend (memory, real Redis) with short long-poll timings."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import pytest
import pytest_asyncio
import redis
from aiohttp.test_utils import TestClient, TestServer

from handler_gateway.backends import open_backend
from handler_gateway.keys import Keys
from handler_gateway.operations import Timings
from handler_gateway.routes import GATEWAY, create_app
from tests.processes import shared_redis_url

CLIENT_KEY = "client-key-for-tests"
ADMIN_KEY = "admin-key-for-tests"
WORKER_TOKEN = "worker-token-0123456789"
OTHER_TOKEN = "other-token-0123456789"
FAST = Timings(
    take_hold=0.6,
    stop_hold=0.6,
    runsync_wait=2.0,
    runsync_wait_max=10.0,
    recheck=0.2,
    sweep_interval=0.1,
    heartbeat_write_interval=0.0,
    stop_resend=0.3,
)


def redis_url() -> str:
    """The test run's own redis-server (started on first use, on a free port)."""
    return shared_redis_url()


def backend_params():
    return ["memory", "redis"]


def clean_redis_prefix(prefix: str, url: str | None = None) -> None:
    client = redis.Redis.from_url(url or redis_url())
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(params=backend_params())
def backend_kind(request) -> str:
    return request.param


@pytest.fixture
def make_backend(backend_kind):
    prefixes: list[str] = []

    def make():
        if backend_kind == "memory":
            return open_backend("memory://")
        prefix = f"test-{uuid.uuid4().hex[:10]}"
        prefixes.append(prefix)
        return open_backend(redis_url(), prefix=prefix)

    yield make
    for prefix in prefixes:
        clean_redis_prefix(prefix)


@dataclass
class Api:
    """A test client with the keys and helpers the contract tests use."""

    client: TestClient
    endpoint: str = "ep"

    @property
    def gateway(self):
        return self.client.app[GATEWAY]

    def client_headers(self, key: str = CLIENT_KEY) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    def worker_headers(self, token: str = WORKER_TOKEN) -> dict[str, str]:
        return {"Authorization": token}

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_KEY}"}

    async def register(self, endpoint: str | None = None, **config) -> dict:
        body = {"workerToken": WORKER_TOKEN, **config}
        response = await self.client.put(
            f"/admin/v1/endpoints/{endpoint or self.endpoint}",
            json=body,
            headers=self.admin_headers(),
        )
        assert response.status in (200, 201), await response.text()
        return await response.json()

    async def run(self, job_input, **extra) -> str:
        response = await self.client.post(
            f"/v2/{self.endpoint}/run",
            json={"input": job_input, **extra},
            headers=self.client_headers(),
        )
        assert response.status == 200, await response.text()
        return (await response.json())["id"]

    async def status(self, job_id: str) -> dict:
        response = await self.client.get(
            f"/v2/{self.endpoint}/status/{job_id}", headers=self.client_headers()
        )
        assert response.status == 200, await response.text()
        return await response.json()

    async def take(self, worker: str = "w1", batch: int | None = None):
        route = "job-take" if batch is None else "job-take-batch"
        query = "?job_in_progress=0" + (f"&batch_size={batch}" if batch else "")
        response = await self.client.get(
            f"/v2/{self.endpoint}/{route}/{worker}{query}", headers=self.worker_headers()
        )
        if response.status == 204:
            return None
        assert response.status == 200, await response.text()
        return await response.json()

    async def done(
        self, worker: str, job_id: str, body: dict, stream: bool = False, query: str = ""
    ) -> dict:
        """A result post; `query` adds parameters (ours: `take=N`)."""
        # The runpod SDK posts JSON labelled as form data: do the same.
        import json

        extra = f"&{query}" if query else ""
        response = await self.client.post(
            f"/v2/{self.endpoint}/job-done/{worker}/{job_id}?isStream={str(stream).lower()}{extra}",
            data=json.dumps(body),
            headers={**self.worker_headers(), "Content-Type": "application/x-www-form-urlencoded"},
        )
        assert response.status == 200, await response.text()
        return await response.json()

    async def chunk(self, worker: str, job_id: str, output, query: str = "") -> dict:
        extra = f"&{query}" if query else ""
        response = await self.client.post(
            f"/v2/{self.endpoint}/job-stream/{worker}/{job_id}?isStream=false{extra}",
            json={"output": output},
            headers=self.worker_headers(),
        )
        assert response.status == 200, await response.text()
        return await response.json()

    async def health(self) -> dict:
        response = await self.client.get(
            f"/v2/{self.endpoint}/health", headers=self.client_headers()
        )
        assert response.status == 200
        return await response.json()

    async def wait_status(self, job_id: str, wanted: str, timeout: float = 5.0) -> dict:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            view = await self.status(job_id)
            if view["status"] == wanted or asyncio.get_running_loop().time() > deadline:
                assert view["status"] == wanted, view
                return view
            await asyncio.sleep(0.05)


class ServedAsInProduction(TestServer):
    """The app as `python -m handler_gateway` serves it (`web.run_app`): a handler whose caller
    went away is not cancelled, aiohttp's default; TestServer alone would cancel it."""

    async def _make_runner(self, **kwargs):
        return await super()._make_runner(**{**kwargs, "handler_cancellation": False})


@pytest_asyncio.fixture
async def make_api(make_backend):
    """A gateway app on this test's backend with the given timings, closed after the test."""
    clients: list[TestClient] = []

    async def make(timings: Timings = FAST) -> Api:
        keys = Keys.of([CLIENT_KEY], [ADMIN_KEY])
        app = create_app(make_backend(), keys, timings, max_body=1024 * 1024)
        client = TestClient(ServedAsInProduction(app))
        await client.start_server()
        clients.append(client)
        api = Api(client)
        await api.register()
        return api

    yield make
    for client in clients:
        await client.close()


@pytest_asyncio.fixture
async def api(make_api) -> Api:
    return await make_api()
