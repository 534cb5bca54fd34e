"""The production backend (`redis://`): job records, queues and counters in Redis, each job
transition one server-side script (one round trip) applied only at the revision it was computed
from, so gateway replicas share one Redis safely.

A record is a hash of its fields (each a JSON value) plus `rev`; a queue is a list. Keys carry
the endpoint as a hash tag (`{ep}`); scripts also touch keys they build, so Redis Cluster is not
supported (one Redis, with replicas or Sentinel, is). Long-polls wake through one pub/sub channel;
every wait also re-checks on its own. Gateway replicas must all run this layout: stop replicas of
an older version before the first of this one starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from json.encoder import encode_basestring_ascii
from typing import Any, NamedTuple

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

from handler_gateway import jobs
from handler_gateway.backends import (
    Admission,
    Backend,
    BackendUnavailable,
    Notifier,
    RateRefused,
    Take,
    Transition,
    WorkerPoll,
    WorkerRecord,
    change_channels,
    job_channel,
    leaving_channels,
)
from handler_gateway.backends.connections import SENTINEL_SCHEME, redis_client
from handler_gateway.backends.pipes import ScriptPipe
from handler_gateway.errors import QueueFull
from handler_gateway.jobs import COUNTERS, Change, JobRecord, JobStatus
from handler_protocol.models import EndpointConfig, HandlerProblem

log = logging.getLogger("handler_gateway.redis")
# The key layout this module reads and writes; older layouts are converted on first use.
SCHEMA = "2"
# Between a notification's origin replica and its channel, as published.
ORIGIN_MARK = "|"
# Records this replica last wrote or took, kept to apply the next transition in one round trip.
CACHED_RECORDS = 10_000
# APPLY's answers to a new job beyond its endpoint's jobs.maxQueued, and to one whose caller's
# rate-limit bucket is empty.
QUEUE_FULL = 2
RATE_REFUSED = 3
# The listing's index keeps jobs created this long ago at most (the longest ttl a job may have).
RECENT_S = 30 * 86400 + 3600
# How long a submit waits for replicas to acknowledge its job (see RedisBackend._replicated).
WAIT_TIMEOUT_MS = 1000
# After replicas fell short, how long submits wait only for as many as answered.
WAIT_DEGRADED_S = 10.0
# A batch of new jobs waits for more submits while event-loop turns bring some, up to this many.
GATHER_TURNS = 4

# Whether another replica listens to `channel`: more than `mine` subscribers (1 while this
# replica's own subscription stands, else 0). One replica alone publishes nothing. And an
# endpoint's last activity, which only moves forward (as the memory backend keeps it).
LISTENING_FUNCTION = """
local function listening(channel, mine)
  return redis.call('PUBSUB', 'NUMSUB', channel)[2] > tonumber(mine)
end
local function active_at(key, endpoint, at)
  local was = redis.call('HGET', key, endpoint)
  if not was or tonumber(at) > tonumber(was) then redis.call('HSET', key, endpoint, at) end
end
"""

# Up to `wanted` tokens from bucket `key` (take_from_bucket in Lua) at `rate`/s up to `burst`;
# the time is the server's, so every gateway replica's clock agrees. The bucket expires once it
# would be full again. Answers taken, and the seconds until one is there (none taken).
TAKE_TOKENS_FUNCTION = """
local function take_tokens(key, rate, burst, wanted)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  local held = redis.call('HMGET', key, 'tokens', 'at')
  local tokens, at = tonumber(held[1]) or burst, tonumber(held[2]) or now
  if now > at then tokens, at = math.min(burst, tokens + (now - at) * rate), now end
  local taken, wait = 0, 0
  if tokens >= 1 then
    taken = math.min(wanted, math.floor(tokens))
    tokens = tokens - taken
  else
    wait = (1 - tokens) / rate
  end
  redis.call('HSET', key, 'tokens', string.format('%.17g', tokens), 'at', string.format('%.17g', at))
  local full_in_ms = math.min(math.ceil((burst - tokens) / rate * 1000) + 1000, 2592000000)
  redis.call('PEXPIRE', key, string.format('%d', full_in_ms))  -- at most 30 days
  return taken, string.format('%.17g', wait)
end
"""
TAKE_TOKENS = (
    TAKE_TOKENS_FUNCTION
    + """
local taken, wait = take_tokens(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]))
return {taken, wait}
"""
)

# Store one job change if the record is still at the revision it was computed from ('' : the
# record must not exist). On a conflict, answers the record as it is now, so the caller can
# compute again without another read; a new job beyond `max_queued` queued ones answers {2, 0},
# one whose caller's bucket (`rate`: its key, in the job's hash slot, rate, burst, wanted) has
# no token {3, seconds until one}; a stored one {1, revision, tokens taken}.
# A new job also goes into the endpoint's jobs by creation time (the listing's index, trimmed to
# the longest ttl). KEYS: job, input, chunks, queue, active, counters,
# activity, dead letters, released worker's jobs, assigned worker's jobs, stopped worker's stops,
# the endpoint's jobs by creation time, its delayed jobs (retries waiting, by due time).
# ARGV: expected revision, effects (JSON), the fields (a JSON object of each field's JSON).
APPLY_FUNCTION = (
    LISTENING_FUNCTION
    + TAKE_TOKENS_FUNCTION
    + f"local RECENT_S, QUEUE_FULL, RATE_REFUSED = {RECENT_S}, {QUEUE_FULL}, {RATE_REFUSED}\n"
    + """
