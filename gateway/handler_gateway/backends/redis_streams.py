"""The production backend (`redis://`): Redis Streams queues, records and counters in Redis.

Each endpoint's queue is a stream read through a consumer group; a job record changes only in
a WATCH/MULTI transaction together with its effects, so gateway replicas share one Redis
safely. Keys carry the endpoint as a hash tag (`{ep}`) so Redis Cluster keeps them together.
Long-polls wake through one pub/sub channel; every wait also re-checks on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
import uuid
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

from handler_gateway.backends import (
    Backend,
    BackendUnavailable,
    Notifier,
    Transition,
    WorkerPoll,
    WorkerRecord,
    change_channels,
    queue_channel,
    stop_channel,
)
from handler_gateway.jobs import COUNTERS, Change, JobRecord, JobStatus
from handler_gateway.models import EndpointConfig

log = logging.getLogger("handler_gateway.redis")
GROUP = "takers"
# An entry read from a queue but not claimed for this long was left by a dead replica.
ORPHAN_IDLE_MS = 15_000


def _unavailable(method):
    @functools.wraps(method)
    async def wrapper(self, *args, **kwargs):
        try:
            return await method(self, *args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # redis-py turns a cancelled command into a connection error: keep the cancel.
                raise asyncio.CancelledError from exc
            raise BackendUnavailable(f"{type(exc).__name__}: {exc}") from None

    return wrapper


class RedisBackend(Backend):
    def __init__(
        self,
        url: str,
        prefix: str = "hop",
        replica: str | None = None,
        max_connections: int = 256,
        **_: Any,
    ):
        self.url = url
        self.prefix = prefix
        self.replica = replica or f"gw-{uuid.uuid4().hex[:12]}"
        # Blocking pool: many long-polls and bursts wait for a connection instead of failing.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=2,
            socket_timeout=10,
            max_connections=max_connections,
            timeout=5,
        )
        self.redis = aioredis.Redis(connection_pool=pool)
        self.notifier = Notifier()
        self._channel = f"{prefix}:notify"
        self._listener: asyncio.Task[None] | None = None
        self._pubsub: Any = None
        self._groups: set[str] = set()

    # -- keys --------------------------------------------------------------------------------
    def _k(self, endpoint: str, *parts: str) -> str:
        return f"{self.prefix}:{{{endpoint}}}:" + ":".join(parts)

    @property
    def _endpoints_key(self) -> str:
        return f"{self.prefix}:endpoints"

    @property
    def _activity_key(self) -> str:
        return f"{self.prefix}:activity"

    # -- notifications -----------------------------------------------------------------------
    def _ensure_listener(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def _listen(self) -> None:
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            self._pubsub = pubsub
            try:
                await pubsub.subscribe(self._channel)
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "message":
                        self.notifier.notify(message["data"])
            except (RedisError, OSError) as exc:
                log.debug("notification listener reconnecting: %s", exc)
                await self._close_pubsub()
                await asyncio.sleep(0.5)

    async def _close_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pubsub.aclose(), 2)

    # -- endpoints -------------------------------------------------------------------------
    async def _ensure_group(self, endpoint: str) -> None:
        queue = self._k(endpoint, "queue")
        try:
            await self.redis.xgroup_create(queue, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add(endpoint)

    async def put_endpoint(self, config: EndpointConfig) -> None:
        await self.redis.hset(self._endpoints_key, config.id, config.model_dump_json())
        await self._ensure_group(config.id)

    async def get_endpoint(self, endpoint: str) -> EndpointConfig | None:
        self._ensure_listener()
        raw = await self.redis.hget(self._endpoints_key, endpoint)
        return EndpointConfig.model_validate_json(raw) if raw else None

    async def delete_endpoint(self, endpoint: str) -> bool:
        removed = await self.redis.hdel(self._endpoints_key, endpoint)
        await self.redis.hdel(self._activity_key, endpoint)
        keys = [key async for key in self.redis.scan_iter(match=self._k(endpoint, "*"), count=500)]
        for start in range(0, len(keys), 500):
            await self.redis.unlink(*keys[start : start + 500])
        self._groups.discard(endpoint)
        return bool(removed)

    async def list_endpoints(self) -> list[EndpointConfig]:
        raw = await self.redis.hgetall(self._endpoints_key)
        return [EndpointConfig.model_validate_json(value) for value in raw.values()]

    # -- jobs --------------------------------------------------------------------------------
    def _stage(self, pipe: Any, change: Change, with_input: bool = False) -> None:
        """Queue the commands that store `change` on a MULTI pipeline."""
        job, effects = change.job, change.effects
        endpoint = job.endpoint
        job_key = self._k(endpoint, "job", job.id)
        input_key = self._k(endpoint, "input", job.id)
        pipe.set(job_key, job.model_dump_json(exclude={"input"}))
        if with_input:  # a new job: nothing to expire, persist or deactivate yet
            pipe.set(input_key, json.dumps(job.input))
        elif job.terminal and not effects.dead_letter:
            expire_ms = int(job.expires_at * 1000)
            for key in (job_key, input_key, self._k(endpoint, "chunks", job.id)):
                pipe.pexpireat(key, expire_ms)
        elif effects.enqueue:  # back in line after a result's expiry was set
            pipe.persist(job_key)
            pipe.persist(input_key)
        if job.status == JobStatus.IN_PROGRESS:
            pipe.sadd(self._k(endpoint, "active"), job.id)
        elif not with_input:
            pipe.srem(self._k(endpoint, "active"), job.id)
        if effects.activity:
            stamp = job.finished_at or job.started_at or job.created_at
            pipe.hset(self._activity_key, endpoint, repr(stamp))
        if effects.enqueue:
            pipe.xadd(self._k(endpoint, "queue"), {"id": job.id})
        for name, delta in effects.counters.items():
            pipe.hincrby(self._k(endpoint, "counters"), name, delta)
        if effects.release_worker:
            pipe.srem(self._k(endpoint, "wjobs", effects.release_worker), job.id)
        if effects.assign_worker:
            pipe.sadd(self._k(endpoint, "wjobs", effects.assign_worker), job.id)
        if effects.stop_worker:
            pipe.hset(self._k(endpoint, "stops", effects.stop_worker), job.id, "0")
        if effects.dead_letter:
            pipe.rpush(self._k(endpoint, "dlq"), job.id)
        if effects.undead_letter:
            pipe.lrem(self._k(endpoint, "dlq"), 0, job.id)
        for channel in change_channels(change):
            pipe.publish(self._channel, channel)

    async def create_job(self, change: Change) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            self._stage(pipe, change, with_input=True)
            await pipe.execute()

    @staticmethod
    def _parse(raw: str | None, raw_input: str | None) -> JobRecord | None:
        if raw is None:
            return None
        job = JobRecord.model_validate_json(raw)
        if raw_input is not None:
            job.input = json.loads(raw_input)
        return job

    async def get_job(self, endpoint: str, job_id: str) -> JobRecord | None:
        raw = await self.redis.get(self._k(endpoint, "job", job_id))
        return self._parse(raw, None)

    async def _transact(
        self,
        endpoint: str,
        job_id: str,
        transition: Transition,
        ack: str | None = None,
        with_input: bool = False,
    ) -> Change | None:
        job_key = self._k(endpoint, "job", job_id)
        queue = self._k(endpoint, "queue")
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(job_key)
                    if with_input:
                        raw, raw_input = await pipe.mget(
                            job_key, self._k(endpoint, "input", job_id)
                        )
                        job = self._parse(raw, raw_input)
                    else:
                        job = self._parse(await pipe.get(job_key), None)
                    change = transition(job) if job is not None else None
                    pipe.multi()
                    if change is not None:
                        self._stage(pipe, change)
                    if ack is not None:
                        pipe.xack(queue, GROUP, ack)
                        pipe.xdel(queue, ack)
                    if change is not None or ack is not None:
                        await pipe.execute()
                    else:
                        await pipe.reset()
                    return change
                except WatchError:
                    continue

    async def update_job(self, endpoint: str, job_id: str, transition: Transition) -> Change | None:
        return await self._transact(endpoint, job_id, transition)

    async def _read_group(self, endpoint: str, count: int) -> list[tuple[str, dict[str, str]]]:
        queue = self._k(endpoint, "queue")
        if endpoint not in self._groups:
            await self._ensure_group(endpoint)
        try:
            reply = await self.redis.xreadgroup(GROUP, self.replica, {queue: ">"}, count=count)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self._ensure_group(endpoint)
            reply = await self.redis.xreadgroup(GROUP, self.replica, {queue: ">"}, count=count)
        return reply[0][1] if reply else []

    async def claim_jobs(self, endpoint: str, count: int, transition: Transition) -> list[Change]:
        changes: list[Change] = []
        started = 0
        while started < count:
            entries = await self._read_group(endpoint, count - started)
            if not entries:
                break
            for entry_id, fields in entries:
                change = await self._transact(
                    endpoint, fields.get("id", ""), transition, entry_id, with_input=True
                )
                if change is None:
                    continue
                started += change.job.status == JobStatus.IN_PROGRESS
                changes.append(change)
        return changes

    async def queued_job_ids(self, endpoint: str, limit: int) -> list[str]:
        entries = await self.redis.xrange(self._k(endpoint, "queue"), count=limit)
        return [fields.get("id", "") for _, fields in entries]

    async def active_job_ids(self, endpoint: str) -> list[str]:
        return list(await self.redis.smembers(self._k(endpoint, "active")))

    async def purge_queue(self, endpoint: str, transition: Transition) -> list[Change]:
        queue = self._k(endpoint, "queue")
        changes: list[Change] = []
        last = "-"
        while True:
            entries = await self.redis.xrange(queue, min=last, count=500)
            entries = [e for e in entries if e[0] != last]
            if not entries:
                return changes
            for entry_id, fields in entries:
                change = await self._transact(endpoint, fields.get("id", ""), transition)
                if change is not None:
                    changes.append(change)
                await self.redis.xdel(queue, entry_id)
            last = entries[-1][0]

    # -- streams -----------------------------------------------------------------------------
    async def append_chunk(self, endpoint: str, job_id: str, chunk: Any, expire_at: float) -> None:
        key = self._k(endpoint, "chunks", job_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.rpush(key, json.dumps(chunk))
            pipe.pexpireat(key, int(expire_at * 1000) + 60_000)
            await pipe.execute()

    async def read_chunks(self, endpoint: str, job_id: str, start: int) -> list[Any]:
        raw = await self.redis.lrange(self._k(endpoint, "chunks", job_id), start, -1)
        return [json.loads(item) for item in raw]

    # -- workers -----------------------------------------------------------------------------
    async def touch_worker(self, endpoint: str, worker: str, now: float) -> None:
        await self.redis.hset(self._k(endpoint, "workers"), worker, repr(now))

    async def get_workers(self, endpoint: str) -> dict[str, WorkerRecord]:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._k(endpoint, "workers"))
            pipe.smembers(self._k(endpoint, "draining"))
            seen, draining = await pipe.execute()
        ids = sorted(set(seen) | set(draining))
        async with self.redis.pipeline(transaction=False) as pipe:
            for worker in ids:
                pipe.smembers(self._k(endpoint, "wjobs", worker))
            held = await pipe.execute()
        return {
            worker: WorkerRecord(
                worker, float(seen.get(worker, 0.0)), worker in draining, set(jobs)
            )
            for worker, jobs in zip(ids, held, strict=True)
        }

    async def set_draining(self, endpoint: str, worker: str, draining: bool, now: float) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            if draining:
                pipe.sadd(self._k(endpoint, "draining"), worker)
            else:
                pipe.srem(self._k(endpoint, "draining"), worker)
            pipe.hsetnx(self._k(endpoint, "workers"), worker, repr(now))
            await pipe.execute()

    async def worker_draining(self, endpoint: str, worker: str) -> bool:
        return bool(await self.redis.sismember(self._k(endpoint, "draining"), worker))

    async def set_leaving(self, endpoint: str, worker: str, now: float, until: float) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(self._k(endpoint, "workers"), worker, repr(now))
            # Expires by itself: a worker back under the same name is served again.
            pipe.set(
                self._k(endpoint, "leaving", worker), "1", px=max(1, int((until - now) * 1000))
            )
            pipe.publish(self._channel, queue_channel(endpoint))
            pipe.publish(self._channel, stop_channel(endpoint, worker))
            await pipe.execute()

    async def poll_worker(self, endpoint: str, worker: str, now: float) -> WorkerPoll:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self._k(endpoint, "workers"), worker, repr(now))
            pipe.scard(self._k(endpoint, "wjobs", worker))
            pipe.sismember(self._k(endpoint, "draining"), worker)
            pipe.exists(self._k(endpoint, "leaving", worker))
            _, held, draining, leaving = await pipe.execute()
        return WorkerPoll(int(held), bool(draining), bool(leaving))

    async def worker_job_count(self, endpoint: str, worker: str) -> int:
        return int(await self.redis.scard(self._k(endpoint, "wjobs", worker)))

    async def remove_worker(self, endpoint: str, worker: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(self._k(endpoint, "workers"), worker)
            pipe.srem(self._k(endpoint, "draining"), worker)
            pipe.delete(
                self._k(endpoint, "wjobs", worker),
                self._k(endpoint, "stops", worker),
                self._k(endpoint, "leaving", worker),
            )
            await pipe.execute()

    async def due_stop_signals(
        self, endpoint: str, worker: str, now: float, resend_after: float
    ) -> list[str]:
        pending = await self.pending_stop_signals(endpoint, worker)
        due = [job for job, sent in pending.items() if now - sent >= resend_after]
        if due:
            # A stop cleared meanwhile may come back once: harmless (the SDK ignores a stop for
            # a job it does not run) and cleared again by the worker's next ping.
            key = self._k(endpoint, "stops", worker)
            await self.redis.hset(key, mapping={job: repr(now) for job in due})
        return due

    async def pending_stop_signals(self, endpoint: str, worker: str) -> dict[str, float]:
        raw = await self.redis.hgetall(self._k(endpoint, "stops", worker))
        return {job: float(sent) for job, sent in raw.items()}

    async def clear_stop_signals(self, endpoint: str, worker: str, job_ids: list[str]) -> None:
        if job_ids:
            await self.redis.hdel(self._k(endpoint, "stops", worker), *job_ids)

    # -- figures -----------------------------------------------------------------------------
    @staticmethod
    def _counters(raw: dict[str, str]) -> dict[str, int]:
        counters = dict.fromkeys(COUNTERS, 0)
        counters.update({name: int(value) for name, value in raw.items()})
        return counters

    async def counters(self, endpoint: str) -> dict[str, int]:
        return self._counters(await self.redis.hgetall(self._k(endpoint, "counters")))

    async def add_counters(self, endpoint: str, deltas: dict[str, int]) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            for name, delta in deltas.items():
                pipe.hincrby(self._k(endpoint, "counters"), name, delta)
            await pipe.execute()

    async def all_counters(self, endpoints: list[str]) -> dict[str, dict[str, int]]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for endpoint in endpoints:
                pipe.hgetall(self._k(endpoint, "counters"))
            raw = await pipe.execute()
        return {endpoint: self._counters(r) for endpoint, r in zip(endpoints, raw, strict=True)}

    async def activity(self, endpoints: list[str]) -> dict[str, float | None]:
        if not endpoints:
            return {}
        values = await self.redis.hmget(self._activity_key, endpoints)
        return {e: float(v) if v else None for e, v in zip(endpoints, values, strict=True)}

    async def dead_letters(self, endpoint: str) -> list[str]:
        return list(await self.redis.lrange(self._k(endpoint, "dlq"), 0, -1))

    # -- housekeeping ------------------------------------------------------------------------
    async def acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        key = f"{self.prefix}:lease:{name}"
        ttl_ms = int(ttl * 1000)
        if await self.redis.set(key, owner, nx=True, px=ttl_ms):
            return True
        if await self.redis.get(key) == owner:
            await self.redis.pexpire(key, ttl_ms)
            return True
        return False

    async def forget_expired(self, endpoint: str, now: float) -> int:
        return 0  # Redis expires terminal records by itself (PEXPIREAT)

    async def recover(self, now: float) -> int:
        """Queue entries read by a replica that died before claiming them go back in line."""
        recovered = 0
        for config in await self.list_endpoints():
            queue = self._k(config.id, "queue")
            try:
                _, entries, *_ = await self.redis.xautoclaim(
                    queue, GROUP, self.replica, ORPHAN_IDLE_MS, "0-0", count=100
                )
            except ResponseError:
                continue
            for entry_id, fields in entries:
                if not fields:
                    continue
                job_id = fields.get("id", "")
                job = await self.get_job(config.id, job_id)
                async with self.redis.pipeline(transaction=True) as pipe:
                    if job is not None and job.status == JobStatus.IN_QUEUE:
                        pipe.xadd(queue, {"id": job_id})
                        pipe.publish(self._channel, f"queue:{config.id}")
                        recovered += 1
                    pipe.xack(queue, GROUP, entry_id)
                    pipe.xdel(queue, entry_id)
                    await pipe.execute()
        return recovered

    async def ping(self) -> None:
        await self.redis.ping()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._listener, 2)
        await self._close_pubsub()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.redis.aclose(), 2)


for _name, _method in list(vars(RedisBackend).items()):
    if inspect.iscoroutinefunction(_method) and not _name.startswith("_") and _name != "close":
        setattr(RedisBackend, _name, _unavailable(_method))
