"""Endpoint ids: a HandlerDeployment's gateway endpoint (`<namespace>--<name>`) and the names
`@remote` and `handlerctl` derive from functions and directories. Pure."""

from __future__ import annotations

import re

# What the gateway accepts as an endpoint id (a path segment; Redis keys carry it).
ENDPOINT_ID = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")
SEPARATOR = "--"


def endpoint_id(namespace: str, name: str) -> str:
    """The gateway endpoint of a HandlerDeployment: `<namespace>--<name>`."""
    return f"{namespace}{SEPARATOR}{name}"


def namespace_of(endpoint: str) -> str:
    """The namespace part of `<namespace>--<name>` ("" for an id without one)."""
    namespace, separator, _ = endpoint.partition(SEPARATOR)
    return namespace if separator else ""


def endpoint_name(name: str, default: str = "remote") -> str:
    """A DNS-1123 label from a function, class or directory name (`embed_texts` -> embed-texts)."""
    return re.sub(r"[^a-z0-9-]+", "-", str(name).lower()).strip("-")[:63] or default
