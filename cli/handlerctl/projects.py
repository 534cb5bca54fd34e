"""`handlerctl build`, the pure part: find @remote functions and classes in a project's sources
by reading their syntax tree (user code is never imported), group them into endpoints, and
generate the manifest, one handler module per endpoint and one HandlerDeployment per endpoint."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from typing import Any

import yaml

from handler_operator.models import HandlerDeployment
from handler_protocol.ids import endpoint_name
from handler_worker.endpoints import REMOTE_OPTIONS

REMOTE_MODULE = "handler_worker.remote"
PACKAGE = "handlerops_endpoints"  # generated handler modules: handlerops_endpoints.<endpoint>
MANIFEST = "handler_manifest.json"
OPTIONS = {name: types for name, (types, _) in REMOTE_OPTIONS.items()}
_RESOURCE_KEYS = ("gpu", "gpu_vendor", "gpu_product", "cpu", "memory", "min_workers", "max_workers")


@dataclass(frozen=True)
class Problem:
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclass(frozen=True)
class RemoteTarget:
    name: str  # function or class name, the registry key
    kind: str  # function | class
    module: str  # dotted module it lives in
    path: str
    line: int
    is_async: bool
    options: dict[str, Any]

    @property
    def endpoint(self) -> str:
        return endpoint_name(self.options.get("endpoint") or self.name)


@dataclass
class ScanResult:
    targets: list[RemoteTarget] = field(default_factory=list)
    errors: list[Problem] = field(default_factory=list)


def module_name(path: str) -> str:
    parts = path[: -len(".py")].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _remote_names(tree: ast.Module) -> tuple[set[str], set[str]]:
    """Names bound to the decorator, and names bound to its module, by this file's imports."""
    decorators, modules = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == REMOTE_MODULE:
            decorators |= {a.asname or a.name for a in node.names if a.name == "remote"}
        elif isinstance(node, ast.ImportFrom) and node.module == "handler_worker":
            modules |= {a.asname or a.name for a in node.names if a.name == "remote"}
        elif isinstance(node, ast.Import):
            modules |= {a.asname for a in node.names if a.name == REMOTE_MODULE and a.asname}
    return decorators, modules


def _is_remote(expr: ast.expr, decorators: set[str], modules: set[str]) -> bool:
    if isinstance(expr, ast.Call):
        expr = expr.func
    if isinstance(expr, ast.Name):
        return expr.id in decorators
    if isinstance(expr, ast.Attribute) and expr.attr == "remote":
        chain = ast.unparse(expr.value)
        return chain in modules or chain == REMOTE_MODULE
    return False


def _options(decorator: ast.expr, path: str) -> tuple[dict[str, Any], list[Problem]]:
    if not isinstance(decorator, ast.Call):
        return {}, []
    options: dict[str, Any] = {}
    problems = []
    line = decorator.lineno
    if len(decorator.args) > 1:
        problems.append(Problem(path, line, "@remote takes at most one positional argument"))
    arguments = [("endpoint", decorator.args[0])] if decorator.args else []
    arguments += [(k.arg, k.value) for k in decorator.keywords]
    for name, value in arguments:
        if name is None:
            problems.append(Problem(path, line, "@remote(**kwargs) is not supported: name each"))
            continue
        if name not in OPTIONS:
            problems.append(
                Problem(
                    path,
                    value.lineno,
                    f"unsupported @remote argument '{name}' "
                    f"(supported: {', '.join(sorted(OPTIONS))})",
                )
            )
            continue
        try:
            literal = ast.literal_eval(value)
        except ValueError:
            problems.append(
                Problem(
                    path,
                    value.lineno,
                    f"@remote argument '{name}' must be a literal, not `{ast.unparse(value)}`",
                )
            )
            continue
        if not isinstance(literal, OPTIONS[name]) or isinstance(literal, bool):
            problems.append(
                Problem(
                    path,
                    value.lineno,
                    f"@remote argument '{name}' has the wrong type ({type(literal).__name__})",
                )
            )
            continue
        if name == "dependencies" and not all(isinstance(d, str) for d in literal):
            problems.append(Problem(path, value.lineno, "dependencies must be strings"))
            continue
        options[name] = literal
    return options, problems


def scan(sources: dict[str, str]) -> ScanResult:
    """Find @remote targets in `sources` (relative path -> text), with errors as file:line."""
    result = ScanResult()
    for path in sorted(sources):
        try:
            tree = ast.parse(sources[path], filename=path)
        except SyntaxError as exc:
            result.errors.append(Problem(path, exc.lineno or 0, f"syntax error: {exc.msg}"))
            continue
        decorators, modules = _remote_names(tree)
        if not decorators and not modules:
            continue
        top_level = set(map(id, tree.body))
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue
            marks = [d for d in node.decorator_list if _is_remote(d, decorators, modules)]
            if not marks:
                continue
            if id(node) not in top_level:
                result.errors.append(
                    Problem(
                        path,
                        node.lineno,
                        f"@remote '{node.name}' must be defined at the "
                        "top level of its module (the generated handler imports it)",
                    )
                )
                continue
            options, problems = _options(marks[0], path)
            result.errors += problems
            if not problems:
                result.targets.append(
                    RemoteTarget(
                        name=node.name,
                        kind="class" if isinstance(node, ast.ClassDef) else "function",
                        module=module_name(path),
                        path=path,
                        line=node.lineno,
                        is_async=isinstance(node, ast.AsyncFunctionDef),
                        options=options,
                    )
                )
    result.errors += _conflicts(result.targets)
    return result


