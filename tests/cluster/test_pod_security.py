"""Every pod we create, checked by the apiserver's own Pod Security admission (`restricted`,
enforced): each pod template of `helm template` in every values variant and every example's
worker Deployment (GPU `examples/sdxl` included), created as a Pod with a server-side dry run in
a namespace that enforces the profile. A root pod is refused there, so the check bites."""

from __future__ import annotations

import copy
import json

import pytest

from handler_operator import builders
from handler_operator.settings import OperatorSettings
from tests.chart.conftest import VARIANTS, render
from tests.cluster.conftest import RESTRICTED, Kubectl, make_namespace
from tests.conftest import EXAMPLES
from tests.operator.conftest import load_cr, parse_cr

WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
EXAMPLE_CRS = sorted(EXAMPLES.glob("*/handlerdeployment.yaml"))
ACCOUNT = "pods"


def pod_templates(docs: list[dict]) -> dict[str, dict]:
    """Pod specs as their controllers create them (a StatefulSet adds its claims as volumes)."""
    templates = {}
    for doc in docs:
        if doc["kind"] in WORKLOADS:
            spec = copy.deepcopy(doc["spec"]["template"]["spec"])
            for claim in doc["spec"].get("volumeClaimTemplates", []):
                name = claim["metadata"]["name"]
                volume = {"name": name, "persistentVolumeClaim": {"claimName": name}}
                spec.setdefault("volumes", []).append(volume)
            templates[f"{doc['kind']}/{doc['metadata']['name']}"] = spec
    return templates


@pytest.fixture(scope="module")
def restricted_namespace(control_plane):
    kubectl = Kubectl(control_plane.kubeconfig)
    namespace = make_namespace(kubectl, RESTRICTED)
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": ACCOUNT}}
    kubectl.apply(account, namespace)
    # What the sdxl example names must exist, or other admission plugins refuse the pod first.
    kubectl.apply(
        {
            "apiVersion": "node.k8s.io/v1",
            "kind": "RuntimeClass",
            "metadata": {"name": "nvidia"},
            "handler": "nvidia",
        }
    )
    return namespace


def dry_run_pod(kubectl, namespace: str, name: str, spec: dict):
    """Create `spec` as a Pod, server-side dry run: every admission plugin runs, nothing stays."""
    spec = copy.deepcopy(spec)
    spec["serviceAccountName"] = ACCOUNT  # ServiceAccount admission wants it to exist
    spec.pop("priorityClassName", None)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name.lower().replace("/", "-")[:63], "namespace": namespace},
        "spec": spec,
    }
    return kubectl.run("create", "--dry-run=server", "-f", "-", stdin=json.dumps(pod))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_chart_pods_pass_the_restricted_profile(kubectl, restricted_namespace, variant):
    templates = pod_templates(render(VARIANTS[variant]).docs)
    assert any(name.startswith("Deployment/") for name in templates)
    for name, spec in templates.items():
        done = dry_run_pod(kubectl, restricted_namespace, name, spec)
        assert done.returncode == 0, f"{variant} {name}: {done.stderr}"
        assert "PodSecurity" not in done.stderr, done.stderr


@pytest.mark.parametrize("path", EXAMPLE_CRS, ids=lambda p: p.parent.name)
def test_worker_pods_pass_the_restricted_profile(kubectl, restricted_namespace, path):
    hd = parse_cr(load_cr(path), "ml")
    deployment = builders.build_deployment(hd, OperatorSettings(), replicas=1)
    spec = deployment["spec"]["template"]["spec"]
    spec.pop("readinessGates")  # no operator here to set the heartbeat condition
    done = dry_run_pod(kubectl, restricted_namespace, f"worker-{hd.name}", spec)
    assert done.returncode == 0, done.stderr


def test_a_root_worker_is_refused(kubectl, restricted_namespace):
    hd = parse_cr(load_cr(EXAMPLES / "hello" / "handlerdeployment.yaml"), "ml")
    hd.spec.podSecurityContext = {"runAsUser": 0}
    spec = builders.build_deployment(hd, OperatorSettings(), replicas=1)["spec"]["template"]
    done = dry_run_pod(kubectl, restricted_namespace, "root-worker", spec["spec"])
    assert done.returncode != 0
    assert 'violates PodSecurity "restricted:latest"' in done.stderr
