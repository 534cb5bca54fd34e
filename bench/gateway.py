"""Gateway figures in one run, for the memory and Redis backends.

    python bench/gateway.py [--backends memory,redis] [--workers 4]

Prints: enqueue throughput (POST /run, 64 connections); runsync overhead over handler time
(p50/p99) with a minimal in-bench worker (gateway cost only) and with a real worker
(`python -m handler_worker`: our job loop on the runpod SDK's functions, over the job channel);
end-to-end trivial-job throughput with N real workers, without and with HANDLER_CONCURRENCY.
Redis is a redis-server of the bench's own (AOF, fsync every second), on a free port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

from handler_protocol.urls import worker_webhook_env

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.processes import RedisServer  # noqa: E402

ADMIN, CLIENT, TOKEN = "bench-admin", "bench-client", "bench-worker-token-0123456789"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_gateway(backend: str, workdir: Path) -> tuple[subprocess.Popen, str]:
    (workdir / "admin").write_text(ADMIN)
    (workdir / "client").write_text(CLIENT)
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "handler_gateway",
            "--backend",
            backend,
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--admin-key-file",
            str(workdir / "admin"),
            "--api-key-file",
            str(workdir / "client"),
            "--redis-prefix",
            f"bench-{uuid.uuid4().hex[:6]}",
            "--log-level",
            "WARNING",
        ],
        cwd=ROOT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
            return process, url
        time.sleep(0.05)
    raise RuntimeError("gateway did not start")


def start_worker(url: str, endpoint: str, worker_id: str, concurrency: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "HANDLER_"))}
    env.update(worker_webhook_env(url, endpoint))
    env.update(
        RUNPOD_POD_ID=worker_id,
        RUNPOD_AI_API_KEY=TOKEN,
        RUNPOD_PING_INTERVAL="2000",
        RUNPOD_SKIP_AUTO_SYSTEM_CHECKS="true",
        RUNPOD_LOG_LEVEL="ERROR",
        HANDLER_MODULE="handler",
        HANDLER_CONCURRENCY=str(concurrency),
        PYTHONPATH=str(ROOT / "examples" / "hello"),
    )
    return subprocess.Popen(
        [sys.executable, "-m", "handler_worker"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def register(session: aiohttp.ClientSession, url: str, endpoint: str) -> None:
    async with session.put(
        f"{url}/admin/v1/endpoints/{endpoint}",
        json={"workerToken": TOKEN},
        headers={"Authorization": f"Bearer {ADMIN}"},
    ) as response:
        assert response.status in (200, 201), await response.text()


async def enqueue_rate(
    session, url: str, endpoint: str, total: int, connections: int = 64
) -> float:
    headers = {"Authorization": f"Bearer {CLIENT}"}
    counter = iter(range(total))

    async def client():
        for n in counter:
            async with session.post(
                f"{url}/v2/{endpoint}/run", json={"input": {"n": n}}, headers=headers
            ) as response:
                assert response.status == 200, (response.status, await response.text())

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(connections)))
    return total / (time.perf_counter() - start)


async def minimal_worker(session, url: str, endpoint: str, stop_event: asyncio.Event) -> None:
    """Takes and answers jobs at once: what's left of runsync latency is the gateway's."""
    headers = {"Authorization": TOKEN}
    while not stop_event.is_set():
        async with session.get(f"{url}/v2/{endpoint}/job-take/bench-min?", headers=headers) as r:
            if r.status != 200:
                continue
            job = await r.json()
        async with session.post(
            f"{url}/v2/{endpoint}/job-done/bench-min/{job['id']}?",
            json={"output": job["input"]},
            headers=headers,
        ) as r:
            await r.read()


async def runsync_latencies(session, url: str, endpoint: str, count: int) -> list[float]:
    headers = {"Authorization": f"Bearer {CLIENT}"}
    samples = []
    for n in range(count):
        start = time.perf_counter()
        async with session.post(
            f"{url}/v2/{endpoint}/runsync", json={"input": {"name": n}}, headers=headers
        ) as response:
            body = await response.json()
        assert body["status"] == "COMPLETED", body
        samples.append(time.perf_counter() - start - body.get("executionTime", 0) / 1000)
    return samples


async def throughput(session, url: str, endpoint: str, jobs: int, timeout: float = 300) -> float:
    headers = {"Authorization": f"Bearer {CLIENT}"}
    start = time.perf_counter()
    await enqueue_rate(session, url, endpoint, jobs, connections=16)
    while time.perf_counter() - start < timeout:
        async with session.get(f"{url}/v2/{endpoint}/health", headers=headers) as response:
            done = (await response.json())["jobs"]["completed"]
        if done >= jobs:
            return jobs / (time.perf_counter() - start)
        await asyncio.sleep(0.05)
    raise TimeoutError("jobs did not complete")


async def bench_backend(backend: str, url: str, workers: int, workdir: Path) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        for endpoint in ("enq", "rs", "rsdk", "plain", "batched"):
            await register(session, url, endpoint)
        rate = await enqueue_rate(session, url, "enq", 3000)
        print(f"[{backend}] enqueue: {rate:,.0f} jobs/s (3000 POST /run, 64 connections)")

        stop_event = asyncio.Event()
        worker_task = asyncio.create_task(minimal_worker(session, url, "rs", stop_event))
        await runsync_latencies(session, url, "rs", 20)  # warm up
        samples = await runsync_latencies(session, url, "rs", 300)
        stop_event.set()
        worker_task.cancel()
        print(
            f"[{backend}] runsync overhead, gateway only: p50 {pct(samples, 0.5) * 1000:.2f} ms, "
            f"p99 {pct(samples, 0.99) * 1000:.2f} ms (300 jobs, minimal worker)"
        )

        sdk = start_worker(url, "rsdk", "sdk-1", 1)
        try:
            await runsync_latencies(session, url, "rsdk", 5)
            samples = await runsync_latencies(session, url, "rsdk", 50)
        finally:
            stop(sdk)
        print(
            f"[{backend}] runsync overhead, gateway + a real worker: "
            f"p50 {pct(samples, 0.5) * 1000:.1f} ms, p99 {pct(samples, 0.99) * 1000:.1f} ms "
            "(python -m handler_worker, trivial handler)"
        )

        for label, endpoint, concurrency, jobs in (
            ("concurrency 1", "plain", 1, 10 * workers),
            ("HANDLER_CONCURRENCY=64, batch take", "batched", 64, 2000),
        ):
            procs = [
                start_worker(url, endpoint, f"{endpoint}-{i}", concurrency) for i in range(workers)
            ]
            try:
                await asyncio.sleep(4)  # let the workers import and start polling
                rate = await throughput(session, url, endpoint, jobs)
            finally:
                for proc in procs:
                    stop(proc)
            print(
                f"[{backend}] end-to-end with {workers} real workers, {label}: "
                f"{rate:,.1f} jobs/s ({jobs} trivial jobs)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="memory,redis")
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    for backend in args.backends.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            redis_server = None
            if backend == "redis":
                redis_server = RedisServer(Path(tmp), appendfsync="everysec").start()
            gateway, url = start_gateway(
                redis_server.url if redis_server else "memory://", Path(tmp)
            )
            try:
                asyncio.run(bench_backend(backend, url, args.workers, Path(tmp)))
            finally:
                stop(gateway)
                if redis_server is not None:
                    redis_server.kill()


if __name__ == "__main__":
    main()
