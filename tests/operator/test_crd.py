"""The generated CRD: up to date, structural, and accepting/rejecting specs with field paths."""

from __future__ import annotations

import copy

import jsonschema
import pytest
import yaml

from handler_operator import crds
from tests.conftest import REPO_ROOT
from tests.operator.conftest import EXAMPLE_CRS, load_cr, parse_cr

CRD_FILE = REPO_ROOT / "crds" / "handlerdeployments.yaml"


def spec_schema() -> dict:
    return crds.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_committed_crd_is_up_to_date():
    assert CRD_FILE.read_text() == crds.render_crd(), (
        "crds/handlerdeployments.yaml is stale: run `python -m handler_operator.crds > "
        "crds/handlerdeployments.yaml`"
    )


def walk(node, path="$"):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk(value, f"{path}[{index}]")


def test_schema_is_structural():
    for path, node in walk(spec_schema()):
        assert "$ref" not in node and "anyOf" not in node and "title" not in node, path
        if "properties" in node:
            assert "additionalProperties" not in node, f"{path}: properties + additionalProperties"
            assert node.get("type") == "object", path


def test_crd_names_columns_and_subresources():
    crd = crds.build_crd()
    names = crd["spec"]["names"]
    assert names["shortNames"] == ["hd"] and names["categories"] == ["handlerops"]
    version = crd["spec"]["versions"][0]
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Module",
        "GPU",
        "Ready",
        "Desired",
        "Queue",
        "Age",
    ]
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.scaling.replicas"
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert status["x-kubernetes-preserve-unknown-fields"] is True


def test_crd_validates_as_a_kubernetes_object():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(crds.build_crd(), "1.33", strict=True)


@pytest.mark.parametrize("path", EXAMPLE_CRS, ids=lambda p: p.parent.name)
def test_examples_validate_against_the_schema_and_models(path):
    body = load_cr(path)
    jsonschema.validate(body, spec_schema())
    parse_cr(body)


def bad(mutate):
    body = load_cr(REPO_ROOT / "examples" / "sdxl" / "handlerdeployment.yaml")
    body = copy.deepcopy(body)
    mutate(body["spec"])
    return body


BAD_SPECS = {
    "module not dotted": (
        lambda s: s["handler"].update(module="my-handler"),
        "spec.handler.module",
    ),
    "missing module": (lambda s: s["handler"].pop("module"), "spec.handler"),
    "negative gpu count": (
        lambda s: s["resources"]["gpu"].update(count=-1),
        "spec.resources.gpu.count",
    ),
    "unknown vendor": (
        lambda s: s["resources"]["gpu"].update(vendor="intel"),
        "spec.resources.gpu.vendor",
    ),
    "bad engine": (lambda s: s["scaling"].update(engine="hpa"), "spec.scaling.engine"),
    "zero target": (
        lambda s: s["scaling"].update(targetQueuePerWorker=0),
        "spec.scaling.targetQueuePerWorker",
    ),
    "timeout too long": (
        lambda s: s["jobs"].update(executionTimeoutSeconds=10**9),
        "spec.jobs.executionTimeoutSeconds",
    ),
    "unknown field": (lambda s: s.update(gpus=2), "spec"),
    "concurrency zero": (lambda s: s["jobs"].update(concurrency=0), "spec.jobs.concurrency"),
    "image with a space": (lambda s: s.update(image="acme/sdxl worker:1"), "spec.image"),
    "uppercase image path": (lambda s: s.update(image="ghcr.io/Acme/SDXL:1"), "spec.image"),
    "shm size not a quantity": (
        lambda s: s.update(sharedMemory={"sizeLimit": "lots"}),
        "spec.sharedMemory.sizeLimit",
    ),
    "unknown rollout strategy": (
        lambda s: s.update(rollout={"strategy": "BlueGreen"}),
        "spec.rollout.strategy",
    ),
}


@pytest.mark.parametrize("case", BAD_SPECS, ids=list(BAD_SPECS))
def test_bad_specs_are_rejected_with_a_field_path(case):
    mutate, where = BAD_SPECS[case]
    body = bad(mutate)
    schema = copy.deepcopy(spec_schema())
    # The API server rejects unknown fields (strict field validation); jsonschema needs telling.
    for _, node in walk(schema):
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
    with pytest.raises(jsonschema.ValidationError) as error:
        jsonschema.validate(body, schema)
    path = "$." + ".".join(str(p) for p in error.value.absolute_path)
    assert path.replace("$.", "").startswith(where) or where == "spec", (path, error.value.message)
    with pytest.raises(ValueError):
        parse_cr(body)


CEL_CASES = {
    "max below min": (lambda s: s["scaling"].update(minReplicas=5, maxReplicas=2), "maxReplicas"),
    "reserved env": (
        lambda s: s["env"].append({"name": "RUNPOD_AI_API_KEY", "value": "x"}),
        "reserved",
    ),
    "scale-down rate below 1": (
        lambda s: s["scaling"].update(maxScaleDownRate=0.5),
        "maxScaleDownRate must be 0",
    ),
    "scale-up rate below 1": (
        lambda s: s["scaling"].update(maxScaleUpRate=0.2),
        "maxScaleUpRate must be 0",
    ),
    "product and products": (
        lambda s: s["resources"]["gpu"].update(products=["NVIDIA-H100-80GB-HBM3"]),
        "not both",
    ),
    "rollout with no room": (
        lambda s: s.update(rollout={"maxSurge": 0, "maxUnavailable": 0}),
        "cannot both be 0",
    ),
    "recreate with a surge": (
        lambda s: s.update(rollout={"strategy": "Recreate", "maxSurge": 1}),
        "apply to RollingUpdate only",
    ),
}


@pytest.mark.parametrize("case", CEL_CASES, ids=list(CEL_CASES))
def test_cel_rules_are_in_the_crd_and_enforced_by_the_models(case):
    mutate, message = CEL_CASES[case]
    rules = [
        node["x-kubernetes-validations"]
        for _, node in walk(spec_schema())
        if "x-kubernetes-validations" in node
    ]
    # the root (name length), spec.resources.gpu, spec.scaling, spec.env, spec.rollout
    assert len(rules) == 5
    with pytest.raises(ValueError, match=message):
        parse_cr(bad(mutate))


def test_crd_yaml_parses():
    assert yaml.safe_load(CRD_FILE.read_text())["kind"] == "CustomResourceDefinition"
