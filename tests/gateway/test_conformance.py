"""Schemathesis against a live gateway process: every operation of its /openapi.json with
generated requests (a bounded number per operation) and each audience's credentials; no 5xx, no
answer outside the document, no schema-valid request refused."""

from __future__ import annotations

import uuid

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from handler_gateway.routes import document
from tests.gateway.conftest import clean_redis_prefix, redis_url
from tests.processes import ADMIN_KEY, CLIENT_KEY, GatewayProcess, http_json

TOKEN = "conformance-worker-token-0123"
EXAMPLES = 25


@pytest.fixture(scope="module", params=["memory", "redis"])
def gateway(request, tmp_path_factory):
    prefix = f"conformance-{uuid.uuid4().hex[:8]}"
    process = GatewayProcess(
        "memory://" if request.param == "memory" else redis_url(),
        tmp_path_factory.mktemp("conformance"),
        extra_args=(
            *("--take-hold-seconds", "0.1", "--runsync-wait-seconds", "0.1"),
            *("--redis-prefix", prefix),
        ),
    ).start()
    process.register("ep", TOKEN)
    yield process
    process.stop()
    if request.param == "redis":
        clean_redis_prefix(prefix)


# The document the gateway serves at /openapi.json (a test checks they are the same).
schema = schemathesis.openapi.from_dict(document())


def credentials(path: str) -> str:
    if path.startswith("/admin/"):
        return ADMIN_KEY
    worker_routes = (
        "job-take",
        "job-stop",
        "job-done",
        "job-stream",
        "ping",
        "leave",
        "job-channel",
    )
    return TOKEN if path.split("/")[3] in worker_routes else CLIENT_KEY


@schema.auth()
class AudienceKeys:
    """Each route's audience's credentials (schemathesis also sends none and wrong ones)."""

    def get(self, case, context):
        return credentials(case.path)

    def set(self, case, data, context):
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


@pytest.mark.slow
@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_the_gateway_keeps_to_its_openapi_document(case, gateway):
    case.call_and_validate(base_url=gateway.url)


def test_the_document_tested_is_the_one_served(gateway):
    assert http_json("GET", f"{gateway.url}/openapi.json")[1] == document()
