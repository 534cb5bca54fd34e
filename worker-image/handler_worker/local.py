"""Runs one job in-process without a gateway (`--test_input` / `--test_input_file`).

Jobs run through the runpod SDK's own job runners (`run_job`, `run_job_generator`), so results
and error shapes are exactly what a gateway would receive; generator output is aggregated.
"""

from __future__ import annotations

import json
import os
from typing import Any

from runpod.serverless.modules import rp_job
from runpod.serverless.modules.rp_handler import is_generator
from runpod.serverless.modules.rp_logger import RunPodLogger


class TestInputError(ValueError):
    """The local test job is not a JSON object with an `input` key."""


def quiet_sdk_logs() -> None:
    """Local runs log at INFO unless RUNPOD_LOG_LEVEL asks otherwise (the SDK defaults to DEBUG)."""
    if not os.environ.get("RUNPOD_LOG_LEVEL") and not os.environ.get("RUNPOD_DEBUG_LEVEL"):
        RunPodLogger().set_level("INFO")


def parse_test_job(text: str, source: str) -> dict[str, Any]:
    try:
        job = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TestInputError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(job, dict) or "input" not in job:
        raise TestInputError(f'{source} must be a JSON object with an "input" key')
    job.setdefault("id", "local_test")
    return job


async def run_local_job(config: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """Run `job` through the configured handler; returns `{"output": ...}` or `{"error": ...}`."""
    handler = config["handler"]
    if not is_generator(handler):
        return await rp_job.run_job(handler, job)
    chunks: list[Any] = []
    async for part in rp_job.run_job_generator(handler, job):
        output = part.get("output")
        if isinstance(output, dict) and output.get("error"):
            return {"error": str(output["error"])}
        if part.get("error"):
            return {"error": part["error"]}
        chunks.append(output)
    return {"output": chunks}


def render_result(result: dict[str, Any]) -> str:
    return json.dumps(result, default=repr)
