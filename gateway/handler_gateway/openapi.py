"""The gateway's OpenAPI 3.1 document, generated from the routes the gateway serves (their
summaries and the pydantic models of `handler_protocol.models`). Pure: no I/O. Served at
`/openapi.json`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from handler_protocol import models
from handler_protocol.ids import ENDPOINT_ID

REF = "#/components/schemas/{model}"
CLIENT = [{"clientKey": []}]
WORKER = [{"workerToken": []}]
ADMIN = [{"adminKey": []}]

SECURITY = {"client": CLIENT, "worker": WORKER, "admin": ADMIN}


@dataclass(frozen=True)
class Operation:
    """One route as the document shows it: the routes module lists them with their handlers,
    so a route cannot be served undocumented, nor documented and not served."""

    method: str  # GET, POST, ...
    path: str  # the full path, e.g. /v2/{endpoint}/run
    summary: str
    audience: str  # client, worker or admin: its security scheme
    request: type[BaseModel] | None = None
    response: type[BaseModel] | None = None


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(model: type[BaseModel]) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(model)}}


def _parameter(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if name == "endpoint":
        schema["pattern"] = ENDPOINT_ID.pattern
    return {"name": name, "in": "path", "required": True, "schema": schema}


@cache
def build_openapi(operations: tuple[Operation, ...]) -> dict[str, Any]:
    """The document of `operations` (cached: the routes are fixed at import)."""
    all_models = {
        model for op in operations for model in (op.request, op.response) if model is not None
    }
    all_models.add(models.ErrorBody)
    _, schema = models_json_schema(
        [(model, "validation") for model in sorted(all_models, key=lambda m: m.__name__)],
        ref_template=REF,
    )
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        method, path, summary, request, response = (
            op.method.lower(),
            op.path,
            op.summary,
            op.request,
            op.response,
        )
        params = [
            _parameter(name) for name in ("endpoint", "job", "worker") if "{" + name + "}" in path
        ]
        operation: dict[str, Any] = {
            "summary": summary,
            "security": SECURITY[op.audience],
            "parameters": params,
            "responses": {
                "200": {"description": "OK", **({"content": _json(response)} if response else {})},
                "4XX": {"description": "Client error", "content": _json(models.ErrorBody)},
                "503": {
                    "description": "Queue backend unavailable",
                    "content": _json(models.ErrorBody),
                },
            },
        }
        responses = operation["responses"]
        if method == "put":  # create or replace
            responses["201"] = {"description": "Created", **responses["200"]}
            responses["200"] = {**responses["200"], "description": "Replaced"}
        if "(204: none)" in summary:  # a long-poll that ended with nothing
            responses["204"] = {"description": "Nothing within the hold"}
        if request is not None:
            operation["requestBody"] = {"required": True, "content": _json(request)}
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "handler-operator job gateway", "version": "v1"},
        "paths": paths,
        "components": {
            "schemas": schema.get("$defs", {}),
            "securitySchemes": {
                "clientKey": {"type": "http", "scheme": "bearer"},
                "adminKey": {"type": "http", "scheme": "bearer"},
                "workerToken": {"type": "apiKey", "in": "header", "name": "Authorization"},
            },
        },
    }