def _conflicts(targets: list[RemoteTarget]) -> list[Problem]:
    """Two targets of one endpoint with the same name, or with different resources."""
    problems = []
    seen: dict[tuple[str, str], RemoteTarget] = {}
    settled: dict[tuple[str, str], tuple[Any, RemoteTarget]] = {}
    for target in targets:
        key = (target.endpoint, target.name)
        if key in seen:
            first = seen[key]
            problems.append(
                Problem(
                    target.path,
                    target.line,
                    f"'{target.name}' is already served by "
                    f"endpoint '{target.endpoint}' ({first.path}:{first.line})",
                )
            )
        seen[key] = target
        for option in _RESOURCE_KEYS:
            if option not in target.options:
                continue
            value = target.options[option]
            previous = settled.setdefault((target.endpoint, option), (value, target))
            if previous[0] != value:
                other = previous[1]
                problems.append(
                    Problem(
                        target.path,
                        target.line,
                        f"endpoint '{target.endpoint}': {option}="
                        f"{value!r} here but {previous[0]!r} at {other.path}:{other.line}",
                    )
                )
    return problems


def handler_module(endpoint: str) -> str:
    return f"{PACKAGE}.{endpoint.replace('-', '_')}"


def _endpoint_settings(targets: list[RemoteTarget]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    dependencies: list[str] = []
    for target in targets:
        merged.update({k: v for k, v in target.options.items() if k in _RESOURCE_KEYS})
        dependencies += [d for d in target.options.get("dependencies", []) if d not in dependencies]
    resources: dict[str, Any] = {}
    if merged.get("gpu"):
        gpu = {"count": merged["gpu"], "vendor": merged.get("gpu_vendor", "nvidia")}
        if merged.get("gpu_product"):
            gpu["product"] = merged["gpu_product"]
        resources["gpu"] = gpu
    requests = {k: str(merged[k]) for k in ("cpu", "memory") if k in merged}
    if requests:
        resources["requests"] = requests
    scaling = {
        "minReplicas": merged.get("min_workers", 0),
        "maxReplicas": max(merged.get("max_workers", 1), merged.get("min_workers", 0)),
    }
    return {"resources": resources, "scaling": scaling, "dependencies": dependencies}


def build_manifest(result: ScanResult) -> dict[str, Any]:
    """`handler_manifest.json`: endpoints, the functions each serves, resources, dependencies."""
    endpoints: dict[str, Any] = {}
    for name in sorted({t.endpoint for t in result.targets}):
        targets = sorted((t for t in result.targets if t.endpoint == name), key=lambda t: t.name)
        endpoints[name] = {
            "handlerModule": handler_module(name),
            "functions": [
                {
                    "name": t.name,
                    "kind": t.kind,
                    "module": t.module,
                    "source": f"{t.path}:{t.line}",
                    "async": t.is_async,
                }
                for t in targets
            ],
            **_endpoint_settings(targets),
        }
    return {"version": 1, "endpoints": endpoints}


def build_handler_source(endpoint: str, functions: list[dict[str, Any]]) -> str:
    """A handler module that serves exactly `functions` with the generic handler."""
    imports = [
        f"from {f['module']} import {f['name']} as _target{i}" for i, f in enumerate(functions)
    ]
    registry = ",\n".join(
        f"        {json.dumps(f['name'])}: unwrap(_target{i})" for i, f in enumerate(functions)
    )
    return (
        f'"""Generated by `handlerctl build` for endpoint {endpoint!r}: serves exactly the '
        '@remote targets below. Do not edit."""\n\n'
        "from handler_worker.generic import create_handler\n"
        "from handler_worker.remote import unwrap\n\n"
        + "\n".join(imports)
        + "\n\nhandler = create_handler(\n    {\n"
        + registry
        + ",\n    },\n    allow_pickled=False,\n)\n"
    )


def build_handler_deployment(
    endpoint: str, spec: dict[str, Any], image: str | None, namespace: str
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "handlerops.dev/v1alpha1",
        "kind": "HandlerDeployment",
        "metadata": {"name": endpoint, "namespace": namespace},
        "spec": {"handler": {"module": spec["handlerModule"]}},
    }
    if image:
        body["spec"]["image"] = image
    if spec["resources"]:
        body["spec"]["resources"] = spec["resources"]
    body["spec"]["scaling"] = spec["scaling"]
    HandlerDeployment.model_validate(body)  # what the operator will accept
    return body


def build_outputs(
    result: ScanResult, image: str | None = None, namespace: str = "default"
) -> dict[str, str]:
    """Every generated file: relative path -> text."""
    manifest = build_manifest(result)
    files = {MANIFEST: json.dumps(manifest, indent=2, sort_keys=True) + "\n"}
    files[f"{PACKAGE}/__init__.py"] = '"""Handler modules generated by `handlerctl build`."""\n'
    requirements: list[str] = []
    for endpoint, spec in manifest["endpoints"].items():
        module_path = spec["handlerModule"].replace(".", "/") + ".py"
        files[module_path] = build_handler_source(endpoint, spec["functions"])
        hd = build_handler_deployment(endpoint, spec, image, namespace)
        files[f"deploy/{endpoint}.yaml"] = yaml.safe_dump(hd, sort_keys=False)
        requirements += [d for d in spec["dependencies"] if d not in requirements]
    files["requirements.txt"] = "".join(f"{r}\n" for r in requirements)
    return files
