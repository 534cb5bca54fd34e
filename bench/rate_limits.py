"""What the per-caller rate limit costs a request: one gateway per backend (memory, a Redis of
its own), endpoints alike but for their rate limit, requests at one connection, the endpoints
interleaved over rounds. Two callers:

- busy: requests back to back against a limit that never refuses them (each takes a token,
  almost always from this replica's lease of them);
- slow: 40 requests/s against a limit of 50/s with a burst of 3 (a lease of one token: each
  request asks the shared bucket, with its creation for a submit, after answering for a read).

    python bench/rate_limits.py [--rounds 7] [--requests 2000]

Prints p50 and p99 of POST /run and GET /status per endpoint and what the limit adds at p50
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

CALLERS = {  # caller -> (its limit, seconds between its requests, share of --requests)
    "busy": ({"requestsPerSecond": 1_000_000, "burst": 1_000_000}, 0.0, 1.0),
    "slow": ({"requestsPerSecond": 50, "burst": 3}, 0.025, 0.1),
}
ROUTES = {"POST /run": ("POST", "/v2/{ep}/run"), "GET /status": ("GET", "/v2/{ep}/status/{job}")}


async def latencies(
    session: aiohttp.ClientSession, method: str, url: str, count: int, pause: float
) -> list[float]:
    samples = []
    body = {"input": {}} if method == "POST" else None
    for _ in range(count):
        started = time.perf_counter()
        async with session.request(method, url, json=body, headers=HEADERS) as response:
            await response.read()
            assert response.status == 200, await response.text()
        samples.append((time.perf_counter() - started) * 1000)
        if pause:
            await asyncio.sleep(pause)
    return samples


async def measure(gateway: GatewayProcess, args: argparse.Namespace) -> dict:
    """(caller, route) -> endpoint ("plain" or "limited") -> (p50s, p99s) over the rounds."""
    found: dict = {}
    async with aiohttp.ClientSession() as session:
        for caller, (limit, pause, share) in CALLERS.items():
            endpoints = {"plain": f"{caller}-plain", "limited": f"{caller}-limited"}
            gateway.register(endpoints["plain"], TOKEN)
            gateway.register(endpoints["limited"], TOKEN, rateLimit=limit)
            jobs = {}
            for endpoint in endpoints.values():
                async with session.post(
                    f"{gateway.url}/v2/{endpoint}/run", json={"input": {}}, headers=HEADERS
                ) as response:
                    jobs[endpoint] = (await response.json())["id"]
                await latencies(session, "GET", f"{gateway.url}/v2/{endpoint}/health", 20, pause)
            count = max(20, int(args.requests * share))
            for round_ in range(args.rounds):
                order = list(endpoints.items())[:: 1 if round_ % 2 == 0 else -1]
                for route, (method, path) in ROUTES.items():
                    for name, endpoint in order:
                        url = gateway.url + path.format(ep=endpoint, job=jobs[endpoint])
                        samples = await latencies(session, method, url, count, pause)
                        p50s, p99s = found.setdefault((caller, route), {}).setdefault(
                            name, ([], [])
                        )
                        p50s.append(pct(samples, 0.5))
                        p99s.append(pct(samples, 0.99))
    return found


def report(backend: str, found: dict) -> None:
    for (caller, route), by_endpoint in found.items():
        p50, p99 = ({name: statistics.median(by_endpoint[name][i]) for name in by_endpoint}
                    for i in (0, 1))  # fmt: skip
        print(
            f"{backend:<8}{caller:<7}{route:<13}{p50['plain']:>10.3f}{p99['plain']:>8.3f}"
            f"{p50['limited']:>12.3f}{p99['limited']:>8.3f}{p50['limited'] - p50['plain']:>+12.3f}"
        )


async def run(args: argparse.Namespace, workdir: Path) -> None:
    (workdir / "redis-data").mkdir()
    redis_server = RedisServer(workdir / "redis-data").start()
    backends = {"memory": "memory://", "redis": redis_server.url}
    print(f"{args.rounds} rounds, c1, medians; busy: {args.requests} requests back to back per route "
          f"and endpoint, slow: {max(20, args.requests // 10)} at 40/s")  # fmt: skip
    print(
        f"{'backend':<8}{'caller':<7}{'route (ms)':<13}{'plain p50':>10}{'p99':>8}"
        f"{'limited p50':>12}{'p99':>8}{'added p50':>12}"
    )
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
