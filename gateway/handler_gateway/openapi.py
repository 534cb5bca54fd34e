"""The gateway's OpenAPI 3.1 document, generated from the pydantic models in `models.py`.

Pure: no I/O. Served at `/openapi.json`.
"""

from __future__ import annotations

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

# (method, path, summary, request model, response model, security, extra responses)
OPERATIONS: list[tuple[str, str, str, type[BaseModel] | None, type[BaseModel] | None, list]] = [
    ("post", "/v2/{endpoint}/run", "Queue a job", models.RunRequest, models.JobView, CLIENT),
    (
        "post",
        "/v2/{endpoint}/runsync",
        "Queue a job and wait (bounded) for its end",
        models.RunRequest,
        models.JobView,
        CLIENT,
    ),
    (
        "get",
        "/v2/{endpoint}/status/{job}",
        "A job's status and result",
        None,
        models.JobView,
        CLIENT,
    ),
    (
        "get",
        "/v2/{endpoint}/status-sync/{job}",
        "A job's status, waiting up to wait ms for its end",
        None,
        models.JobView,
        CLIENT,
    ),
    (
        "get",
        "/v2/{endpoint}/stream/{job}",
        "New stream chunks of a job",
        None,
        models.StreamView,
        CLIENT,
    ),
    ("post", "/v2/{endpoint}/cancel/{job}", "Cancel a job", None, models.JobView, CLIENT),
    (
        "post",
        "/v2/{endpoint}/retry/{job}",
        "Re-queue a FAILED, TIMED_OUT or CANCELLED job",
        None,
        models.JobView,
        CLIENT,
    ),
    (
        "post",
        "/v2/{endpoint}/purge-queue",
        "Cancel every queued job",
        None,
        models.PurgeResult,
        CLIENT,
    ),
    ("get", "/v2/{endpoint}/health", "Job and worker counts", None, models.Health, CLIENT),
    (
        "get",
        "/v2/{endpoint}/jobs",
        "The endpoint's jobs kept (within their ttl), newest first; ?status=&limit=&cursor=",
        None,
        models.JobList,
        CLIENT,
    ),
    (
        "get",
        "/v2/{endpoint}/job-take/{worker}",
        "Long-poll for one job (204: none)",
        None,
        None,
        WORKER,
    ),
    (
        "get",
        "/v2/{endpoint}/job-take-batch/{worker}",
        "Long-poll for up to batch_size jobs (204: none)",
        None,
        None,
        WORKER,
    ),
    (
        "get",
        "/v2/{endpoint}/job-stop/{worker}",
        "Long-poll for jobs to stop (204: none)",
        None,
        None,
        WORKER,
    ),
    (
        "post",
        "/v2/{endpoint}/job-done/{worker}/{job}",
        "Post a result or progress (take=N: then long-poll for up to N jobs, answered in jobs)",
        None,
        None,
        WORKER,
    ),
    (
        "post",
        "/v2/{endpoint}/job-stream/{worker}/{job}",
        "Post one stream chunk",
        None,
        None,
        WORKER,
    ),
    (
        "get",
        "/v2/{endpoint}/ping/{worker}",
        "Worker heartbeat (job_id: running jobs)",
        None,
        None,
        WORKER,
    ),
    (
        "post",
        "/v2/{endpoint}/leave/{worker}",
        "A worker shuts down: its long-polls end now, it gets no new job",
        None,
        None,
        WORKER,
    ),
    (
        "get",
        "/v2/{endpoint}/job-channel/{worker}",
        "WebSocket (ours): takes and results as JSON frames with a seq, each answered once",
        None,
        None,
        WORKER,
    ),
    ("get", "/admin/v1/endpoints", "List endpoints", None, models.EndpointList, ADMIN),
    (
        "put",
        "/admin/v1/endpoints/{endpoint}",
        "Create or update an endpoint",
        models.EndpointConfig,
        models.EndpointSummary,
        ADMIN,
    ),
    ("get", "/admin/v1/endpoints/{endpoint}", "One endpoint", None, models.EndpointSummary, ADMIN),
    (
        "delete",
        "/admin/v1/endpoints/{endpoint}",
        "Delete an endpoint and its jobs",
        None,
        None,
        ADMIN,
    ),
    ("get", "/admin/v1/endpoints/{endpoint}/workers", "Workers of an endpoint", None, None, ADMIN),
    (
        "post",
        "/admin/v1/endpoints/{endpoint}/workers/{worker}/drain",
        "Stop giving jobs to a worker",
        None,
        models.DrainResult,
        ADMIN,
    ),
    (
        "delete",
        "/admin/v1/endpoints/{endpoint}/workers/{worker}/drain",
        "Undo a drain",
        None,
        models.DrainResult,
        ADMIN,
    ),
    (
        "post",
        "/admin/v1/endpoints/{endpoint}/purge-queue",
        "Cancel every queued job (the admin's purge-queue, on any endpoint)",
        None,
        models.PurgeResult,
        ADMIN,
    ),
    (
        "put",
        "/admin/v1/endpoints/{endpoint}/handler-problem",
        "The endpoint's workers fail: queued jobs' status and health say why",
        models.HandlerProblem,
        models.HandlerProblemView,
        ADMIN,
    ),
    (
        "delete",
        "/admin/v1/endpoints/{endpoint}/handler-problem",
        "The endpoint's workers run again",
        None,
        models.HandlerProblemView,
        ADMIN,
    ),
    (
        "get",
        "/admin/v1/endpoints/{endpoint}/dlq",
        "Dead-lettered jobs",
        None,
        models.DeadLetterList,
        ADMIN,
    ),
    (
        "post",
        "/admin/v1/endpoints/{endpoint}/dlq/replay",
        "Re-queue dead-lettered jobs",
        models.ReplayRequest,
        models.ReplayResult,
        ADMIN,
    ),
    (
        "get",
        "/admin/v1/endpoints/{endpoint}/queue",
        "Queue figures of one endpoint (KEDA metrics-api; admin key or the worker token)",
        None,
        models.QueueFigures,
        ADMIN,
    ),
    (
        "get",
        "/admin/v1/queues",
        "Queue figures of all endpoints (the autoscaler's one call); ?wait=S&since=T holds "
        "up to S seconds until a job is queued after T",
        None,
        models.QueuesView,
        ADMIN,
    ),
]


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(model: type[BaseModel]) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(model)}}


# Read routes RunPod's clients call with GET or POST alike (the same operation under both).
GET_OR_POST = ("/v2/{endpoint}/status/{job}", "/v2/{endpoint}/status-sync/{job}",
               "/v2/{endpoint}/stream/{job}")  # fmt: skip


def _parameter(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if name == "endpoint":
        schema["pattern"] = ENDPOINT_ID.pattern
    return {"name": name, "in": "path", "required": True, "schema": schema}


@cache
def build_openapi() -> dict[str, Any]:
    all_models = {model for op in OPERATIONS for model in op[3:5] if model is not None}
    all_models.add(models.ErrorBody)
    _, schema = models_json_schema(
        [(model, "validation") for model in sorted(all_models, key=lambda m: m.__name__)],
        ref_template=REF,
    )
    paths: dict[str, dict[str, Any]] = {}
    for method, path, summary, request, response, security in OPERATIONS:
        params = [
            _parameter(name) for name in ("endpoint", "job", "worker") if "{" + name + "}" in path
        ]
        operation: dict[str, Any] = {
            "summary": summary,
            "security": security,
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
        if path in GET_OR_POST:
            paths[path]["post"] = {**operation, "summary": f"{summary} (as GET)"}
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
