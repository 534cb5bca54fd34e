"""Gateway settings from command-line flags and HANDLER_GATEWAY_* environment variables."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

ENV_PREFIX = "HANDLER_GATEWAY_"


def _env(name: str, default: str) -> str:
    return os.environ.get(ENV_PREFIX + name, default)


@dataclass
class Settings:
    backend: str = "memory://"
    host: str = "0.0.0.0"
    port: int = 8080
    api_key_files: list[str] = field(default_factory=list)
    admin_key_files: list[str] = field(default_factory=list)
    insecure_dev: bool = False
    max_body_bytes: int = 10 * 1024 * 1024
    take_hold_seconds: float = 25.0
    runsync_wait_seconds: float = 30.0
    redis_prefix: str = "hop"
    redis_wait_replicas: int | None = None
    log_level: str = "INFO"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="handler-gateway",
        description="RunPod-compatible job gateway (client, worker and admin API).",
        epilog=f"Every flag also reads {ENV_PREFIX}<NAME> (e.g. {ENV_PREFIX}BACKEND).",
    )
    p.add_argument(
        "--backend",
        default=_env("BACKEND", "memory://"),
        help="memory:// (embedded), redis://host:port/db, or "
        "redis+sentinel://host:port[,host:port...]/service[/db] (Redis Sentinel)",
    )
    p.add_argument("--host", default=_env("HOST", "0.0.0.0"))
    p.add_argument("--port", type=int, default=int(_env("PORT", "8080")))
    p.add_argument(
        "--api-key-file",
        action="append",
        dest="api_key_files",
        default=[f for f in _env("API_KEY_FILE", "").split(",") if f],
        help="file with client API keys, one per line (repeatable)",
    )
    p.add_argument(
        "--admin-key-file",
        action="append",
        dest="admin_key_files",
        default=[f for f in _env("ADMIN_KEY_FILE", "").split(",") if f],
        help="file with admin keys, one per line (repeatable)",
    )
    p.add_argument(
        "--insecure-dev",
        action="store_true",
        help="accept every request without keys (local development only)",
    )
    p.add_argument(
        "--max-body-bytes", type=int, default=int(_env("MAX_BODY_BYTES", str(10 * 1024 * 1024)))
    )
    p.add_argument(
        "--take-hold-seconds",
        type=float,
        default=float(_env("TAKE_HOLD_SECONDS", "25")),
        help="how long job-take long-polls are held before a 204",
    )
    p.add_argument(
        "--runsync-wait-seconds", type=float, default=float(_env("RUNSYNC_WAIT_SECONDS", "30"))
    )
    p.add_argument("--redis-prefix", default=_env("REDIS_PREFIX", "hop"))
    wait = _env("REDIS_WAIT_REPLICAS", "")
    p.add_argument(
        "--redis-wait-replicas",
        type=int,
        default=int(wait) if wait else None,
        help="replicas that must acknowledge a new job before its submit is answered (Redis "
        "WAIT); default 1 with redis+sentinel://, else 0",
    )
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"))
    return p


def parse(argv: list[str] | None = None) -> Settings:
    args = parser().parse_args(argv)
    return Settings(**vars(args))
