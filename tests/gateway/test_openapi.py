"""The OpenAPI document and the routes served agree: every route the app serves is documented
with its method, and every documented operation is served (no drift either way)."""

from __future__ import annotations

from openapi_spec_validator import validate

from handler_gateway.backends import open_backend
from handler_gateway.keys import Keys
from handler_gateway.routes import create_app, document

DOCUMENTED_PREFIXES = ("/v2/", "/admin/v1/")


def served_operations() -> set[tuple[str, str]]:
    app = create_app(open_backend("memory://"), Keys.of(admin=["admin-key"]), run_sweeper=False)
    found = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if path.startswith(DOCUMENTED_PREFIXES) and route.method != "HEAD":
            found.add((route.method.lower(), path))
    return found


def documented_operations() -> set[tuple[str, str]]:
    return {(method, path) for path, methods in document()["paths"].items() for method in methods}


def test_every_served_route_is_documented_and_every_documented_one_served():
    served, documented = served_operations(), documented_operations()
    assert served - documented == set(), "served, not documented"
    assert documented - served == set(), "documented, not served"
    assert len(served) > 30


def test_the_document_is_valid_openapi_with_a_summary_per_operation():
    spec = document()
    validate(spec)
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            assert operation["summary"], (method, path)
            assert operation["security"], (method, path)
