"""Gateway entry point: `handler-gateway` / `python -m handler_gateway [--backend ...] [--port ...]`."""

from __future__ import annotations

import asyncio
import logging
import sys

from aiohttp import web

from handler_gateway.backends import open_backend
from handler_gateway.keys import KeyConfigError, Keys
from handler_gateway.operations import Timings
from handler_gateway.routes import create_app
from handler_gateway.settings import parse


def main(argv: list[str] | None = None) -> int:
    settings = parse(argv)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        keys = Keys.load(settings.api_key_files, settings.admin_key_files, settings.insecure_dev)
        backend = open_backend(
            settings.backend,
            prefix=settings.redis_prefix,
            wait_replicas=settings.redis_wait_replicas,
        )
    except (KeyConfigError, ValueError) as exc:
        print(f"handler-gateway: {exc}", file=sys.stderr)
        return 2
    if settings.insecure_dev:
        logging.getLogger("handler_gateway").warning(
            "--insecure-dev: no API key is checked; never expose this gateway"
        )
    timings = Timings(
        take_hold=settings.take_hold_seconds,
        stop_hold=settings.take_hold_seconds,
        runsync_wait=settings.runsync_wait_seconds,
    )
    app = create_app(backend, keys, timings, max_body=settings.max_body_bytes)
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        print=None,
        access_log=None,
        loop=event_loop(),
    )
    return 0


def event_loop() -> asyncio.AbstractEventLoop:
    """libuv's event loop (uvloop) where installed, as uvicorn does; else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


if __name__ == "__main__":
    sys.exit(main())
