"""How the Redis backend reaches Redis: a `redis://` URL's pool, or the primary that Redis
Sentinel names for a `redis+sentinel://` URL (followed across failovers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

SENTINEL_SCHEME = "redis+sentinel://"
SENTINEL_PORT = 26379
# What every connection gets: connects fail fast, a command hung for long fails.
CONNECTION_OPTIONS: dict[str, Any] = {
    "decode_responses": True,
    "socket_connect_timeout": 2,
    "socket_timeout": 10,
}


@dataclass
class SentinelAddress:
    """`redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]
    [?sentinel_password=...]`: the sentinels to ask, the service (master group) name, the
    database, and the credentials of the Redis servers (the sentinels' own apart)."""

    sentinels: list[tuple[str, int]]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, url: str) -> SentinelAddress:
        if not url.startswith(SENTINEL_SCHEME):
            raise ValueError(f"not a Sentinel URL: {url!r}")
        parts = urlsplit(url)
        credentials, _, hosts = parts.netloc.rpartition("@")
        username, _, password = credentials.partition(":") if credentials else ("", "", "")
        sentinels = []
        for host in filter(None, hosts.split(",")):
            name, _, port = host.rpartition(":") if ":" in host else (host, "", "")
            try:
                sentinels.append((name, int(port) if port else SENTINEL_PORT))
            except ValueError:
                raise ValueError(f"bad Sentinel address {host!r} in {url!r}") from None
        path = [segment for segment in parts.path.split("/") if segment]
        if not sentinels or not path or len(path) > 2:
            raise ValueError(
                f"bad Sentinel URL {url!r}: use redis+sentinel://host:port[,host:port...]"
                "/service[/db]"
            )
        if len(path) == 2 and not path[1].isdigit():
            raise ValueError(f"bad database {path[1]!r} in {url!r}: a number")
        query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
        return cls(
            sentinels=sentinels,
            service=unquote(path[0]),
            db=int(path[1]) if len(path) == 2 else 0,
            username=unquote(username) or None,
            password=unquote(password) or None,
            sentinel_password=query.pop("sentinel_password", None),
            extra=query,
        )


def redis_client(url: str, max_connections: int) -> aioredis.Redis:
    """A client for `url`. A plain URL gets a blocking pool (many long-polls and bursts wait for
    a connection instead of failing); a Sentinel URL gets the service's current primary, asked
    of the sentinels again whenever a connection to it fails or finds it demoted."""
    if not url.startswith(SENTINEL_SCHEME):
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=5, **CONNECTION_OPTIONS
        )
        return aioredis.Redis(connection_pool=pool)
    address = SentinelAddress.parse(url)
    if address.extra:
        raise ValueError(f"unknown Sentinel URL options: {', '.join(sorted(address.extra))}")
    sentinel_options = {"socket_connect_timeout": 2, "socket_timeout": 2}
    if address.sentinel_password:
        sentinel_options["password"] = address.sentinel_password
    sentinel = Sentinel(address.sentinels, sentinel_kwargs=sentinel_options)
    # redis-py's Sentinel pool does not block when full (it raises): unbounded instead, the
    # gateway's concurrency bounds it.
    return sentinel.master_for(
        address.service,
        redis_class=aioredis.Redis,
        connection_pool_class=SentinelConnectionPool,
        db=address.db,
        username=address.username,
        password=address.password,
        **CONNECTION_OPTIONS,
    )
