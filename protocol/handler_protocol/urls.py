"""The worker-side URL contract: the RUNPOD_WEBHOOK_* environment a worker of an endpoint gets.

Pure: the operator's pod builder, `handlerctl dev` and the tests all build worker env from here.
"""

from __future__ import annotations


def worker_webhook_env(gateway_url: str, endpoint: str) -> dict[str, str]:
    """RUNPOD_WEBHOOK_* for `endpoint` (the SDK substitutes $ID and $RUNPOD_POD_ID itself).

    Every template but PING ends in `?` because the SDK appends its query with `&`.
    """
    base = f"{gateway_url.rstrip('/')}/v2/{endpoint}"
    return {
        "RUNPOD_WEBHOOK_GET_JOB": base + "/job-take/$ID?",
        "RUNPOD_WEBHOOK_POST_OUTPUT": base + "/job-done/$RUNPOD_POD_ID/$ID?",
        "RUNPOD_WEBHOOK_POST_STREAM": base + "/job-stream/$RUNPOD_POD_ID/$ID?",
        "RUNPOD_WEBHOOK_PING": base + "/ping/$RUNPOD_POD_ID",
    }
