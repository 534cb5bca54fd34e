"""The CRD and the examples on the real kube-apiserver: CEL rules compiled by the apiserver, bad
specs rejected with its own messages, `kubectl get hd` columns and `kubectl explain`."""

from __future__ import annotations

import copy

import pytest
import yaml

from tests.cluster.conftest import make_namespace
from tests.conftest import EXAMPLES, REPO_ROOT
from tests.operator.test_crd import BAD_SPECS, CEL_CASES

EXAMPLE_CRS = sorted(EXAMPLES.glob("*/handlerdeployment.yaml"))


def test_the_crd_is_accepted_and_established(control_plane, kubectl):
    # Client-side apply, as the README says; the apiserver compiles every CEL rule here.
    result = kubectl.run("apply", "-f", str(REPO_ROOT / "crds"))
    assert result.returncode == 0, result.stderr
    kubectl("wait", "--for=condition=Established", "crd/handlerdeployments.handlerops.dev")
    crd = kubectl.get("crd", "handlerdeployments.handlerops.dev")
    accepted = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert accepted == {"NamesAccepted": "True", "Established": "True"}


@pytest.mark.parametrize("path", EXAMPLE_CRS, ids=lambda p: p.parent.name)
def test_every_example_applies(crd_installed, kubectl, path):
    assert crd_installed
    body = yaml.safe_load(path.read_text())
    namespace = body["metadata"].get("namespace")
    if namespace:
        kubectl.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    else:
        namespace = make_namespace(kubectl)
    out = kubectl("apply", "-n", namespace, "-f", str(path))
    assert "created" in out or "configured" in out or "unchanged" in out
    stored = kubectl.get("hd", body["metadata"]["name"], namespace)
    # The apiserver filled in the schema's defaults.
    assert stored["spec"]["scaling"]["engine"] == body["spec"].get("scaling", {}).get(
        "engine", "builtin"
    )
    assert stored["spec"]["jobs"]["concurrency"] >= 1


def test_the_gitops_kustomization_applies(crd_installed, kubectl):
    assert crd_installed
    out = kubectl("apply", "-k", str(EXAMPLES / "gitops"))
    assert "handlerdeployment.handlerops.dev/hello" in out
    again = kubectl("apply", "-k", str(EXAMPLES / "gitops"))
    assert "handlerdeployment.handlerops.dev/hello unchanged" in again


def sdxl(mutate) -> dict:
    body = copy.deepcopy(yaml.safe_load((EXAMPLES / "sdxl" / "handlerdeployment.yaml").read_text()))
    body["metadata"].pop("namespace", None)
    mutate(body["spec"])
    return body


# What the apiserver names in its message for each bad spec (the emulator tests name the same).
APISERVER_MESSAGES = {
    "module not dotted": "spec.handler.module: Invalid value",
    "missing module": "spec.handler.module: Required value",
    "negative gpu count": "spec.resources.gpu.count: Invalid value: -1",
    "unknown vendor": 'spec.resources.gpu.vendor: Unsupported value: "intel"',
    "bad engine": 'spec.scaling.engine: Unsupported value: "hpa"',
    "zero target": "spec.scaling.targetQueuePerWorker: Invalid value: 0",
    "timeout too long": "spec.jobs.executionTimeoutSeconds: Invalid value",
    "unknown field": 'unknown field "spec.gpus"',
    "concurrency zero": "spec.jobs.concurrency: Invalid value: 0",
    "image with a space": "spec.image: Invalid value",
    "uppercase image path": "spec.image: Invalid value",
    "shm size not a quantity": "spec.sharedMemory.sizeLimit: Invalid value",
    "unknown rollout strategy": 'spec.rollout.strategy: Unsupported value: "BlueGreen"',
    "product and products": "set resources.gpu.product or resources.gpu.products, not both",
    "rollout with no room": "rollout.maxSurge and rollout.maxUnavailable cannot both be 0",
    "recreate with a surge": "rollout.maxSurge and rollout.maxUnavailable apply to RollingUpdate only",
    "max below min": "maxReplicas must be greater than or equal to minReplicas",
    "reserved env": "env names starting with RUNPOD_ or HANDLER_ are set by the operator",
    "scale-down rate below 1": "maxScaleDownRate must be 0 (no limit) or at least 1",
    "scale-up rate below 1": "maxScaleUpRate must be 0 (no limit) or at least 1",
    "env without a name": "spec.env[2].name: Required value",
    "env name with a space": "spec.env[2].name: Invalid value",
}
CASES = {
    **BAD_SPECS,
    **CEL_CASES,
    "env without a name": (lambda s: s["env"].append({"value": "x"}), "spec.env"),
    "env name with a space": (lambda s: s["env"].append({"name": "A B", "value": "x"}), "spec.env"),
}


def test_every_case_has_an_expected_message():
    assert set(CASES) == set(APISERVER_MESSAGES)


@pytest.fixture(scope="module")
def bad_spec_namespace(crd_installed, control_plane):
    from tests.cluster.conftest import Kubectl

    assert crd_installed
    return make_namespace(Kubectl(control_plane.kubeconfig))


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_specs_are_rejected_by_the_apiserver(bad_spec_namespace, kubectl, case):
    mutate, _ = CASES[case]
    body = sdxl(mutate)
    body["spec"].setdefault("env", [])
    result = kubectl.run("apply", "-n", bad_spec_namespace, "-f", "-", stdin=yaml.safe_dump(body))
    assert result.returncode != 0, f"{case}: accepted:\n{result.stdout}"
    assert APISERVER_MESSAGES[case] in result.stderr, result.stderr
    assert kubectl.maybe("hd", body["metadata"]["name"], bad_spec_namespace) is None


def test_kubectl_get_hd_shows_the_printer_columns(bad_spec_namespace, kubectl):
    body = sdxl(lambda s: None)
    kubectl("apply", "-n", bad_spec_namespace, "-f", "-", stdin=yaml.safe_dump(body))
    header = kubectl("get", "hd", "-n", bad_spec_namespace).splitlines()[0].split()
    assert header == ["NAME", "MODULE", "GPU", "READY", "DESIRED", "QUEUE", "AGE"]
    assert "handlers.sdxl" in kubectl("get", "handlerops", "-n", bad_spec_namespace)
    explained = kubectl("explain", "hd.spec.scaling.targetQueuePerWorker")
    assert "queued+in-progress" in explained.replace(" ", "") or "FIELD" in explained
    kubectl("delete", "hd", body["metadata"]["name"], "-n", bad_spec_namespace)


@pytest.mark.parametrize(("length", "accepted"), [(63, True), (64, False)])
def test_names_longer_than_a_label_value_are_rejected_at_apply(
    bad_spec_namespace, kubectl, length, accepted
):
    body = sdxl(lambda s: None)
    body["metadata"]["name"] = "h" * length
    result = kubectl.run("apply", "-n", bad_spec_namespace, "-f", "-", stdin=yaml.safe_dump(body))
    assert (result.returncode == 0) is accepted, result.stderr
    if not accepted:
        assert "metadata.name must be at most 63 characters" in result.stderr, result.stderr
    else:
        kubectl("delete", "hd", "h" * length, "-n", bad_spec_namespace)
