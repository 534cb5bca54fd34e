"""Webhook delivery: POST the finished job to the URL given at submission, with bounded retries.

Delivery is at-most-`attempts` tries with exponential backoff from the replica that ended the
job; a failure after the last try is logged and counted, never retried forever.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp

from handler_gateway.jobs import TERMINAL, Change

log = logging.getLogger("handler_gateway.webhooks")


class WebhookSender:
    def __init__(
        self,
        view: Any,
        attempts: int = 5,
        first_backoff: float = 0.5,
        timeout: float = 10.0,
    ):
        self.view = view  # JobRecord -> JSON-able dict (the status response)
        self.attempts = attempts
        self.first_backoff = first_backoff
        self.timeout = timeout
        self.delivered = 0
        self.failed = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

    def on_change(self, change: Change) -> None:
        job = change.job
        if job.webhook and job.status in TERMINAL and change.effects.counters:
            task = asyncio.get_running_loop().create_task(self.deliver(job.webhook, self.view(job)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def on_ignored(self, endpoint: str) -> None:
        return None

    async def deliver(self, url: str, payload: dict[str, Any]) -> bool:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        delay = self.first_backoff
        for attempt in range(1, self.attempts + 1):
            try:
                async with self._session.post(url, json=payload) as response:
                    if response.status < 300:
                        self.delivered += 1
                        return True
                    reason = f"HTTP {response.status}"
                    if 400 <= response.status < 500 and response.status not in (408, 429):
                        break  # the receiver rejects it: retrying will not help
            except (aiohttp.ClientError, TimeoutError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            if attempt < self.attempts:
                await asyncio.sleep(delay)
                delay *= 2
        self.failed += 1
        log.warning("webhook for job %s to %s failed: %s", payload.get("id"), url, reason)
        return False

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
