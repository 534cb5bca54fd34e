"""Every CEL rule in `crds/*.yaml`, compiled and type-checked the way kube-apiserver does, fast.

The apiserver derives CEL types from the structural schema: an object with `properties` is a
type with exactly those fields, `additionalProperties` a map, a list a list, an object that only
preserves unknown fields has no field to select, int-or-string is dyn; it also refuses rules whose cost is unbounded
(a list or string the rule walks without `maxItems`/`maxLength`). Here the schema becomes
protobuf messages for Google's CEL (`cel-expr-python`), so an undeclared field fails to compile
just as it does on the apiserver; the cost bound is checked on what each rule names. A rule added
later is covered without touching this file. (The cluster tier applies the same CRD to a real
apiserver.)
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from cel_expr_python import cel
from google.protobuf import descriptor_pb2, descriptor_pool, struct_pb2

from tests.conftest import REPO_ROOT

Field = descriptor_pb2.FieldDescriptorProto
SCALARS = {
    "string": (Field.TYPE_STRING, cel.Type.STRING),
    "integer": (Field.TYPE_INT64, cel.Type.INT),
    "number": (Field.TYPE_DOUBLE, cel.Type.DOUBLE),
    "boolean": (Field.TYPE_BOOL, cel.Type.BOOL),
}
DYN_MESSAGE = ".google.protobuf.Value"


class SchemaTypes:
    """CEL types of every node of a structural schema, as protobuf messages in one pool."""

    def __init__(self) -> None:
        self.file = descriptor_pb2.FileDescriptorProto(
            name="crd.proto",
            package="crd",
            syntax="proto3",
            dependency=["google/protobuf/struct.proto"],
        )
        self.types: dict[str, cel.Type] = {}  # schema path -> CEL type of `self` there
        self.names: set[str] = set()

    def _message_name(self, path: str) -> str:
        base = re.sub(r"[^A-Za-z0-9]+", "_", path).strip("_").title().replace("_", "") or "Root"
        name, n = base, 1
        while name in self.names:
            n += 1
            name = f"{base}{n}"
        self.names.add(name)
        return name

    def node(self, schema: dict[str, Any], path: str) -> cel.Type:
        """The CEL type of `schema` at `path` (and of everything below it)."""
        kind = schema.get("type")
        if schema.get("x-kubernetes-int-or-string"):
            result = cel.Type.DYN
        elif kind in SCALARS:
            result = SCALARS[kind][1]
        elif kind == "array":
            result = cel.Type.List(self.node(schema["items"], path + "[*]"))
        elif kind == "object" and isinstance(schema.get("additionalProperties"), dict):
            result = cel.Type.Map(
                cel.Type.STRING, self.node(schema["additionalProperties"], path + "{*}")
            )
        elif kind == "object":
            # Declared properties only; preserve-unknown-fields with none: nothing to select.
            result = cel.Type(f"crd.{self.message(schema, path)}")
        else:
            result = cel.Type.DYN
        self.types[path] = result
        return result

    def message(self, schema: dict[str, Any], path: str) -> str:
        name = self._message_name(path)
        message = self.file.message_type.add(name=name)
        for number, (prop, sub) in enumerate(sorted((schema.get("properties") or {}).items()), 1):
            self._field(message, name, prop, sub, number, f"{path}.{prop}")
        return name

    def _field(self, message, owner: str, prop: str, schema: dict, number: int, path: str) -> None:
        field = message.field.add(name=prop, number=number, label=Field.LABEL_OPTIONAL)
        self.node(schema, path)
        element = schema
        if schema.get("type") == "array":
            field.label = Field.LABEL_REPEATED
            element = schema["items"]
        if element.get("type") == "object" and isinstance(
            element.get("additionalProperties"), dict
        ):
            entry = message.nested_type.add(name=f"{prop[0].upper()}{prop[1:]}Entry")
            entry.options.map_entry = True
            entry.field.add(
                name="key", number=1, label=Field.LABEL_OPTIONAL, type=Field.TYPE_STRING
            )
            value = entry.field.add(name="value", number=2, label=Field.LABEL_OPTIONAL)
            self._typed(value, element["additionalProperties"], path + "{*}")
            field.label, field.type = Field.LABEL_REPEATED, Field.TYPE_MESSAGE
            field.type_name = f".crd.{owner}.{entry.name}"
            return
        self._typed(field, element, path + ("[*]" if element is not schema else ""))

    def _typed(self, field, schema: dict, path: str) -> None:
        kind = schema.get("type")
        if kind in SCALARS and not schema.get("x-kubernetes-int-or-string"):
            field.type = SCALARS[kind][0]
        elif kind == "object" and not isinstance(schema.get("additionalProperties"), dict):
            field.type, field.type_name = Field.TYPE_MESSAGE, f".crd.{self.message(schema, path)}"
        else:
            field.type, field.type_name = Field.TYPE_MESSAGE, DYN_MESSAGE

    def pool(self) -> descriptor_pool.DescriptorPool:
        pool = descriptor_pool.DescriptorPool()
        struct = descriptor_pb2.FileDescriptorProto()
        struct_pb2.DESCRIPTOR.CopyToProto(struct)
        pool.Add(struct)
        pool.Add(self.file)
        return pool


def root_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """What a root rule sees: the object with only metadata.name and generateName declared."""
    schema = copy.deepcopy(schema)
    # The apiserver knows both: names are DNS subdomains, at most 253 characters.
    metadata = {
        "name": {"type": "string", "maxLength": 253},
        "generateName": {"type": "string", "maxLength": 253},
    }
    schema.setdefault("properties", {})["metadata"] = {"type": "object", "properties": metadata}
    return schema


def rules(schema: dict[str, Any], path: str = "$"):
    """(path, node, rule) for every x-kubernetes-validations rule in the schema."""
    for rule in schema.get("x-kubernetes-validations") or []:
        yield path, schema, rule
    for prop, sub in (schema.get("properties") or {}).items():
        yield from rules(sub, f"{path}.{prop}")
    if isinstance(schema.get("items"), dict):
        yield from rules(schema["items"], path + "[*]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from rules(schema["additionalProperties"], path + "{*}")


CALLS = r"(all|exists|exists_one|map|filter|size|startsWith|endsWith|contains|matches)"


def unbounded(node: dict[str, Any], rule: str) -> list[str]:
    """Lists and strings the rule walks (iterates, measures, searches) that have no bound."""
    problems = []

    def check(where: str, schema: dict) -> None:
        if schema.get("type") == "array" and "maxItems" not in schema:
            problems.append(f"{where}: list without maxItems")
        if schema.get("type") == "string" and "maxLength" not in schema and "enum" not in schema:
            problems.append(f"{where}: string without maxLength")

    def walk(schema: dict, where: str) -> None:
        for prop, sub in (schema.get("properties") or {}).items():
            if re.search(rf"\.{prop}\s*\.\s*{CALLS}\s*\(", rule):
                check(f"{where}.{prop}", sub)
            walk(sub, f"{where}.{prop}")
        if isinstance(schema.get("items"), dict):
            walk(schema["items"], where + "[*]")

    if re.search(rf"\bself\s*\.\s*{CALLS}\s*\(", rule):
        check("self", node)
    walk(node, "self")
    return problems


def compile_errors(schema: dict[str, Any]) -> list[str]:
    """Every rule of `schema` (an openAPIV3Schema) that the apiserver's checks would refuse."""
    schema = root_schema(schema)
    types = SchemaTypes()
    types.node(schema, "$")
    pool = types.pool()
    errors = []
    for path, node, rule in rules(schema):
        variables = {"self": types.types[path], "oldSelf": types.types[path]}
        env = cel.NewEnv(descriptor_pool=pool, variables=variables)
        try:
            compiled = env.compile(rule["rule"])
        except Exception as exc:  # the checker's message, as the apiserver reports it
            errors.append(f"{path}: {rule['rule']}: {exc}")
            continue
        if str(compiled.return_type()) != "BOOL" and "messageExpression" not in rule:
            errors.append(f"{path}: {rule['rule']}: returns {compiled.return_type()}, not bool")
        errors += [f"{path}: {rule['rule']}: {p}" for p in unbounded(node, rule["rule"])]
    return errors


