"""The HandlerDeployment CRD, generated from the pydantic models in `models.py`.

Pure: builds the CRD as a dict (`build_crd`) and renders YAML (`render_crd`). The pydantic JSON
schema is turned into a Kubernetes structural schema: references inlined, titles dropped,
optionals unwrapped, free-form Kubernetes objects kept with x-kubernetes-preserve-unknown-fields.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from handler_operator import models

CRD_NAME = f"{models.PLURAL}.{models.GROUP}"
PRINTER_COLUMNS = [
    {"name": "Module", "type": "string", "jsonPath": ".spec.handler.module"},
    {"name": "GPU", "type": "string", "jsonPath": ".status.gpu"},
    {"name": "Ready", "type": "string", "jsonPath": ".status.ready"},
    {"name": "Desired", "type": "integer", "jsonPath": ".status.desiredReplicas"},
    {"name": "Queue", "type": "integer", "jsonPath": ".status.queue.inQueue"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


_OPTIONAL = "x-handlerops-optional"


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_resolve(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
        extra = {k: v for k, v in node.items() if k != "$ref"}
        return _resolve({**target, **extra}, defs)
    return {key: _resolve(value, defs) for key, value in node.items()}


def _structural(node: Any) -> Any:
    """Rewrite a resolved pydantic schema node into a Kubernetes structural schema node."""
    if isinstance(node, list):
        return [_structural(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    node.pop("title", None)
    options = node.pop("anyOf", None)
    if options is not None:
        kept = [option for option in options if option.get("type") != "null"]
        if len(kept) != 1:
            raise ValueError(f"cannot express anyOf {options} in a structural schema")
        merged = {**kept[0], **node}
        if merged.get("default", "x") is None:
            merged.pop("default")
        converted = _structural(merged)
        converted[_OPTIONAL] = True  # absent means "none": no {} default for it
        return converted
    if node.get("type") == "object" and node.get("additionalProperties") is True:
        node.pop("additionalProperties")
        node["x-kubernetes-preserve-unknown-fields"] = True
    if "properties" in node and node.get("additionalProperties") is False:
        # Kubernetes forbids properties + additionalProperties; unknown fields are rejected by
        # strict field validation (kubectl's default) or pruned.
        node.pop("additionalProperties")
    properties = node.get("properties")
    if properties is not None:
        node["properties"] = {name: _structural(value) for name, value in properties.items()}
        required = set(node.get("required", []))
        for name, value in node["properties"].items():
            # Nested objects with defaults of their own default to {} so the API server fills
            # them in; optional ones (None when absent) stay absent.
            optional = value.pop(_OPTIONAL, False)
            if name not in required and value.get("properties") and "default" not in value:
                if not optional:
                    value["default"] = {}
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            node[key] = _structural(node[key])
    return node


def _drop_markers(node: Any) -> Any:
    if isinstance(node, list):
        return [_drop_markers(item) for item in node]
    if isinstance(node, dict):
        return {k: _drop_markers(v) for k, v in node.items() if k != _OPTIONAL}
    return node


def model_schema(model: type) -> dict[str, Any]:
    schema = model.model_json_schema(mode="validation")
    defs = schema.pop("$defs", {})
    return _drop_markers(_structural(_resolve(schema, defs)))


def build_crd() -> dict[str, Any]:
    spec = model_schema(models.HandlerDeploymentSpec)
    status = model_schema(models.HandlerDeploymentStatus)
    status["x-kubernetes-preserve-unknown-fields"] = True
    status.pop("additionalProperties", None)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "handler-operator"},
        },
        "spec": {
            "group": models.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": models.KIND,
                "listKind": f"{models.KIND}List",
                "plural": models.PLURAL,
                "singular": models.KIND.lower(),
                "shortNames": [models.SHORT_NAME],
                "categories": [models.CATEGORY],
            },
            "versions": [
                {
                    "name": models.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A RunPod-style handler served by autoscaled GPU workers.",
                            "required": ["spec"],
                            "x-kubernetes-validations": [
                                {"rule": models.NAME_RULE, "message": models.NAME_MESSAGE}
                            ],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": status,
                            },
                        }
                    },
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.scaling.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                }
            ],
        },
    }


def render_crd() -> str:
    header = (
        "# Generated from operator/handler_operator/models.py by `handlerctl crd`"
        " (python -m handler_operator.crds). Do not edit.\n"
    )
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=100)


if __name__ == "__main__":
    print(render_crd(), end="")