local function apply(KEYS, ARGV)
local job = KEYS[1]
local rev = redis.call('HGET', job, 'rev')
if (ARGV[1] == '' and rev) or (ARGV[1] ~= '' and rev ~= ARGV[1]) then
  return {0, redis.call('HGETALL', job)}
end
local e = cjson.decode(ARGV[2])
if e.max_queued and tonumber(redis.call('HGET', KEYS[6], 'inQueue') or '0') >= e.max_queued then
  return {QUEUE_FULL, 0}
end
local taken = 0
if e.rate then
  local wait
  taken, wait = take_tokens(e.rate.key, e.rate.rate, e.rate.burst, e.rate.wanted)
  if taken == 0 then return {RATE_REFUSED, wait} end
end
local id = e.id
rev = redis.call('HINCRBY', job, 'rev', 1)
local pairs_ = {}
for name, value in pairs(cjson.decode(ARGV[3])) do
  pairs_[#pairs_ + 1] = name
  pairs_[#pairs_ + 1] = value
end
redis.call('HSET', job, unpack(pairs_))
if e.input then
  redis.call('SET', KEYS[2], e.input)
  redis.call('ZADD', KEYS[12], e.created, id)  -- the endpoint's jobs by creation time
  redis.call('ZREMRANGEBYSCORE', KEYS[12], '-inf', '(' .. (tonumber(e.created) - RECENT_S))
  -- and the oldest two whose record expired go: the index keeps pace with the records
  local prefix = string.sub(job, 1, #job - #id)
  for _, old in ipairs(redis.call('ZRANGE', KEYS[12], 0, 1)) do
    if redis.call('EXISTS', prefix .. old) == 0 then redis.call('ZREM', KEYS[12], old) end
  end
end
if e.expire_ms then
  for i = 1, 3 do redis.call('PEXPIREAT', KEYS[i], e.expire_ms) end
elseif e.persist then
  redis.call('PERSIST', KEYS[1])
  redis.call('PERSIST', KEYS[2])
end
if e.active == 1 then redis.call('SADD', KEYS[5], id)
elseif e.active == 0 then redis.call('SREM', KEYS[5], id) end
if e.activity then active_at(KEYS[7], e.endpoint, e.activity) end
if e.enqueue then redis.call(e.to_head and 'LPUSH' or 'RPUSH', KEYS[4], id) end
for name, delta in pairs(e.counters) do
  -- low-priority jobs queued by an older version were never counted: never below zero
  if redis.call('HINCRBY', KEYS[6], name, delta) < 0 and name == 'inQueueLow' then
    redis.call('HSET', KEYS[6], name, 0)
  end
end
if e.release then redis.call('SREM', KEYS[9], id) end
if e.assign then redis.call('SADD', KEYS[10], id) end
if e.stop then redis.call('HSET', KEYS[11], id, '0') end
if e.dead then redis.call('RPUSH', KEYS[8], id) end
if e.undead then redis.call('LREM', KEYS[8], 0, id) end
if e.delay then redis.call('ZADD', KEYS[13], e.delay, id) end
if e.undelay then redis.call('ZREM', KEYS[13], id) end
if e.message and listening(e.notify, e.listeners) then
  redis.call('PUBLISH', e.notify, e.message)
end
return {1, rev, taken}
end
"""
)

# A worker's take: mark it seen and, unless it is draining or leaving, start up to `count` jobs
# from the queue head (no more than `capacity` held), as `jobs.start` does: a job whose ttl
# passed while queued times out instead. Answers held, draining, leaving, how many stay queued
# (1 when not looked), then per job popped in a startable state {id, input, fields as they
# were}; the low-priority queue only once the other is empty. KEYS: workers, the worker's jobs,
# draining, leaving, queue, active, counters, activity, low-priority queue. ARGV: worker, now, count, capacity
# (-1: none), worker as JSON, job key prefix, input key prefix, chunks key prefix, endpoint,
# notify channel, job channel prefix, ttl error text before and after the seconds, result
# retention seconds, this replica's subscriptions (see `listening`).
TAKE_FUNCTION = """
local function take(KEYS, ARGV)
local worker, now = ARGV[1], tonumber(ARGV[2])
redis.call('HSET', KEYS[1], worker, ARGV[2])
local held = redis.call('SCARD', KEYS[2])
local draining = redis.call('SISMEMBER', KEYS[3], worker)
local leaving = redis.call('EXISTS', KEYS[4])
local out = {held, draining, leaving, 1}
if draining == 1 or leaving == 1 then return out end
local allowed = tonumber(ARGV[3])
local capacity = tonumber(ARGV[4])
if capacity >= 0 then allowed = math.min(allowed, capacity - held) end
local started = 0
while started < allowed do
  local id, low = redis.call('LPOP', KEYS[5]), false
  if not id then id, low = redis.call('LPOP', KEYS[9]), true end
  if not id then break end
  local key = ARGV[6] .. id
  local fields = redis.call('HGETALL', key)
  local f = {}
  for i = 1, #fields, 2 do f[fields[i]] = fields[i + 1] end
  if f.status == '"IN_QUEUE"' then
    out[#out + 1] = {id, redis.call('GET', ARGV[7] .. id) or 'null', fields}
    local created, ttl = tonumber(f.created_at), tonumber(f.ttl_s)
    redis.call('HINCRBY', key, 'rev', 1)
    if now >= created + ttl then
      local message = ARGV[12] .. string.format('%g', ttl) .. ARGV[13]
      redis.call('HSET', key, 'status', '"TIMED_OUT"', 'finished_at', ARGV[2],
        'error', cjson.encode(message))
      redis.call('HINCRBY', KEYS[7], 'inQueue', -1)
      if low then redis.call('HINCRBY', KEYS[7], 'inQueueLow', -1) end
      redis.call('HINCRBY', KEYS[7], 'timedOut', 1)
      local expire_ms = string.format('%d',
        math.floor(math.max(created + ttl, now + tonumber(ARGV[14])) * 1000))
      for _, k in ipairs({key, ARGV[7] .. id, ARGV[8] .. id}) do
        redis.call('PEXPIREAT', k, expire_ms)
      end
      if listening(ARGV[10], ARGV[15]) then redis.call('PUBLISH', ARGV[10], ARGV[11] .. id) end
    else
      redis.call('HSET', key, 'status', '"IN_PROGRESS"', 'started_at', ARGV[2],
        'heartbeat_at', ARGV[2], 'worker_id', ARGV[5])
      redis.call('HINCRBY', key, 'deliveries', 1)
      redis.call('SADD', KEYS[6], id)
      redis.call('SADD', KEYS[2], id)
      redis.call('HINCRBY', KEYS[7], 'inQueue', -1)
      if low then redis.call('HINCRBY', KEYS[7], 'inQueueLow', -1) end
      redis.call('HINCRBY', KEYS[7], 'inProgress', 1)
      active_at(KEYS[8], ARGV[9], ARGV[2])
      started = started + 1
    end
  end
end
out[4] = redis.call('LLEN', KEYS[5]) + redis.call('LLEN', KEYS[9])
return out
end
"""
APPLY = APPLY_FUNCTION + "return apply(KEYS, ARGV)"
# APPLY for several changes (each its 13 keys and 3 arguments, in turn); the replies in order.
APPLY_MANY = (
    APPLY_FUNCTION
    + """
local replies = {}
for i = 0, #ARGV / 3 - 1 do
  replies[i + 1] = apply({unpack(KEYS, 13 * i + 1, 13 * i + 13)}, {unpack(ARGV, 3 * i + 1, 3 * i + 3)})
end
return replies
"""
)
TAKE = LISTENING_FUNCTION + TAKE_FUNCTION + "return take(KEYS, ARGV)"
# Ids among the first ARGV[3] of the queue (KEYS[1]) whose ttl has passed at ARGV[2] (as
# `jobs.expire_in_queue` decides; it decides again). ARGV[1]: the job key prefix.
EXPIRED_QUEUED = """
local out = {}
local now = tonumber(ARGV[2])
for _, id in ipairs(redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[3]) - 1)) do
  local f = redis.call('HMGET', ARGV[1] .. id, 'status', 'created_at', 'ttl_s')
  if f[1] == '"IN_QUEUE"' and now >= tonumber(f[2]) + tonumber(f[3]) then out[#out + 1] = id end
end
return out
"""
# Take the lease KEYS[1] for owner ARGV[1] for ARGV[2] ms, or renew it if the owner holds it.
LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
"""
# The process serving under worker ARGV[1] is now ARGV[2] (KEYS[1]: the endpoint's instances):
# the one before, whose leaving mark (KEYS[2]) goes if it was another.
SWAP_INSTANCE = """
local previous = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if previous and previous ~= ARGV[2] then redis.call('DEL', KEYS[2]) end
return previous
"""
# A new job, then a take (APPLY's keys and arguments, then TAKE's): a submit handed to a worker
# waiting on this replica costs one round trip, and the queue's order still holds.
CREATE_TAKE = (
    APPLY_FUNCTION
    + TAKE_FUNCTION
    + """
local applied = apply({unpack(KEYS, 1, 13)}, {unpack(ARGV, 1, 3)})
if applied[1] ~= 1 then return {applied} end
return {applied, take({unpack(KEYS, 14, 22)}, {unpack(ARGV, 4, 18)})}
"""
)


def notified(message: str) -> tuple[str, list[str]]:
    """(origin replica, channels) of a notification: `origin|["ch", ...]` or `origin|ch` (one
    channel); a bare channel came from a replica of an older version."""
    origin, mark, channels = message.partition(ORIGIN_MARK)
    if not mark:
        return "", [origin]
    return origin, json.loads(channels) if channels.startswith("[") else [channels]


def field_json(value: Any) -> str:
    """`json.dumps(value)` for one record field, four times as fast for the scalars most are."""
    kind = type(value)
    if value is None:
        return "null"
    if kind is float and math.isfinite(value):
        return float.__repr__(value)
    if kind is str:
        return encode_basestring_ascii(value)
    if kind is int:
        return int.__repr__(value)
    if isinstance(value, str):  # a str enum: its value
        return encode_basestring_ascii(value)
    if kind is dict and not value:
        return "{}"
    return json.dumps(value)


RECORD_FIELDS = tuple(name for name in JobRecord.model_fields if name != "input")


def record_fields(job: JobRecord) -> dict[str, str]:
    """A record as its hash stores it (but `rev`): each field's JSON; the input is kept apart."""
    values = job.__dict__  # plain values (a status is a str): no dump needed
    return {name: field_json(values[name]) for name in RECORD_FIELDS}


class ApplyCall(NamedTuple):
    """APPLY's keys and arguments for one change, and the channels the change notifies."""

    keys: list[str]
    args: list[str]
    channels: list[str]
    admission: Admission | None = None  # a new job's


# A job to create in the next batch: its change, APPLY's keys and arguments, and whether stored.
Creating = tuple[Change, ApplyCall, "asyncio.Future[None]"]


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
        wait_replicas: int | None = None,
        **_: Any,
    ):
        self.url = url
        self.prefix = prefix
        self.replica = replica or f"gw-{uuid.uuid4().hex[:12]}"
        self.redis = redis_client(url, max_connections)
        # Replicas that must hold a new job before its submit is answered (WAIT): with Sentinel,
        # 1 by default, so a failover loses no accepted job; else 0 (replication is async).
        if wait_replicas is None:
            wait_replicas = 1 if url.startswith(SENTINEL_SCHEME) else 0
        self.wait_replicas = wait_replicas
        self._replicas_short: tuple[int, float] | None = None  # (acknowledged, when)
        self.notifier = Notifier()
        self._channel = f"{prefix}:notify"
        self._listener: asyncio.Task[None] | None = None
        self._pubsub: Any = None
        self._subscribed = False  # counted by the scripts' `listening`
        self._records: OrderedDict[tuple[str, str], tuple[str, JobRecord]] = OrderedDict()
        self._schema_ok = False
        # Jobs to create in the next batch: (change, APPLY's keys and arguments, stored)
        self._creating: list[Creating] = []
        self._creator: asyncio.Future[None] | None = None
        self._batches: set[asyncio.Future[None]] = set()  # stored now
        self._scripts = {
            "apply": self.redis.register_script(APPLY),
            "apply_many": self.redis.register_script(APPLY_MANY),
            "expired_queued": self.redis.register_script(EXPIRED_QUEUED),
            "lease": self.redis.register_script(LEASE),
            "take_tokens": self.redis.register_script(TAKE_TOKENS),
            "swap_instance": self.redis.register_script(SWAP_INSTANCE),
            "take": self.redis.register_script(TAKE),
            "create_take": self.redis.register_script(CREATE_TAKE),
        }
        self._pipe = ScriptPipe(self.redis)
        self._create_pipe = ScriptPipe(self.redis)  # new jobs with their WAIT

    async def _script(
        self, name: str, keys: list[Any], args: list[Any], then: tuple[Any, ...] | None = None
    ) -> Any:
        """Run script `name`; with `then` (a WAIT behind new jobs) on the pipe of creates,
        where a WAIT holds up only other creates."""
        pipe = self._pipe if then is None else self._create_pipe
        return await pipe.run(self._scripts[name], keys, args, then)

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
            pubsub = self.redis.pubsub()
            self._pubsub = pubsub
            try:
                await pubsub.subscribe(self._channel)
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "subscribe":
                        self._subscribed = True  # confirmed: scripts count this replica now
                    elif message and message.get("type") == "message":
                        origin, channels = notified(message["data"])
                        if origin != self.replica:  # its own were notified as they were stored
                            self._notify_here(channels)
            except (RedisError, OSError) as exc:
                log.debug("notification listener reconnecting: %s", exc)
                await self._close_pubsub()
                await asyncio.sleep(0.5)

    async def _close_pubsub(self) -> None:
        self._subscribed = False
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pubsub.aclose(), 2)

    # -- endpoints -------------------------------------------------------------------------
    async def put_endpoint(self, config: EndpointConfig) -> None:
        await self.redis.hset(self._endpoints_key, config.id, config.model_dump_json())

    async def get_endpoint(self, endpoint: str) -> EndpointConfig | None:
        self._ensure_listener()
        raw = await self.redis.hget(self._endpoints_key, endpoint)
        return await self._stored_config(raw) if raw else None

    async def _stored_config(self, raw: str) -> EndpointConfig:
        """A stored registration; one an older version stored with its raw worker token is
        stored again with the token's digest only."""
        config = EndpointConfig.model_validate_json(raw)
        if '"workerToken":"' in raw.replace(" ", ""):
            await self.put_endpoint(config)
        return config

    async def delete_endpoint(self, endpoint: str) -> bool:
        removed = await self.redis.hdel(self._endpoints_key, endpoint)
        await self.redis.hdel(self._activity_key, endpoint)
        keys = [key async for key in self.redis.scan_iter(match=self._k(endpoint, "*"), count=500)]
        for start in range(0, len(keys), 500):
            await self.redis.unlink(*keys[start : start + 500])
        for key in [key for key in self._records if key[0] == endpoint]:
            del self._records[key]
        return bool(removed)

    async def list_endpoints(self) -> list[EndpointConfig]:
        raw = await self.redis.hgetall(self._endpoints_key)
        return [await self._stored_config(value) for value in raw.values()]

    # -- jobs --------------------------------------------------------------------------------
    def _effects(
        self,
        change: Change,
        expected: str,
        channels: list[str],
        admission: Admission | None = None,
    ) -> dict[str, Any]:
        """The script's view of `change.effects` and of what the new status implies for keys
        (`channels`: the change's notifications)."""
        job, effects = change.job, change.effects
        created = expected == ""
        out: dict[str, Any] = {
            "id": job.id,
            "endpoint": job.endpoint,
            "notify": self._channel,
            "counters": effects.counters,
        }
        message = self._published(channels)
        if message is not None:  # a JSON null would be true in Lua
            out["message"] = message
            out["listeners"] = self._mine()
        if created:  # a new job: nothing to expire, persist or deactivate yet
            out["input"] = json.dumps(job.input)
            out["created"] = repr(job.created_at)
            if admission is not None and admission.max_queued is not None:
                out["max_queued"] = admission.max_queued
            if admission is not None and admission.bucket is not None:
                out["rate"] = {
                    "key": self._k(job.endpoint, "rate", admission.bucket),
                    "rate": admission.rate,
                    "burst": admission.burst,
                    "wanted": admission.wanted,
                }
        elif job.terminal and not effects.dead_letter:
            out["expire_ms"] = str(int(job.expires_at * 1000))
        elif effects.enqueue:  # back in line after a result's expiry was set
            out["persist"] = True
        if job.status == JobStatus.IN_PROGRESS:
            out["active"] = 1
        elif not created:
            out["active"] = 0
        if effects.activity:
            out["activity"] = repr(job.finished_at or job.started_at or job.created_at)
        for key, value in (
            ("enqueue", effects.enqueue),
            ("to_head", effects.to_head),
            ("release", effects.release_worker),
            ("assign", effects.assign_worker),
            ("stop", effects.stop_worker),
            ("dead", effects.dead_letter),
            ("undead", effects.undead_letter),
            ("undelay", effects.undelay),
        ):
            if value:
                out[key] = True
        if effects.delay_until is not None:
            out["delay"] = repr(effects.delay_until)
        return out

    def _apply_call(
        self, change: Change, expected: str, admission: Admission | None = None
    ) -> ApplyCall:
        """APPLY's keys and arguments for `change`, and the channels it notifies."""
        job, effects = change.job, change.effects
        endpoint, job_id = job.endpoint, job.id
        base = f"{self.prefix}:{{{endpoint}}}:"  # as _k() builds them
        keys = [
            base + "job:" + job_id,
            base + "input:" + job_id,
            base + "chunks:" + job_id,
            base + ("lowqueue" if job.low_priority else "queue"),
            base + "active",
            base + "counters",
            self._activity_key,
            base + "dlq",
            base + "wjobs:" + (effects.release_worker or ""),
            base + "wjobs:" + (effects.assign_worker or ""),
            base + "stops:" + (effects.stop_worker or ""),
            base + "recent",
            base + "delayed",
        ]
        fields = record_fields(job)
        if not expected:  # a new hash: a field left out reads as its default, null
            fields = {name: value for name, value in fields.items() if value != "null"}
        channels = change_channels(change)
        effects = self._effects(change, expected, channels, admission)
        args = [expected, json.dumps(effects), json.dumps(fields)]
        return ApplyCall(keys, args, channels, admission)

    async def _apply(self, change: Change, expected: str) -> tuple[bool, Any]:
        """Run APPLY for `change`: (True, new revision) or (False, the record's fields now)."""
        call = self._apply_call(change, expected)
        await self._ensure_schema()
        done, value, *_ = await self._script("apply", call.keys, call.args)
        if done:
            self._notify_here(call.channels)
        return bool(done), value

    def _published(self, channels: list[str]) -> str | None:
        """One message for a change's notifications: other replicas wake their long-polls,
        this one skips it (`notified` reads it)."""
        if not channels:
            return None
        return f"{self.replica}{ORIGIN_MARK}{json.dumps(channels)}"

    def _mine(self) -> int:
        """This replica's subscriptions to the notification channel (scripts publish only when
        other replicas listen too)."""
        return 1 if self._subscribed else 0

    def _notify_here(self, channels: list[str]) -> None:
        for channel in channels:
            self.notifier.notify(channel)

    def _remember(self, job: JobRecord, rev: int) -> None:
        key = (job.endpoint, job.id)
        self._records.pop(key, None)
        if job.terminal:
            return  # finished: further transitions are rare (retry), a read serves them
        self._records[key] = (str(rev), job.model_copy(update={"input": None}))
        while len(self._records) > CACHED_RECORDS:
            self._records.popitem(last=False)

    @staticmethod
    def _record(fields: dict[str, str] | list[str]) -> tuple[str, JobRecord] | None:
        """(revision, record) from a record hash (HGETALL's dict or a script's flat list)."""
        if isinstance(fields, list):
            fields = dict(zip(fields[::2], fields[1::2], strict=True))
        if not fields:
            return None
        rev = fields.pop("rev", "0")
        values = {name: json.loads(value) for name, value in fields.items()}
        return rev, JobRecord.model_validate(values)

    async def create_job(self, change: Change, admission: Admission | None = None) -> None:
        """Stored in one round trip with the other jobs submitted on this replica meanwhile (a
        group commit): a batch takes the submits that the event loop's next turns parse (as
        long as they bring any, up to GATHER_TURNS), which costs a lone submit nothing
        measurable, and is sent without waiting for the batches before it (the pipe keeps
        their order)."""
        call = self._apply_call(change, "", admission)
        stored = asyncio.get_running_loop().create_future()
        self._creating.append((change, call, stored))
        if self._creator is None or self._creator.done():
            self._creator = asyncio.ensure_future(self._create_batches())
        await stored

    async def _create_batches(self) -> None:
        while self._creating:
            for _ in range(GATHER_TURNS):  # the submits parsed meanwhile join
                gathered = len(self._creating)
                await asyncio.sleep(0)
                if len(self._creating) == gathered:
                    break
            batch, self._creating = self._creating, []
            # Sent at once, in order on the pipe, while the next batch gathers.
            task = asyncio.ensure_future(self._create_batch(batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _create_batch(self, batch: list[Creating]) -> None:
        try:
            await self._ensure_schema()
            replies = await self._create_many([call for _, call, _ in batch])
        except asyncio.CancelledError:  # closing: the submits waiting fail with it
            for *_, stored in batch:
                stored.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - every submit of the batch raises it
            for *_, stored in batch:
                if not stored.done():
                    stored.set_exception(exc)
            return
        for (change, call, stored), reply in zip(batch, replies, strict=True):
            if stored.done():
                continue
            if (refused := self._refusal(change, call, reply)) is not None:
                stored.set_exception(refused)
            else:
                self._notify_here(call.channels)
                stored.set_result(None)

    @staticmethod
    def _refusal(change: Change, call: ApplyCall, reply: list[Any]) -> Exception | None:
        """Why APPLY refused a new job (its answer `reply`); None: it is stored (and the
        tokens it took noted on its admission)."""
        done, admission = reply[0], call.admission
        if done == 1:
            if admission is not None:
                admission.taken = int(reply[2])
            return None
        if done == QUEUE_FULL:
            return QueueFull(change.job.endpoint, admission.max_queued if admission else 0)
        if done == RATE_REFUSED:
            return RateRefused(float(reply[1]))
        return RuntimeError(f"job id {change.job.id} already exists")

    def _wait_command(self) -> tuple[Any, ...] | None:
        """The WAIT written right behind new jobs (on their connection): until
        `wait_replicas` replicas hold them, up to WAIT_TIMEOUT_MS, so an accepted job survives
        a failover. After replicas fell short, for WAIT_DEGRADED_S only as many as answered
        then are waited for (none: no WAIT), so a primary left without its replica (after a
        failover) does not hold every submit for the full timeout."""
        wanted = self.wait_replicas
        if self._replicas_short is not None:
            acknowledged_then, since = self._replicas_short
            if time.monotonic() - since < WAIT_DEGRADED_S:
                wanted = min(wanted, acknowledged_then)
            else:
                self._replicas_short = None
        return ("WAIT", wanted, WAIT_TIMEOUT_MS) if wanted else None

    def _replicated(self, created: int, wait: tuple[Any, ...] | None, answer: Any) -> None:
        """Note WAIT's `answer` for `created` new jobs. Fewer replicas in time is logged and the
        submits answered (degraded mode: the primary holds them). No answer at all (the
        connection died, the primary with it perhaps) raises: the submits get 503 and are
        sent again (a job may then exist twice: at least once, never lost)."""
        if wait is None:
            return
        if isinstance(answer, Exception):
            raise answer
        wanted, acknowledged = wait[1], int(answer)
        if acknowledged >= wanted:
            return
        self._replicas_short = (acknowledged, time.monotonic())
        log.warning(
            "%d new job(s) acknowledged by %d of %d replicas in %d ms: a failover now could "
            "lose them; waiting for %d replicas for %g s",
            created,
            acknowledged,
            wanted,
            WAIT_TIMEOUT_MS,
            acknowledged,
            WAIT_DEGRADED_S,
        )

    async def _create(self, name: str, keys: list[Any], args: list[Any], created: int) -> Any:
        """Script `name`, which creates `created` jobs, with replicas waited for as
        `_wait_command` says; its reply."""
        wait = self._wait_command()
        reply = await self._script(name, keys, args, wait)
        if wait is None:
            return reply
        reply, waited = reply
        self._replicated(created, wait, waited)
        return reply

    async def _create_many(self, calls: list[ApplyCall]) -> list[Any]:
        """APPLY for each of `calls` (new jobs) in one script run (one round trip); their
        replies."""
        if len(calls) == 1:
            return [await self._create("apply", calls[0].keys, calls[0].args, 1)]
        keys = [key for call in calls for key in call.keys]
        args = [arg for call in calls for arg in call.args]
        return await self._create("apply_many", keys, args, len(calls))

    async def _read(self, endpoint: str, job_id: str) -> tuple[str, JobRecord] | None:
        await self._ensure_schema()
        return self._record(await self.redis.hgetall(self._k(endpoint, "job", job_id)))

    async def get_job(self, endpoint: str, job_id: str) -> JobRecord | None:
        current = await self._read(endpoint, job_id)
        return current[1] if current else None

    async def update_job(self, endpoint: str, job_id: str, transition: Transition) -> Change | None:
        """One round trip when this replica holds the record's latest revision, else two."""
        current = self._records.get((endpoint, job_id))
        fresh = current is None
        if current is None:
            current = await self._read(endpoint, job_id)
        while current is not None:
            rev, job = current
            change = transition(job)
            if change is None:
                if fresh:
                    if (endpoint, job_id) in self._records:  # a stale copy: keep this one
                        self._remember(job, int(rev))
                    return None
                current, fresh = await self._read(endpoint, job_id), True
                continue
            done, value = await self._apply(change, rev)
            if done:
                self._remember(change.job, int(value))
                return change
            current, fresh = self._record(value), True
        self._records.pop((endpoint, job_id), None)
        return None

    def _take_call(
        self, endpoint: str, worker: str, count: int, capacity: int | None, now: float
    ) -> tuple[list[str], list[Any]]:
        """TAKE's keys and arguments."""
        before, after = jobs.TTL_EXPIRED_ERROR.split("{seconds:g}")
        keys = [
            self._k(endpoint, "workers"),
            self._k(endpoint, "wjobs", worker),
            self._k(endpoint, "draining"),
            self._k(endpoint, "leaving", worker),
            self._k(endpoint, "queue"),
            self._k(endpoint, "active"),
            self._k(endpoint, "counters"),
            self._activity_key,
            self._k(endpoint, "lowqueue"),
        ]
        args = [
            worker,
            repr(now),
            count,
            -1 if capacity is None else capacity,
            json.dumps(worker),
            self._k(endpoint, "job", ""),
            self._k(endpoint, "input", ""),
            self._k(endpoint, "chunks", ""),
            endpoint,
            self._channel,
            f"{self.replica}{ORIGIN_MARK}{job_channel(endpoint, '')}",
            before,
            after,
            repr(jobs.MIN_RESULT_RETENTION_S),
            self._mine(),
        ]
        return keys, args

    def _taken(
        self,
        reply: list[Any],
        worker: str,
        now: float,
        known: dict[str, tuple[str, JobRecord]] | None = None,
    ) -> Take:
        """TAKE's answer as the changes it stored (computed again here by `jobs.start`); a job
        in `known` (id -> revision, record as stored) needs no parsing."""
        held, draining, leaving, queued, *taken = reply
        changes = []
        for job_id, raw_input, fields in taken:
            current = (known or {}).get(job_id) or self._record(fields)
            if current is None:
                continue
            rev, job = current
            change = jobs.start(job, worker, now)  # what the script just stored
            if change is None:
                continue
            if change.job.input is None:
                change.job.input = json.loads(raw_input)
            self._remember(change.job, int(rev) + 1)
            self._notify_here(change_channels(change))
            changes.append(change)
        return Take(WorkerPoll(int(held), bool(draining), bool(leaving)), changes, not queued)

    async def take_jobs(
        self, endpoint: str, worker: str, count: int, capacity: int | None, now: float
    ) -> Take:
        keys, args = self._take_call(endpoint, worker, count, capacity, now)
        await self._ensure_schema()
        return self._taken(await self._script("take", keys, args), worker, now)

    async def create_and_take(
        self,
        change: Change,
        worker: str,
        count: int,
        capacity: int | None,
        now: float,
        admission: Admission | None = None,
    ) -> Take:
        call = self._apply_call(change, "", admission)
        take_keys, take_args = self._take_call(change.job.endpoint, worker, count, capacity, now)
        await self._ensure_schema()
        reply = await self._create("create_take", call.keys + take_keys, call.args + take_args, 1)
        if (refused := self._refusal(change, call, reply[0])) is not None:
            raise refused
        self._notify_here(call.channels)
        created = {change.job.id: (str(reply[0][1]), change.job)}  # as the script stored it
        return self._taken(reply[1], worker, now, created)

    async def recent_jobs(
        self, endpoint: str, before: tuple[float, str] | None, limit: int
    ) -> list[JobRecord]:
        """From the endpoint's index by creation time (ids with the same time: by id, as Redis
        orders them); records gone (expired) leave the index as they are met."""
        await self._ensure_schema()
        index = self._k(endpoint, "recent")
        found: list[JobRecord] = []
        top = "+inf" if before is None else repr(before[0])
        while len(found) < limit:
            entries = await self.redis.zrevrangebyscore(
                index, top, "-inf", start=0, num=limit + 50, withscores=True
            )
            if before is not None:
                entries = [(i, t) for i, t in entries if (t, i) < before]
            if not entries:
                break
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id, _ in entries:
                    pipe.hgetall(self._k(endpoint, "job", job_id))
                records = await pipe.execute()
            gone = []
            for (job_id, created), fields in zip(entries, records, strict=True):
                current = self._record(fields)
                if current is None:
                    gone.append(job_id)
                elif len(found) < limit:
                    found.append(current[1])
                before = (created, job_id)
            if gone:
                await self.redis.zrem(index, *gone)
            top = repr(before[0])
        return found

    def _queues(self, endpoint: str) -> list[str]:
        """The endpoint's queue keys, in the order takes serve them."""
        return [self._k(endpoint, "queue"), self._k(endpoint, "lowqueue")]

    async def queued_job_ids(self, endpoint: str, limit: int) -> list[str]:
        await self._ensure_schema()
        found: list[str] = []
        for queue in self._queues(endpoint):
            found += await self.redis.lrange(queue, 0, limit - len(found) - 1)
            if len(found) >= limit:
                break
        return found

    async def expired_queued_ids(self, endpoint: str, now: float, limit: int) -> list[str]:
        """A round trip per queue: the script looks at the records where they are."""
        await self._ensure_schema()
        args = [self._k(endpoint, "job", ""), repr(now), limit]
        found: list[str] = []
        for queue in self._queues(endpoint):
            found += await self._script("expired_queued", [queue], args)
        return found

    async def active_job_ids(self, endpoint: str) -> list[str]:
        return list(await self.redis.smembers(self._k(endpoint, "active")))

    async def purge_queue(self, endpoint: str, transition: Transition) -> list[Change]:
        await self._ensure_schema()
        changes: list[Change] = []
        for queue in self._queues(endpoint):
            while job_ids := await self.redis.lrange(queue, 0, 499):
                for job_id in job_ids:  # cancelled first: a crash in between leaves it queued
                    change = await self.update_job(endpoint, job_id, transition)
                    if change is not None:
                        changes.append(change)
                    await self.redis.lrem(queue, 1, job_id)
        for job_id in await self.redis.zrange(self._k(endpoint, "delayed"), 0, -1):
            change = await self.update_job(endpoint, job_id, transition)  # its entry goes too
            if change is not None:
                changes.append(change)
            else:
                await self.forget_delayed(endpoint, job_id)
        return changes

    async def due_retries(self, endpoint: str, now: float, limit: int) -> list[str]:
        return list(
            await self.redis.zrangebyscore(self._k(endpoint, "delayed"), "-inf", now, 0, limit)
        )

    async def forget_delayed(self, endpoint: str, job_id: str) -> None:
        await self.redis.zrem(self._k(endpoint, "delayed"), job_id)

    # -- older layouts -------------------------------------------------------------------------
    async def _ensure_schema(self) -> None:
        if self._schema_ok:
            return
        schema_key = f"{self.prefix}:schema"
        if await self.redis.get(schema_key) != SCHEMA:
            for config in await self.list_endpoints():
                await self._convert_endpoint(config.id)
            await self.redis.set(schema_key, SCHEMA)
        self._schema_ok = True

    async def _convert_endpoint(self, endpoint: str) -> None:
        """Layout 1 (records as JSON strings, queues as streams) to this one; idempotent, safe
        with replicas converting at the same time."""

        async def record(pipe: Any, key: str) -> None:
            job = JobRecord.model_validate_json(await pipe.get(key))
            ttl_ms = await pipe.pttl(key)
            pipe.multi()
            pipe.delete(key)
            pipe.hset(key, mapping=record_fields(job))
            pipe.hset(key, "rev", "1")
            if ttl_ms > 0:
                pipe.pexpire(key, ttl_ms)

        async def queue(pipe: Any, key: str) -> None:
            ids = [fields.get("id", "") for _, fields in await pipe.xrange(key)]
            pipe.multi()
            pipe.delete(key)
            if ids:
                pipe.rpush(key, *ids)

        async for key in self.redis.scan_iter(match=self._k(endpoint, "job", "*"), count=500):
            await self._convert_key(key, "string", record)
        await self._convert_key(self._k(endpoint, "queue"), "stream", queue)

    async def _convert_key(
        self, key: str, older_type: str, rewrite: Callable[[Any, str], Awaitable[None]]
    ) -> None:
        """`rewrite(pipe, key)` (reads, then MULTI and writes) while `key` still has the older
        layout's type; watched, so of two replicas converting it one finds it done."""
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    if await pipe.type(key) != older_type:
                        await pipe.reset()
                        return
                    await rewrite(pipe, key)
                    await pipe.execute()
                    return
                except WatchError:
                    continue

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
            channels = leaving_channels(endpoint, worker)
            pipe.publish(self._channel, self._published(channels))
            await pipe.execute()
        self._notify_here(channels)

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
            pipe.hdel(self._k(endpoint, "instances"), worker)
            pipe.delete(
                self._k(endpoint, "wjobs", worker),
                self._k(endpoint, "stops", worker),
                self._k(endpoint, "leaving", worker),
            )
            await pipe.execute()

    async def swap_instance(self, endpoint: str, worker: str, instance: str) -> str | None:
        keys = [self._k(endpoint, "instances"), self._k(endpoint, "leaving", worker)]
        return await self._script("swap_instance", keys, [worker, instance])

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

    async def oldest_queued(self, endpoints: list[str]) -> dict[str, float | None]:
        """Two round trips for any number of endpoints: the queues' heads, then their records'
        creation times (a head taken in between still has its record)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for endpoint in endpoints:
                pipe.lindex(self._k(endpoint, "queue"), 0)
            heads = await pipe.execute()
        found: dict[str, float | None] = dict.fromkeys(endpoints)
        queued = [(e, h) for e, h in zip(endpoints, heads, strict=True) if h]
        if not queued:
            return found
        async with self.redis.pipeline(transaction=False) as pipe:
            for endpoint, head in queued:
                pipe.hget(self._k(endpoint, "job", head), "created_at")
            created = await pipe.execute()
        for (endpoint, _), value in zip(queued, created, strict=True):
            found[endpoint] = float(value) if value else None
        return found

    async def dead_letters(self, endpoint: str) -> list[str]:
        return list(await self.redis.lrange(self._k(endpoint, "dlq"), 0, -1))

    async def set_problem(self, endpoint: str, problem: HandlerProblem | None) -> None:
        if problem is None:
            await self.redis.delete(self._k(endpoint, "problem"))
        else:
            await self.redis.set(self._k(endpoint, "problem"), problem.model_dump_json())

    async def get_problem(self, endpoint: str) -> HandlerProblem | None:
        raw = await self.redis.get(self._k(endpoint, "problem"))
        return HandlerProblem.model_validate_json(raw) if raw else None

    # -- housekeeping ------------------------------------------------------------------------
    async def take_tokens(
        self, endpoint: str, bucket: str, rate: float, burst: int, wanted: int, now: float
    ) -> tuple[int, float]:
        key = self._k(endpoint, "rate", bucket)
        taken, wait = await self._script("take_tokens", [key], [rate, burst, wanted])
        return int(taken), float(wait)

    async def acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        """Take or renew the lease in one script: a renewal never extends another's lease."""
        keys, args = [f"{self.prefix}:lease:{name}"], [owner, int(ttl * 1000)]
        return bool(await self._script("lease", keys, args))

    async def forget_expired(self, endpoint: str, now: float) -> int:
        return 0  # Redis expires terminal records by itself (PEXPIREAT)

    async def ping(self) -> None:
        await self.redis.ping()

    def unseen_until(self) -> float:
        return max(self._pipe.stalled_until, self._create_pipe.stalled_until)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._listener, 2)
        await self._close_pubsub()
        for pipe in (self._pipe, self._create_pipe):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pipe.close(), 2)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.redis.aclose(), 2)


for _name, _method in list(vars(RedisBackend).items()):
    if inspect.iscoroutinefunction(_method) and not _name.startswith("_") and _name != "close":
        setattr(RedisBackend, _name, _unavailable(_method))