CRD_FILES = sorted((REPO_ROOT / "crds").glob("*.yaml"))


def versions(path: Path):
    crd = yaml.safe_load(path.read_text())
    for version in crd["spec"]["versions"]:
        yield version["name"], version["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("path", CRD_FILES, ids=lambda p: p.name)
def test_every_rule_compiles_against_the_schema_types(path):
    checked = 0
    for _, schema in versions(path):
        assert compile_errors(schema) == []
        checked += len(list(rules(root_schema(schema))))
    assert checked >= 1


ENV_ITEMS_WITHOUT_FIELDS = {
    "type": "object",
    "properties": {
        "env": {
            "type": "array",
            "maxItems": 10,
            "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "x-kubernetes-validations": [{"rule": "self.all(e, !e.name.startsWith('X'))"}],
        }
    },
}


@pytest.mark.parametrize(
    ("case", "mutate", "expected"),
    [
        ("undeclared field (the env rule as it was)", lambda s: None, "undefined field 'name'"),
        (
            "unbounded list",
            lambda s: (
                s["properties"]["env"].pop("maxItems"),
                s["properties"]["env"]["items"].update(
                    properties={"name": {"type": "string", "maxLength": 5}}
                ),
            ),
            "list without maxItems",
        ),
        (
            "unbounded string",
            lambda s: s["properties"]["env"]["items"].update(
                properties={"name": {"type": "string"}}
            ),
            "string without maxLength",
        ),
        (
            "not a bool",
            lambda s: (
                s["properties"]["env"]["items"].update(
                    properties={"name": {"type": "string", "maxLength": 5}}
                ),
                s["properties"]["env"].update(
                    {"x-kubernetes-validations": [{"rule": "self.size()"}]}
                ),
            ),
            "not bool",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_the_checker_refuses_what_the_apiserver_refuses(case, mutate, expected):
    schema = copy.deepcopy(ENV_ITEMS_WITHOUT_FIELDS)
    mutate(schema)
    errors = compile_errors(schema)
    assert any(expected in e for e in errors), (case, errors)


def test_a_declared_bounded_field_passes():
    schema = copy.deepcopy(ENV_ITEMS_WITHOUT_FIELDS)
    schema["properties"]["env"]["items"]["properties"] = {
        "name": {"type": "string", "maxLength": 256}
    }
    assert compile_errors(schema) == []
