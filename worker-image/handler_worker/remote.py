"""`@remote`: mark a function or class to run on a GPU endpoint (the tetra-rp / flash model).

Without a gateway configured (and always inside a worker) the decorated object runs in-process.
With one (`configure(url=..., api_key=...)` or HANDLER_REMOTE_URL / HANDLERCTL_URL and the
matching API key), a call submits a generic-handler job naming the function (`function_name`,
arguments cloudpickled) to `<namespace>--<endpoint>` and returns its result. `handlerctl build`
finds these decorators by reading the source (AST), never by importing it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from handler_protocol.ids import endpoint_id, endpoint_name, namespace_of
from handler_protocol.statuses import TERMINAL
from handler_worker import chains
from handler_worker.endpoints import REMOTE_OPTIONS
from handler_worker.generic import build_named_request, decode_result

log = logging.getLogger("handler_worker.remote")


class RemoteError(RuntimeError):
    """The remote call failed: the job failed, or the function raised; its message and the
    remote traceback show where it is printed (as Ray and Dask show a task's)."""

    def __init__(self, message: str, remote_traceback: str = ""):
        shown = message
        if remote_traceback.strip():
            shown = f"{message}\n\nRemote traceback:\n{remote_traceback.rstrip()}"
        super().__init__(shown)
        self.message = message
        self.remote_traceback = remote_traceback


@dataclass
class RemoteConfig:
    url: str = ""
    api_key: str = ""
    namespace: str = "default"
    timeout: float = 3600.0


_config = RemoteConfig()


def configure(
    url: str | None = None,
    api_key: str | None = None,
    namespace: str | None = None,
    timeout: float | None = None,
) -> None:
    """Send calls of @remote objects to this gateway (url "" turns remote calls off again)."""
    if url is not None:
        _config.url = url
    if api_key is not None:
        _config.api_key = api_key
    if namespace is not None:
        _config.namespace = namespace
    if timeout is not None:
        _config.timeout = timeout


def active_config(
    env: Mapping[str, str] | None = None, endpoint: str | None = None
) -> RemoteConfig | None:
    """Where a call of `endpoint`'s object goes, or None to run it in-process.

    Inside a worker: in-process for its own endpoint, for an endpoint already in the job's
    call chain (no cycle can wait on itself), or without the gateway credential the operator
    gives the pod (HANDLER_REMOTE_URL, HANDLER_REMOTE_API_KEY); else through the gateway to
    that endpoint, in the worker's namespace, with its own workers and resources."""
    env = os.environ if env is None else env
    if env.get("RUNPOD_WEBHOOK_GET_JOB"):
        return _from_worker(env, endpoint)
    url = _config.url or env.get("HANDLER_REMOTE_URL") or env.get("HANDLERCTL_URL", "")
    if not url:
        return None
    key = _config.api_key or env.get("HANDLER_REMOTE_API_KEY") or env.get("HANDLERCTL_API_KEY", "")
    namespace = env.get("HANDLER_REMOTE_NAMESPACE") or _config.namespace
    return RemoteConfig(url.rstrip("/"), key, namespace, _config.timeout)


def _from_worker(env: Mapping[str, str], endpoint: str | None) -> RemoteConfig | None:
    url, key = env.get("HANDLER_REMOTE_URL", ""), env.get("HANDLER_REMOTE_API_KEY", "")
    own = chains.own_endpoint(env)
    namespace = namespace_of(own) or "default"
    if endpoint is None or not url or not key:
        return None
    target = endpoint_id(namespace, endpoint)
    if target == own or target in chains.CALL_CHAIN.get():
        return None
    return RemoteConfig(url.rstrip("/"), key, namespace, _config.timeout)


@dataclass(frozen=True)
class RemoteOptions:
    endpoint: str
    options: dict[str, Any] = field(default_factory=dict)


def remote(target: Any = None, /, **options: Any) -> Any:
    """`@remote`, `@remote(endpoint=..., gpu=1, ...)` on a function or a class."""
    unknown = sorted(set(options) - set(REMOTE_OPTIONS))
    if unknown:
        raise TypeError(
            f"@remote got unknown argument(s) {unknown}; allowed: {sorted(REMOTE_OPTIONS)}"
        )

    def decorate(obj: Any) -> Any:
        meta = RemoteOptions(endpoint_name(options.get("endpoint") or obj.__name__), options)
        if isinstance(obj, type):
            return _remote_class(obj, meta)
        if callable(obj):
            return RemoteFunction(obj, meta)
        raise TypeError(f"@remote decorates functions and classes, not {type(obj).__name__}")

    return decorate(target) if target is not None else decorate


def unwrap(obj: Any) -> Any:
    """The function or class under @remote (what a generated handler registers)."""
    return getattr(obj, "__remote_wrapped__", obj)


class RemoteFunction:
    """A @remote function: call it as before; `await f.aio(...)` is the async style."""

    def __init__(self, function: Callable[..., Any], meta: RemoteOptions):
        functools.update_wrapper(self, function)
        self.__remote_wrapped__ = function
        self.__remote__ = meta
        self._is_async = inspect.iscoroutinefunction(function)

    def _request(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        request = build_named_request(self.__remote_wrapped__.__name__, args, kwargs)
        return {**request, "call_chain": chains.current()}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._is_async:
            return self.aio(*args, **kwargs)
        config = active_config(endpoint=self.__remote__.endpoint)
        if config is None:
            return self.__remote_wrapped__(*args, **kwargs)
        # Built here, not in _run_sync's thread: the call chain is a context variable.
        request = self._request(args, kwargs)
        return _run_sync(lambda: submit(config, self.__remote__.endpoint, request))

    async def aio(self, *args: Any, **kwargs: Any) -> Any:
        config = active_config(endpoint=self.__remote__.endpoint)
        if config is None:
            result = self.__remote_wrapped__(*args, **kwargs)
            return await result if inspect.isawaitable(result) else result
        return await submit(config, self.__remote__.endpoint, self._request(args, kwargs))


def _remote_class(cls: type, meta: RemoteOptions) -> type:
    """A stand-in for `cls`: instances are local objects, or proxies whose methods run remotely."""

    class Remote:
        __remote_wrapped__ = cls
        __remote__ = meta

        def __new__(klass, *args: Any, **kwargs: Any) -> Any:
            config = active_config(endpoint=meta.endpoint)
            if config is None:
                return cls(*args, **kwargs)
            return RemoteInstance(cls.__name__, meta.endpoint, config, args, kwargs, cls)

    Remote.__name__ = cls.__name__
    Remote.__qualname__ = cls.__qualname__
    Remote.__module__ = cls.__module__
    Remote.__doc__ = cls.__doc__
    return Remote


class RemoteInstance:
    """`Model(...)` with a gateway configured: each method call is a job carrying the
    constructor arguments; a worker builds the instance on its first call and reuses it for
    the calls after (`handler_worker.generic.Instances`), so `__init__` runs once per worker.
    Inside a worker, where each call goes is decided at the call (the job it is made in may
    have its endpoint in the chain: then it runs on a local instance)."""

    def __init__(
        self,
        name: str,
        endpoint: str,
        config: RemoteConfig,
        args: tuple,
        kwargs: dict,
        cls: type | None = None,
    ):
        self._name, self._endpoint, self._config = name, endpoint, config
        self._constructor = (args, kwargs)
        self._cls, self._local = cls, None

    def _route(self) -> RemoteConfig | None:
        """This call's gateway, or None to run it on a local instance."""
        if self._cls is None or not os.environ.get("RUNPOD_WEBHOOK_GET_JOB"):
            return self._config
        return active_config(endpoint=self._endpoint)

    def _local_instance(self) -> Any:
        if self._local is None:
            assert self._cls is not None
            args, kwargs = self._constructor
            self._local = self._cls(*args, **kwargs)
        return self._local

    def __getattr__(self, method: str) -> RemoteMethod:
        if method.startswith("_"):
            raise AttributeError(method)
        return RemoteMethod(self, method)


class RemoteMethod:
    def __init__(self, instance: RemoteInstance, method: str):
        self.instance, self.method = instance, method

    def _request(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        instance = self.instance
        request = build_named_request(
            instance._name, args, kwargs, instance._constructor, self.method
        )
        return {**request, "call_chain": chains.current()}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        instance = self.instance
        config = instance._route()
        if config is None:
            return getattr(instance._local_instance(), self.method)(*args, **kwargs)
        request = self._request(args, kwargs)
        return _run_sync(lambda: submit(config, instance._endpoint, request))

    async def aio(self, *args: Any, **kwargs: Any) -> Any:
        instance = self.instance
        config = instance._route()
        if config is None:
            result = getattr(instance._local_instance(), self.method)(*args, **kwargs)
            return await result if inspect.isawaitable(result) else result
        return await submit(config, instance._endpoint, self._request(args, kwargs))


def _run_sync(factory: Callable[[], Any]) -> Any:
    """Run a coroutine to completion from sync code (in a helper thread inside a running loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


async def submit(config: RemoteConfig, endpoint: str, request: dict[str, Any]) -> Any:
    """Run one generic-handler job on `<namespace>--<endpoint>` and return its decoded result."""
    # aiohttp: the worker image has it (runpod depends on it); imported when first used.
    from handler_protocol.clients import JobClient, Refused, Unavailable

    target = endpoint_id(config.namespace, endpoint)
    async with JobClient(config.url, config.api_key, timeout=config.timeout) as client:
        try:
            job = await client.runsync(target, {"input": request})
            delay = 0.05
            warned = False
            while job.get("status") not in TERMINAL:
                problem = job.get("handlerProblem")
                if problem and not warned:  # the caller waits on: it may fix the handler
                    warned = True
                    log.warning(
                        "job %s on %s waits: the endpoint's workers fail (%s): %s",
                        job["id"], target, problem.get("reason"), problem.get("message"),
                    )  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 1.5)
                job = await client.status(target, job["id"])
        except Refused as exc:
            raise RemoteError(f"gateway answered {exc.status} for {target}: {exc}") from exc
        except Unavailable as exc:
            raise RemoteError(str(exc)) from exc
    output = job.get("output") if isinstance(job.get("output"), dict) else {}
    if job["status"] != "COMPLETED" and output.get("error_type"):
        # The function raised: the SDK lifts `error` to the job, the rest stays in the output.
        message = job.get("error") or output.get("error") or "(no message)"
        raise RemoteError(f"{output['error_type']}: {message}", output.get("traceback", ""))
    if job["status"] != "COMPLETED":
        raise RemoteError(f"job {job['id']} on {target} {job['status']}: {job.get('error')}")
    if not output.get("success"):
        raise RemoteError(
            f"{output.get('error_type', 'Error')}: {output.get('error')}",
            output.get("traceback", ""),
        )
    return decode_result(output)
