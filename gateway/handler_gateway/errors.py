"""The client-fault family: what a request did wrong, each with the HTTP status (and headers)
it is answered with. Anything else a route raises is the gateway's fault (500) or the backend's
(`BackendUnavailable`, 503)."""

from __future__ import annotations

import math

from handler_protocol.models import RateLimit


class ClientFault(Exception):
    """A request the gateway refuses; `status` is its HTTP answer."""

    status = 400

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(ClientFault):
    """Client input the gateway cannot use (HTTP 400)."""


class Unauthorized(ClientFault):
    """Missing or unknown credentials (HTTP 401)."""

    status = 401

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(ClientFault):
    """Known credentials that may not call this route (HTTP 403)."""

    status = 403


class NotFound(ClientFault):
    """An unknown endpoint or job (HTTP 404)."""

    status = 404


class Conflict(ClientFault):
    """The request does not fit the job's state (HTTP 409)."""

    status = 409


class TooLarge(ClientFault):
    """A request over its endpoint's size limit (HTTP 413)."""

    status = 413


class QueueFull(ClientFault):
    """A new job was refused: its endpoint already has `limit` jobs queued (HTTP 429)."""

    status = 429

    def __init__(self, endpoint: str, limit: int):
        super().__init__(
            f"endpoint '{endpoint}' has {limit} jobs queued, its limit (jobs.maxQueued): "
            "retry later"
        )
        self.endpoint, self.limit = endpoint, limit

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class RateLimited(ClientFault):
    """A caller over its request rate on an endpoint (HTTP 429, Retry-After: `wait` s)."""

    status = 429

    def __init__(self, endpoint: str, caller: str, limit: RateLimit, wait: float):
        super().__init__(
            f"key '{caller}' is over endpoint '{endpoint}''s rate limit of "
            f"{limit.requestsPerSecond:g} requests/s (burst {limit.burst}): retry in {wait:.2f} s"
        )
        self.wait = wait

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.wait)))}
