"""Warm path side by side, in one run: runpod's own server (`--rp_serve_api`: the handler in the
HTTP process, no queue) against ours (gateway + real workers: memory and Redis, 1 worker, 1
worker with concurrency 16, 4 workers), interleaved over rounds so load drifts hit all alike.

    python bench/side_by_side.py [--rounds 3] [--requests 300]

Prints req/s, p50 and p99 of POST /runsync (trivial echo handler) per setup and client
concurrency, ours/peer ratios, CPU per job of the server (the peer, or our gateway) and of our
workers, /run enqueue rates (median over the rounds), and per job on Redis: the requests the
gateway sent (round trips; a MULTI block counts once) and the commands run (MONITOR).
No figure is asserted anywhere: this prints.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.processes import (  # noqa: E402
    CLIENT_KEY,
    GatewayProcess,
    RedisServer,
    free_port,
    kill_group,
    start_worker,
    subprocess_env,
)

TOKEN = "bench-side-by-side-token-0123456789"
MODULE = "handlers.echo_async"
FIXTURES = ROOT / "tests" / "fixtures"


@dataclass
class Setup:
    label: str
    url: str  # the runsync URL
    clients: int
    servers: list[int] = field(default_factory=list)  # the gateway's or the peer's pid
    workers: list[int] = field(default_factory=list)
    samples: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    requests: int = 0
    cpu: dict[str, float] = field(default_factory=lambda: {"server": 0.0, "workers": 0.0})


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and its descendants (the SDK's heartbeat process)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            kids = [int(child) for child in children.read().split()]
    except OSError:  # gone, or not Linux
        return 0.0
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(cpu_seconds(kid) for kid in kids)


HEADERS = {"Authorization": f"Bearer {CLIENT_KEY}"}


async def clients(count: int, connections: int, request) -> float:
    """`count` calls of `request()` spread over `connections` concurrent clients; seconds."""
    remaining = count

    async def client() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await request()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(connections)))
    return time.perf_counter() - started


async def drive(session: aiohttp.ClientSession, setup: Setup, count: int) -> None:
    """`count` runsync requests over `setup.clients` connections; latencies in ms."""

    async def runsync() -> None:
        started = time.perf_counter()
        async with session.post(setup.url, json={"input": {"n": 1}}, headers=HEADERS) as r:
            body = await r.json()
        assert body.get("status") == "COMPLETED" or "output" in body, body
        setup.samples.append((time.perf_counter() - started) * 1000)

    before = {part: sum(map(cpu_seconds, pids)) for part, pids in setup_pids(setup).items()}
    setup.elapsed += await clients(count, setup.clients, runsync)
    setup.requests += count
    for part, pids in setup_pids(setup).items():
        setup.cpu[part] += sum(map(cpu_seconds, pids)) - before[part]


def setup_pids(setup: Setup) -> dict[str, list[int]]:
    return {"server": setup.servers, "workers": setup.workers}


def peer(workdir: Path) -> tuple[subprocess.Popen, str]:
    """runpod's local API server on our handler module (no gateway, no queue)."""
    port = free_port()
    env = subprocess_env(HANDLER_MODULE=MODULE, PYTHONPATH=f"{FIXTURES}:{ROOT}")
    env.pop("RUNPOD_WEBHOOK_GET_JOB", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "handler_worker", "--rp_serve_api", "--rp_api_port", str(port),
         "--rp_log_level", "ERROR"],
        env=env, cwd=ROOT, stdout=open(workdir / "peer.log", "w"),  # noqa: SIM115
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    return process, f"http://127.0.0.1:{port}/runsync"


async def wait_ready(session: aiohttp.ClientSession, url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with session.post(url, json={"input": {"n": 0}}, headers=HEADERS) as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} never answered")
        await asyncio.sleep(0.2)


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class RedisCommands:
    """Counts, through MONITOR, what clients send (a MULTI..EXEC block is one request) and every
    command Redis runs, inside scripts too. Idle pub/sub and the monitor itself are left out."""

    def __init__(self, url: str):
        self.client = redis.Redis.from_url(url, decode_responses=True)
        self.requests = self.scripts = self.commands = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._count, daemon=True)

    def _count(self) -> None:
        in_multi: set[str] = set()
        with self.client.monitor() as monitor:
            self._ready.set()
            while not self._stop.is_set():
                entry = monitor.next_command()
                command = entry["command"].split(" ", 1)[0].strip('"').upper()
                if command in ("MONITOR", "PING") or entry.get("client_type") == "lua":
                    self.commands += entry.get("client_type") == "lua"
                    continue
                self.commands += 1
                source = f"{entry.get('client_address')}:{entry.get('client_port')}"
                if command == "MULTI":
                    in_multi.add(source)
                elif command in ("EXEC", "DISCARD"):
                    in_multi.discard(source)
                    self.requests += 1
                elif source not in in_multi:
                    self.requests += 1
                    self.scripts += command in ("EVALSHA", "EVAL", "FCALL")

    def __enter__(self) -> RedisCommands:
        self._ready = threading.Event()
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.client.ping()  # wakes the monitor so it sees the stop
        self._thread.join(10)
        self.client.close()


