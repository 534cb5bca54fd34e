"""Imports and validates HANDLER_MODULE and builds the config for `runpod.serverless.start`.

Every failure is a `HandlerLoadError` with an exact message and its own exit code, so that a
crash-looping pod tells the operator (through the termination log) what is wrong.
"""

from __future__ import annotations

import functools
import importlib
import re
import sys
import traceback
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from handler_worker.adapters import adapt

HANDLER_MODULE_ENV = "HANDLER_MODULE"
DEFAULT_HANDLER_MODULE = "handler_worker.generic"
CONCURRENCY_ENV = "HANDLER_CONCURRENCY"

# Exit codes, one per kind of loader failure (shown by Kubernetes as the container's exit code).
EXIT_BAD_MODULE_NAME = 2
EXIT_MODULE_NOT_FOUND = 3
EXIT_IMPORT_FAILED = 4
EXIT_NO_HANDLER = 5
EXIT_NOT_CALLABLE = 6
EXIT_BAD_OPTION = 7

_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class HandlerLoadError(Exception):
    """HANDLER_MODULE cannot serve jobs; `message` is exact, `exit_code` says which case."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def module_name_from_env(env: Mapping[str, str]) -> str:
    return env.get(HANDLER_MODULE_ENV, "").strip() or DEFAULT_HANDLER_MODULE


def _is_missing(name: str, missing: str | None) -> bool:
    """True when the ModuleNotFoundError is about `name` itself (or one of its parents)."""
    return missing is not None and (name == missing or name.startswith(missing + "."))


def _import_traceback(exc: BaseException) -> str:
    """The module's own traceback: importlib's and this loader's frames left out."""
    summary = traceback.TracebackException.from_exception(exc)
    summary.stack = traceback.StackSummary.from_list(
        [
            frame
            for frame in summary.stack
            if not frame.filename.startswith("<frozen importlib")
            and frame.filename not in (__file__, importlib.__file__)
        ]
    )
    return "".join(summary.format()).rstrip()


def import_module(name: str) -> ModuleType:
    if not _MODULE_NAME.match(name):
        raise HandlerLoadError(
            f"HANDLER_MODULE '{name}' is not a dotted Python module name", EXIT_BAD_MODULE_NAME
        )
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if _is_missing(name, exc.name):
            raise HandlerLoadError(
                f"Cannot import handler module '{name}': ModuleNotFoundError: "
                f"No module named '{exc.name}' (sys.path: {sys.path})",
                EXIT_MODULE_NOT_FOUND,
            ) from None
        raise HandlerLoadError(
            f"Importing handler module '{name}' failed:\n{_import_traceback(exc)}",
            EXIT_IMPORT_FAILED,
        ) from None
    except BaseException as exc:  # SyntaxError, SystemExit, anything the module raised
        raise HandlerLoadError(
            f"Importing handler module '{name}' failed:\n{_import_traceback(exc)}",
            EXIT_IMPORT_FAILED,
        ) from None


def _constant_concurrency(value: int, current: int) -> int:
    return value


def env_flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    """A HANDLER_* switch: 1/true/yes/on or 0/false/no/off (any case); else `default`."""
    value = env.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return default


def concurrency(env: Mapping[str, str]) -> int:
    """HANDLER_CONCURRENCY (default 1): how many jobs the handler runs at once."""
    raw = env.get(CONCURRENCY_ENV, "").strip()
    if not raw:
        return 1
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise HandlerLoadError(
            f"{CONCURRENCY_ENV} must be a positive integer, got '{raw}'", EXIT_BAD_OPTION
        )
    return value


def _concurrency_from_env(env: Mapping[str, str]) -> Callable[[int], int] | None:
    value = concurrency(env)
    return functools.partial(_constant_concurrency, value) if value > 1 else None


def build_start_config(module: ModuleType, env: Mapping[str, str]) -> dict[str, Any]:
    """The `runpod.serverless.start` config for a loaded module (validated)."""
    name = module.__name__
    if not hasattr(module, "handler"):
        raise HandlerLoadError(
            f"Module '{name}' does not export a 'handler' function", EXIT_NO_HANDLER
        )
    handler = module.handler
    if not callable(handler):
        raise HandlerLoadError(f"'handler' in module '{name}' is not callable", EXIT_NOT_CALLABLE)

    config: dict[str, Any] = {"handler": adapt(handler)}
    modifier = getattr(module, "concurrency_modifier", None)
    if modifier is not None:
        if not callable(modifier):
            raise HandlerLoadError(
                f"'concurrency_modifier' in module '{name}' is not callable", EXIT_NOT_CALLABLE
            )
        config["concurrency_modifier"] = modifier
    elif (from_env := _concurrency_from_env(env)) is not None:
        config["concurrency_modifier"] = from_env
    for flag in ("return_aggregate_stream", "refresh_worker"):
        if hasattr(module, flag):
            config[flag] = bool(getattr(module, flag))
    return config


def load_module(env: Mapping[str, str]) -> tuple[ModuleType, dict[str, Any]]:
    """Import HANDLER_MODULE from `env`: the module and its validated SDK start config."""
    module = import_module(module_name_from_env(env))
    return module, build_start_config(module, env)


def load(env: Mapping[str, str]) -> dict[str, Any]:
    """Import HANDLER_MODULE from `env` and return the validated SDK start config."""
    return load_module(env)[1]
