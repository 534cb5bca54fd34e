"""Chart test helpers: `helm template` with values, rendered documents by kind and name."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.tools import tool

CHART = REPO_ROOT / "charts" / "handler-operator"
RELEASE, NAMESPACE = "handler-operator", "hop"

# Value sets the acceptance checks name: defaults, namespaced, external Redis, all optionals on.
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "watch-namespaces": ["watchNamespaces={ml,team-b}"],
    "external-redis": [
        "redis.enabled=false",
        "redis.external.url=rediss://redis.example.com:6380/2",
        "redis.external.existingSecret=managed-redis",
    ],
    "sentinel-redis": [
        "redis.enabled=false",
        # `--set` splits on commas: escaped (a values file needs no escape)
        r"redis.external.url=redis+sentinel://s-0.s:26379\,s-1.s:26379\,s-2.s:26379/jobs/1",
        "redis.external.existingSecret=managed-redis",
    ],
    "memory-single-gateway": ["redis.enabled=false", "gateway.replicas=1"],
    "everything": [
        "watchNamespaces={ml}",
        "crds.templated=true",
        "metrics.serviceMonitor.enabled=true",
        "metrics.serviceMonitor.labels.release=prometheus",
        "networkPolicy.enabled=true",
        "networkPolicy.workerNamespaces={ml,batch}",
        "redis.persistence.storageClass=fast",
        "gateway.auth.existingSecret=gateway-keys",
        "gateway.service.type=LoadBalancer",
        "gateway.ingress.enabled=true",
        "gateway.ingress.host=gpu.example.com",
        "gateway.ingress.tlsSecret=gpu-tls",
        "gateway.ingress.className=nginx",
        "imagePullSecrets[0].name=registry",
        "operator.extraEnv[0].name=EXTRA",
        "operator.extraEnv[0].value=verbose",
    ],
}


def helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool("helm"), *args], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
    )


@dataclass
class Rendered:
    docs: list[dict[str, Any]]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        for doc in self.of(kind):
            meta = doc["metadata"]
            if meta["name"] == name and (namespace is None or meta.get("namespace") == namespace):
                return doc
        raise KeyError(f"no {kind} {name} in {[d['metadata']['name'] for d in self.of(kind)]}")

    def container(self, deployment: str) -> dict[str, Any]:
        return self.get("Deployment", deployment)["spec"]["template"]["spec"]["containers"][0]


def template_args(sets: list[str], *extra: str) -> list[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, *extra]
    for value in sets:
        args += ["--set", value]
    return args


def render(sets: list[str] | None = None, *extra: str) -> Rendered:
    result = helm(*template_args(sets or [], *extra))
    assert result.returncode == 0, result.stderr
    return Rendered([d for d in yaml.safe_load_all(result.stdout) if d])


def render_error(sets: list[str]) -> str:
    result = helm(*template_args(sets))
    assert result.returncode != 0, f"helm template accepted {sets}"
    return result.stderr


@pytest.fixture(scope="session", params=sorted(VARIANTS))
def variant(request) -> tuple[str, Rendered]:
    return request.param, render(VARIANTS[request.param], "--include-crds")
