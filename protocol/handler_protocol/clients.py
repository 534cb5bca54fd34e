"""The client of the gateway's HTTP API: `JobClient` (client and admin routes, as `handlerctl`
and `@remote` use them) and `GatewayAdmin` (what the operator registers and reads), over one
request path that turns answers into values or typed errors."""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

import aiohttp

from handler_protocol import __version__

USER_AGENT = f"handler-operator/{__version__}"


class Unavailable(Exception):
    """Retryable: the server could not be reached, timed out, or answered 5xx."""


class Refused(Exception):
    """The server refused the request (4xx): its HTTP status and its `{"error": ...}` message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class NotFound(Refused):
    """404: what the request names does not exist."""

    def __init__(self, message: str, status: int = 404):
        super().__init__(status, message)


class GatewayApi:
    """One aiohttp session to a gateway, bearer-authenticated; `request` returns the decoded
    JSON body or raises `Refused`/`NotFound` (4xx) or `Unavailable` (5xx, network, timeout)."""

    def __init__(self, url: str, key: str, timeout: float = 60, connections: int = 64):
        self.url = url.rstrip("/")
        self.key = key
        self.timeout = timeout
        self.connections = connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> GatewayApi:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(limit=self.connections),
                headers={"User-Agent": USER_AGENT},
            )
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        try:
            async with self._session.request(
                method, self.url + path, json=body, headers=headers
            ) as response:
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unavailable(f"cannot reach the gateway at {self.url}: {exc!r}") from exc
        try:
            payload = json.loads(text) if text else None
        except ValueError:
            payload = {"error": text[:300]}
        if response.status >= 500:
            raise Unavailable(f"gateway {method} {path}: HTTP {response.status}: {text[:300]}")
        if response.status >= 400:
            message = payload.get("error") if isinstance(payload, dict) else None
            message = str(message or text or response.reason)
            if response.status == 404:
                raise NotFound(message)
            raise Refused(response.status, message)
        return payload

    async def call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """`request` of a route that answers a JSON object."""
        payload = await self.request(method, path, body)
        if not isinstance(payload, dict):
            raise Unavailable(f"gateway {method} {path}: not a JSON object: {str(payload)[:200]}")
        return payload

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def query(**values: str | None) -> str:
    """`?a=1&b=2` of the values that are set ("" when none is)."""
    encoded = urllib.parse.urlencode({k: v for k, v in values.items() if v})
    return f"?{encoded}" if encoded else ""


class JobClient(GatewayApi):
    """A gateway's client API (`/v2/{endpoint}/...`) and its admin reads and DLQ, for
    `handlerctl` and `@remote`."""

    async def __aenter__(self) -> JobClient:
        return self

    async def run(self, endpoint: str, request: dict[str, Any]) -> dict[str, Any]:
        return await self.call("POST", f"/v2/{endpoint}/run", request)

    async def runsync(self, endpoint: str, request: dict[str, Any]) -> dict[str, Any]:
        return await self.call("POST", f"/v2/{endpoint}/runsync", request)

    async def status(self, endpoint: str, job: str) -> dict[str, Any]:
        return await self.call("GET", f"/v2/{endpoint}/status/{job}")

    async def stream(self, endpoint: str, job: str) -> dict[str, Any]:
        return await self.call("GET", f"/v2/{endpoint}/stream/{job}")

    async def cancel(self, endpoint: str, job: str) -> dict[str, Any]:
        return await self.call("POST", f"/v2/{endpoint}/cancel/{job}")

    async def retry(self, endpoint: str, job: str) -> dict[str, Any]:
        return await self.call("POST", f"/v2/{endpoint}/retry/{job}")

    async def health(self, endpoint: str) -> dict[str, Any]:
        return await self.call("GET", f"/v2/{endpoint}/health")

    async def jobs(
        self, endpoint: str, status: str | None, limit: int, cursor: str | None = None
    ) -> dict[str, Any]:
        """One page of the endpoint's jobs, newest first: {"jobs": [...], "nextCursor": ...}."""
        found = query(limit=str(limit), status=status, cursor=cursor)
        return await self.call("GET", f"/v2/{endpoint}/jobs{found}")

    async def logs(
        self, endpoint: str, after: int, worker: str | None, wait: float = 0
    ) -> dict[str, Any]:
        """`handlerctl dev`'s workers' lines after line `after` (its own route; another
        gateway answers 404): {"lines": [{"seq", "worker", "line"}], "next": N}."""
        found = query(after=str(after), wait=f"{wait:g}", worker=worker)
        return await self.call("GET", f"/dev/v1/endpoints/{endpoint}/logs{found}")

    async def endpoints(self) -> list[dict[str, Any]]:
        return list((await self.call("GET", "/admin/v1/endpoints"))["endpoints"])

    async def queues(self) -> dict[str, Any]:
        return dict((await self.call("GET", "/admin/v1/queues"))["endpoints"])

    async def dead_letters(self, endpoint: str) -> list[dict[str, Any]]:
        return list((await self.call("GET", f"/admin/v1/endpoints/{endpoint}/dlq"))["jobs"])

    async def replay(self, endpoint: str, ids: list[str] | None) -> list[str]:
        body = {"ids": ids} if ids else {}
        result = await self.request("POST", f"/admin/v1/endpoints/{endpoint}/dlq/replay", body)
        return list(result["replayed"])


class GatewayAdmin(GatewayApi):
    """The gateway's admin API (`/admin/v1/...`) as the operator uses it."""

    def __init__(self, url: str, key: str, timeout: float = 10):
        super().__init__(url, key, timeout=timeout, connections=16)

    async def put_endpoint(self, endpoint: str, config: dict[str, Any]) -> None:
        await self.request("PUT", f"/admin/v1/endpoints/{endpoint}", config)

    async def delete_endpoint(self, endpoint: str) -> None:
        try:
            await self.request("DELETE", f"/admin/v1/endpoints/{endpoint}")
        except NotFound:
            return

    async def queues(self) -> dict[str, Any]:
        return dict((await self.call("GET", "/admin/v1/queues"))["endpoints"])

    async def poll_queues(self, since: float | None, wait: float) -> dict[str, Any]:
        """All endpoints' figures, held up to `wait` s until a job is queued after `since`."""
        found = f"?wait={wait:g}&since={since!r}" if since is not None else ""
        return await self.call("GET", "/admin/v1/queues" + found)

    async def purge(self, endpoint: str) -> None:
        # The admin route: the client one refuses gateway keys on endpoints running callers'
        # code, and counts against rate limits.
        await self.request("POST", f"/admin/v1/endpoints/{endpoint}/purge-queue")

    async def report_problem(self, endpoint: str, reason: str | None, message: str = "") -> None:
        """Tell the gateway why the endpoint's workers fail (reason None: they run again); it
        tells clients waiting on the endpoint's queued jobs."""
        path = f"/admin/v1/endpoints/{endpoint}/handler-problem"
        if reason is None:
            await self.request("DELETE", path)
        else:
            await self.request("PUT", path, {"reason": reason, "message": message[:2000]})

    async def drain(self, endpoint: str, worker: str, draining: bool = True) -> list[str]:
        method = "POST" if draining else "DELETE"
        body = await self.request(method, f"/admin/v1/endpoints/{endpoint}/workers/{worker}/drain")
        return list(body["jobs"])
