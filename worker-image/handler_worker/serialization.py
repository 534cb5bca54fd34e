"""cloudpickle + base64 encoding of callables, arguments and results for the generic handler.

Pure: no I/O. Decoding checks type, size and strict base64 before unpickling and raises
`PayloadError` with a message a client can act on.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import cloudpickle

DEFAULT_MAX_PAYLOAD_BYTES = 64 * 1024 * 1024


class PayloadError(ValueError):
    """A serialized payload is malformed, oversize or cannot be unpickled."""


def encode(value: Any) -> str:
    """cloudpickle `value` and return it as base64 text."""
    try:
        return base64.b64encode(cloudpickle.dumps(value)).decode("ascii")
    except Exception as exc:  # cloudpickle raises many types for unpicklable values
        raise PayloadError(f"could not serialize {type(value).__name__}: {exc}") from exc


def decode(data: Any, field: str) -> Any:
    """Decode one base64 cloudpickle value named `field` (used in error messages)."""
    if not isinstance(data, str):
        raise PayloadError(
            f"{field}: expected a base64-encoded cloudpickle string, got {type(data).__name__}"
        )
    try:
        raw = binascii.a2b_base64(data, strict_mode=True)
    except binascii.Error as exc:
        raise PayloadError(f"{field}: not valid base64 ({exc})") from None
    try:
        return cloudpickle.loads(raw)
    except Exception as exc:
        raise PayloadError(
            f"{field}: could not unpickle payload ({type(exc).__name__}: {exc})"
        ) from None


def payload_size(*values: Any) -> int:
    """Total length of the string leaves in `values` (lists and dicts are walked)."""
    total = 0
    stack = list(values)
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            total += len(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list | tuple):
            stack.extend(value)
    return total


def check_payload_size(size: int, limit: int) -> None:
    if size > limit:
        raise PayloadError(
            f"payload of {size} bytes exceeds the limit of {limit} bytes "
            "(set HANDLER_GENERIC_MAX_PAYLOAD_BYTES to raise it)"
        )
