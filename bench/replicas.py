"""What waiting for a replica costs: a Redis primary with one replica, two gateways on it (one
answering submits at once, one after `WAIT 1`), interleaved over rounds.

    python bench/replicas.py [--rounds 5] [--requests 1500]

Prints /run enqueue rates at 16 connections and POST /run latency at one connection (p50, p99)
per gateway, medians over the rounds. No figure is asserted anywhere: this prints.
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
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from side_by_side import HEADERS, TOKEN, clients, pct  # noqa: E402

from tests.processes import GatewayProcess, primary_and_replica  # noqa: E402


async def latencies(session: aiohttp.ClientSession, url: str, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        async with session.post(url, json={"input": {}}, headers=HEADERS) as response:
            await response.read()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


async def run(args: argparse.Namespace, workdir: Path) -> None:
    for name in ("wait-0", "wait-1"):
        (workdir / name).mkdir()
    primary, replica = primary_and_replica(workdir)
    gateways = {
        f"WAIT {n}": GatewayProcess(
            primary.url, workdir / f"wait-{n}", extra_args=("--redis-wait-replicas", str(n))
        ).start()
        for n in (0, 1)
    }
    try:
        with redis.Redis(port=replica.port, decode_responses=True) as watch:
            while watch.info("replication").get("master_link_status") != "up":
                await asyncio.sleep(0.1)
        rates: dict[str, list[float]] = {name: [] for name in gateways}
        p50s: dict[str, list[float]] = {name: [] for name in gateways}
        p99s: dict[str, list[float]] = {name: [] for name in gateways}
        async with aiohttp.ClientSession() as session:
            for gateway in gateways.values():
                gateway.register("ep", TOKEN)
                await latencies(session, f"{gateway.url}/v2/ep/run", 50)  # warm
            for _ in range(args.rounds):
                for name, gateway in gateways.items():
                    url = f"{gateway.url}/v2/ep/run"

                    async def enqueue(url: str = url) -> None:
                        async with session.post(url, json={"input": {}}, headers=HEADERS) as r:
                            await r.read()

                    rates[name].append(args.requests / await clients(args.requests, 16, enqueue))
                    samples = await latencies(session, url, args.requests // 5)
                    p50s[name].append(pct(samples, 0.5))
                    p99s[name].append(pct(samples, 0.99))
        print(f"{args.rounds} rounds; Redis primary + 1 replica on this machine; medians")
        print(f"{'gateway':<10}{'enqueue c16 jobs/s':>20}{'POST /run c1 p50 ms':>22}{'p99 ms':>9}")
        for name in gateways:
            print(
                f"{name:<10}{statistics.median(rates[name]):>20,.0f}"
                f"{statistics.median(p50s[name]):>22.2f}{statistics.median(p99s[name]):>9.2f}"
            )
    finally:
        for gateway in gateways.values():
            gateway.stop()
        replica.kill()
        primary.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=1500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        asyncio.run(run(args, Path(workdir)))


if __name__ == "__main__":
    main()
