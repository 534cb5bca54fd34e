"""The chart's generated credentials through real `helm install/upgrade/uninstall` on the real
control plane: the pre-install/pre-upgrade hook Job (run by the node agent with its pod's token)
creates the keys once; upgrades keep them; an upgrade from a chart that rendered the Secrets
itself (the lookup era) keeps their values instead of deleting them."""

from __future__ import annotations

import base64
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.cluster.conftest import RESTRICTED, Kubectl, make_namespace
from tests.conftest import REPO_ROOT

CHART = REPO_ROOT / "charts" / "handler-operator"
# Both generated Secrets (gateway keys, Redis password), and nothing that waits on storage.
VALUES = ["redis.persistence.enabled=false", "gateway.replicas=1"]
KEEP = "helm.sh/resource-policy"


@pytest.fixture
def release(control_plane, nodes, crd_installed) -> Iterator[tuple[Kubectl, str, str]]:
    assert crd_installed and nodes
    kubectl = Kubectl(control_plane.kubeconfig)
    namespace = make_namespace(kubectl, RESTRICTED)
    name = f"keys-{namespace[2:]}"
    yield kubectl, namespace, name
    kubectl.helm("uninstall", name, "--namespace", namespace, "--wait", "--timeout", "60s")
    kubectl.run("delete", "namespace", namespace, "--wait=false")


def helm(kubectl: Kubectl, verb: str, name: str, namespace: str, chart: Path) -> None:
    args = [verb, name, str(chart), "--namespace", namespace, "--skip-crds"]
    for value in VALUES:
        args += ["--set", value]
    done = kubectl.helm(*args, "--wait", "--timeout", "120s")
    assert done.returncode == 0, done.stderr


def secrets(kubectl: Kubectl, namespace: str, name: str) -> dict[str, dict]:
    """The release's gateway keys and Redis password Secrets, by name."""
    base = f"{name}-handler"
    found = {}
    for secret in (f"{base}-gateway-keys", f"{base}-redis"):
        body = kubectl.maybe("secret", secret, namespace)
        if body is not None:
            found[secret] = body
    return found


def values_of(found: dict[str, dict]) -> dict[str, dict[str, str]]:
    return {
        name: {k: base64.b64decode(v).decode() for k, v in body["data"].items()}
        for name, body in found.items()
    }


def test_install_generates_once_and_upgrades_and_reinstalls_keep_the_keys(release):
    kubectl, namespace, name = release
    helm(kubectl, "install", name, namespace, CHART)
    first = secrets(kubectl, namespace, name)
    assert sorted(first) == [f"{name}-handler-gateway-keys", f"{name}-handler-redis"]
    assert all(s["metadata"]["annotations"][KEEP] == "keep" for s in first.values())
    generated = values_of(first)
    assert set(generated[f"{name}-handler-gateway-keys"]) == {"admin-key", "api-key"}
    # The hook's own objects are gone once it succeeded.
    assert kubectl.maybe("job", f"{name}-handler-credentials", namespace) is None
    helm(kubectl, "upgrade", name, namespace, CHART)
    assert values_of(secrets(kubectl, namespace, name)) == generated
    # Uninstall keeps the keys (clients keep working after a reinstall); so does the reinstall.
    done = kubectl.helm("uninstall", name, "--namespace", namespace, "--wait")
    assert done.returncode == 0, done.stderr
    assert values_of(secrets(kubectl, namespace, name)) == generated
    helm(kubectl, "install", name, namespace, CHART)
    assert values_of(secrets(kubectl, namespace, name)) == generated


def lookup_era_chart(tmp_path: Path) -> Path:
    """The chart as it was before the hook: it rendered both Secrets (values fixed here)."""
    chart = tmp_path / "handler-operator"
    shutil.copytree(CHART, chart, symlinks=False)
    (chart / "templates" / "credentials.yaml").unlink()
    rendered = [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": '{{ include "handler-operator.gatewayKeysSecret" . }}'},
            "type": "Opaque",
            "stringData": {"admin-key": "old-admin-key", "api-key": "old-api-key"},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": '{{ include "handler-operator.redisName" . }}'},
            "type": "Opaque",
            "stringData": {"redis-password": "old-redis-password"},
        },
    ]
    (chart / "templates" / "old-secrets.yaml").write_text(yaml.safe_dump_all(rendered))
    return chart


def test_an_upgrade_from_a_chart_that_rendered_the_secrets_keeps_their_values(release, tmp_path):
    kubectl, namespace, name = release
    helm(kubectl, "install", name, namespace, lookup_era_chart(tmp_path))
    before = values_of(secrets(kubectl, namespace, name))
    assert before[f"{name}-handler-gateway-keys"]["admin-key"] == "old-admin-key"
    # Helm deletes what the new chart no longer renders, unless the live object says keep:
    # the pre-upgrade hook marks both before that happens.
    helm(kubectl, "upgrade", name, namespace, CHART)
    after = secrets(kubectl, namespace, name)
    assert values_of(after) == before
    assert all(s["metadata"]["annotations"][KEEP] == "keep" for s in after.values())