async def enqueue_rate(session, gateway: GatewayProcess, endpoint: str, count: int = 2000) -> float:
    async def enqueue() -> None:
        url = f"{gateway.url}/v2/{endpoint}/run"
        async with session.post(url, json={"input": {}}, headers=HEADERS) as response:
            await response.read()

    return count / await clients(count, 16, enqueue)


async def run(args: argparse.Namespace, workdir: Path) -> None:
    processes: list[subprocess.Popen] = []
    redis_server = RedisServer(workdir / "redis", appendfsync="everysec").start()
    gateways = {
        "memory": GatewayProcess("memory://", workdir / "memory").start(),
        "redis": GatewayProcess(redis_server.url, workdir / "redis-gw").start(),
    }
    setups: list[Setup] = []
    try:
        peer_process, peer_url = peer(workdir)
        processes.append(peer_process)
        setups += [
            Setup("peer, c1", peer_url, 1, [peer_process.pid]),
            Setup("peer, c16", peer_url, 16, [peer_process.pid]),
        ]
        layouts = (("1 worker", 1, 1, 1), ("1 worker x16", 1, 16, 16), ("4 workers", 4, 1, 16))
        for backend, gateway in gateways.items():
            for label, workers, concurrency, clients in layouts:
                if backend == "redis" and label != "1 worker":
                    continue
                endpoint = f"{backend}-{workers}-{concurrency}"
                gateway.register(endpoint, TOKEN, heartbeatIntervalSeconds=1, heartbeatMisses=3)
                worker_pids = []
                for n in range(workers):
                    env = gateway.worker_env(endpoint, TOKEN, f"{endpoint}-w{n}",
                                             HANDLER_CONCURRENCY=str(concurrency))  # fmt: skip
                    processes.append(start_worker(env, MODULE, [], workdir / f"{endpoint}-{n}.log"))
                    worker_pids.append(processes[-1].pid)
                url = f"{gateway.url}/v2/{endpoint}/runsync"
                label = f"ours {backend}, {label}, c{clients}"
                pids = [gateway.process.pid]
                setups.append(Setup(label, url, clients, pids, worker_pids))
        connector = aiohttp.TCPConnector(limit=64)
        async with aiohttp.ClientSession(connector=connector) as session:
            for setup in setups:
                await wait_ready(session, setup.url)
            enqueue: dict[str, list[float]] = {backend: [] for backend in gateways}
            for backend, gateway in gateways.items():  # endpoints no worker takes from
                gateway.register(f"{backend}-enqueue", TOKEN)
            for _ in range(args.rounds):  # interleaved: every setup once per round
                for setup in setups:
                    await drive(session, setup, args.requests)
                for backend, gateway in gateways.items():
                    rate = await enqueue_rate(session, gateway, f"{backend}-enqueue")
                    enqueue[backend].append(rate)
            jobs = 200
            redis_setup = Setup(
                "redis commands", f"{gateways['redis'].url}/v2/redis-1-1/runsync", 1
            )
            with RedisCommands(redis_server.url) as counted:
                await drive(session, redis_setup, jobs)
    finally:
        for process in processes:
            kill_group(process)
        for gateway in gateways.values():
            gateway.stop()
        redis_server.kill()
    peers = {s.clients: s for s in setups if s.label.startswith("peer")}
    print(f"load: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cores; "
          f"{args.rounds} rounds x {args.requests} runsync per setup")  # fmt: skip
    print(f"{'setup':<36} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'ours/peer':>10}")
    for setup in setups:
        rate = setup.requests / setup.elapsed
        reference = peers.get(1 if setup.clients == 1 else 16)
        ratio = rate / (reference.requests / reference.elapsed) if reference else float("nan")
        print(f"{setup.label:<36} {rate:8.0f} {statistics.median(setup.samples):8.1f} "
              f"{pct(setup.samples, 0.99):8.1f} {ratio:10.3f}")  # fmt: skip
    print(f"\n{'CPU ms per job (redis-server not counted)':<44} {'server':>8} {'workers':>8}")
    for setup in setups:
        server, workers = (
            1000 * setup.cpu[part] / setup.requests for part in ("server", "workers")
        )
        print(f"{setup.label:<44} {server:8.3f} {workers:8.3f}")
    print(f"Redis per job (runsync, 1 worker): {counted.requests / jobs:.1f} requests from the "
          f"gateway ({counted.scripts / jobs:.1f} scripts), {counted.commands / jobs:.1f} "
          "commands run")  # fmt: skip
    memory, on_redis = (statistics.median(enqueue[b]) for b in ("memory", "redis"))
    print(f"/run enqueue c16 (no worker taking; median of {args.rounds} rounds): memory "
          f"{memory:.0f}/s, redis {on_redis:.0f}/s (redis/memory {on_redis / memory:.2f})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for name in ("memory", "redis-gw", "redis"):
            (workdir / name).mkdir()
        asyncio.run(run(args, workdir))


if __name__ == "__main__":
    main()
