"""What the per-caller rate limit costs a request: one gateway per backend (memory, a Redis of
its own) with three endpoints alike but for their rate limit: none; one that never refuses
(every request takes a token, from this replica's lease of them); one whose burst of 3 makes
every request ask the shared bucket (what a low rate does). Requests at one connection, the
endpoints interleaved over rounds.

    python bench/rate_limits.py [--rounds 7] [--requests 2000]

Prints p50 and p99 of POST /run and GET /status per endpoint and what each limit adds at p50
(the issue's goal: under 0.2 ms on Redis), medians over the rounds. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from side_by_side import HEADERS, TOKEN, pct  # noqa: E402

from tests.processes import GatewayProcess, RedisServer  # noqa: E402

LIMITS = {
    "plain": None,
    "leased": {"requestsPerSecond": 1_000_000, "burst": 1_000_000},  # never refuses
    "exact": {"requestsPerSecond": 1_000_000, "burst": 3},  # a lease of 1: a bucket call each
}
ENDPOINTS = tuple(LIMITS)


async def latencies(session: aiohttp.ClientSession, method: str, url: str, count: int):
    samples = []
    body = {"input": {}} if method == "POST" else None
    for _ in range(count):
        started = time.perf_counter()
        async with session.request(method, url, json=body, headers=HEADERS) as response:
            await response.read()
            assert response.status == 200, await response.text()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


async def measure(gateway: GatewayProcess, args: argparse.Namespace) -> dict:
    """route -> endpoint -> (p50s, p99s) over the rounds."""
    for name, limit in LIMITS.items():
        gateway.register(name, TOKEN, **({"rateLimit": limit} if limit else {}))
    found: dict = {}
    async with aiohttp.ClientSession() as session:
        jobs = {}
        for name in ENDPOINTS:
            async with session.post(
                f"{gateway.url}/v2/{name}/run", json={"input": {}}, headers=HEADERS
            ) as response:
                jobs[name] = (await response.json())["id"]
        routes = {
            "POST /run": ("POST", "/v2/{ep}/run"),
            "GET /status": ("GET", "/v2/{ep}/status/{job}"),
        }
        for name in ENDPOINTS:  # warm both
            await latencies(session, "GET", f"{gateway.url}/v2/{name}/health", 100)
        for round_ in range(args.rounds):
            order = ENDPOINTS[round_ % 3 :] + ENDPOINTS[: round_ % 3]
            for route, (method, path) in routes.items():
                for name in order:
                    url = gateway.url + path.format(ep=name, job=jobs[name])
                    samples = await latencies(session, method, url, args.requests)
                    p50s, p99s = found.setdefault(route, {}).setdefault(name, ([], []))
                    p50s.append(pct(samples, 0.5))
                    p99s.append(pct(samples, 0.99))
    return found


def report(backend: str, found: dict) -> None:
    for route, by_endpoint in found.items():
        p50, p99 = ({name: statistics.median(by_endpoint[name][i]) for name in ENDPOINTS}
                    for i in (0, 1))  # fmt: skip
        figures = "".join(f"{p50[name]:>12.3f}{p99[name]:>8.3f}" for name in ENDPOINTS)
        added = "".join(f"{p50[name] - p50['plain']:>+10.3f}" for name in ENDPOINTS[1:])
        print(f"{backend:<8}{route:<13}{figures}{added}")


async def run(args: argparse.Namespace, workdir: Path) -> None:
    (workdir / "redis-data").mkdir()
    redis_server = RedisServer(workdir / "redis-data").start()
    backends = {"memory": "memory://", "redis": redis_server.url}
    print(f"{args.rounds} rounds of {args.requests} requests per route and endpoint, c1; medians")
    heads = "".join(f"{name + ' p50':>12}{'p99':>8}" for name in ENDPOINTS)
    added = "".join(f"{'+' + name:>10}" for name in ENDPOINTS[1:])
    print(f"{'backend':<8}{'route (ms)':<13}{heads}{added}")
    try:
        for backend, url in backends.items():
            (workdir / backend).mkdir()
            gateway = GatewayProcess(url, workdir / backend).start()
            try:
                report(backend, await measure(gateway, args))
            finally:
                gateway.stop()
    finally:
        redis_server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        asyncio.run(run(args, Path(workdir)))


if __name__ == "__main__":
    main()
