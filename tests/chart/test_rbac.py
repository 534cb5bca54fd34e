"""The chart's RBAC is exactly `handler_operator.rbac.RULES`: cluster-wide in one ClusterRole, or
namespaced Roles plus a ClusterRole for the cluster-scoped reads; the credentials hook's Role
reaches only the Secrets it generates."""

from __future__ import annotations

import pytest

from handler_operator import rbac
from tests.chart.conftest import NAMESPACE, Rendered, render
from tests.conftest import REPO_ROOT

OPERATOR, CREDENTIALS = "handler-operator", "handler-credentials"
COMPONENT = "app.kubernetes.io/component"
CLUSTER_SCOPED = {("apiextensions.k8s.io", "customresourcedefinitions")}


def grants(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def wanted(scoped: bool | None = None) -> set[tuple[str, str, str]]:
    """RULES as (group, resource, verb); only cluster-scoped (True) or namespaced (False) ones."""
    return {
        (rule.group, rule.resource, verb)
        for rule in rbac.RULES
        for verb in rule.verbs
        if scoped is None or ((rule.group, rule.resource) in CLUSTER_SCOPED) is scoped
    }


def bound_to_operator(rendered: Rendered, binding_kind: str, namespace: str | None = None):
    for binding in rendered.of(binding_kind):
        if namespace and binding["metadata"].get("namespace") != namespace:
            continue
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": OPERATOR, "namespace": NAMESPACE}
        ]
        return binding["roleRef"]["name"]
    raise AssertionError(f"no {binding_kind} in {namespace}")


def operator_roles(rendered: Rendered) -> list[dict]:
    """The operator's Roles (the credentials hook brings its own, see below)."""
    return [
        r for r in rendered.of("Role") if r["metadata"]["labels"].get(COMPONENT) != "credentials"
    ]


def test_cluster_wide_role_is_exactly_the_rules():
    rendered = render()
    assert not operator_roles(rendered)
    role = rendered.get("ClusterRole", OPERATOR)
    assert grants(role["rules"]) == wanted()
    assert bound_to_operator(rendered, "ClusterRoleBinding") == OPERATOR
    # No wildcards, no verbs the operator never uses.
    assert all("*" not in r["verbs"] and "*" not in r["resources"] for r in role["rules"])


@pytest.mark.parametrize("namespaces", [["ml"], ["ml", "team-b", "batch"]])
def test_watch_namespaces_get_roles_and_only_crd_reads_stay_cluster_wide(namespaces):
    rendered = render([f"watchNamespaces={{{','.join(namespaces)}}}"])
    assert grants(rendered.get("ClusterRole", OPERATOR)["rules"]) == wanted(scoped=True)
    roles = operator_roles(rendered)
    assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(namespaces)
    for role in roles:
        assert grants(role["rules"]) == wanted(scoped=False)
        namespace = role["metadata"]["namespace"]
        assert bound_to_operator(rendered, "RoleBinding", namespace) == OPERATOR


@pytest.mark.parametrize(
    ("sets", "names"),
    [
        pytest.param([], ["handler-gateway-keys", "handler-redis"], id="default"),
        pytest.param(["redis.auth.existingSecret=mine"], ["handler-gateway-keys"], id="own-redis"),
        pytest.param(
            ["redis.enabled=false", "gateway.replicas=1"], ["handler-gateway-keys"], id="no-redis"
        ),
    ],
)
def test_the_credentials_hook_may_only_make_and_read_its_own_secrets(sets, names):
    rendered = render(sets)
    role = rendered.get("Role", CREDENTIALS)
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": names,
            "verbs": ["get", "patch"],
        },
    ]
    binding = rendered.get("RoleBinding", CREDENTIALS)
    assert binding["roleRef"]["name"] == CREDENTIALS
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": CREDENTIALS, "namespace": NAMESPACE}
    ]


def test_every_rule_says_why():
    assert all(rule.why for rule in rbac.RULES)
    groups = {(r.group, r.resource) for r in rbac.RULES}
    assert CLUSTER_SCOPED <= groups


def test_the_readme_lists_every_permission_with_its_reason():
    """README's "Install on a cluster" table: one row per rule, the same verbs and reason."""
    readme = (REPO_ROOT / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `") and " | " in line]
    for rule in rbac.RULES:
        resource = f"{rule.group}/{rule.resource}" if rule.group else rule.resource
        expected = f"| `{resource}` | {', '.join(rule.verbs)} | {rule.why} |"
        assert expected in rows, f"README is missing: {expected}"
