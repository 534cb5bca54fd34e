"""The chart's key hook: pure decisions with plain values, then `python -m
handler_operator.credentials` against the emulator (created once, never changed, kept)."""

from __future__ import annotations

import asyncio
import base64
import itertools

import pytest

from handler_operator.builders import KEEP_ANNOTATIONS, build_kept_secret_write
from handler_operator.clients import KubeApi
from handler_operator.credentials import ALPHABET, VALUE_LENGTH, ensure, main, new_value
from tests.operator.conftest import call

KEYS = ["admin-key", "api-key"]
LABELS = {"app.kubernetes.io/instance": "ho"}


def secret(data: dict[str, str], annotations: dict[str, str] | None = None) -> dict:
    meta = {"name": "keys", "namespace": "ops", "resourceVersion": "7"}
    if annotations is not None:
        meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "data": data}


def values():
    counter = itertools.count()
    return lambda: f"v{next(counter)}"


def test_a_missing_secret_is_created_with_every_key_and_kept():
    verb, body = build_kept_secret_write("ops", "keys", KEYS, LABELS, None, values())
    assert verb == "create"
    assert body["stringData"] == {"admin-key": "v0", "api-key": "v1"}
    assert body["metadata"]["annotations"] == KEEP_ANNOTATIONS
    assert body["metadata"]["labels"] == LABELS


@pytest.mark.parametrize(
    ("existing", "expected"),
    [
        pytest.param(
            secret({"admin-key": "YQ==", "api-key": "Yg=="}, KEEP_ANNOTATIONS), None, id="complete"
        ),
        pytest.param(
            secret({"admin-key": "YQ==", "api-key": "Yg=="}, {"meta.helm.sh/release-name": "ho"}),
            {"metadata": {"annotations": KEEP_ANNOTATIONS, "resourceVersion": "7"}},
            id="rendered-by-an-older-chart",
        ),
        pytest.param(
            secret({"admin-key": "YQ=="}, KEEP_ANNOTATIONS),
            {"stringData": {"api-key": "v0"}, "metadata": {"resourceVersion": "7"}},
            id="a-key-added-later",
        ),
    ],
)
def test_an_existing_secret_only_gains_what_it_lacks(existing, expected):
    write = build_kept_secret_write("ops", "keys", KEYS, LABELS, existing, values())
    assert write == (None if expected is None else ("patch", expected))


def test_new_values_are_long_and_plain():
    value = new_value()
    assert len(value) == VALUE_LENGTH and set(value) <= set(ALPHABET)
    assert new_value() != value


def read(cluster, name: str) -> dict:
    status, body = call("GET", f"{cluster.url}/api/v1/namespaces/ops/secrets/{name}")
    assert status == 200, body
    return body


def decoded(body: dict) -> dict[str, str]:
    return {key: base64.b64decode(value).decode() for key, value in body["data"].items()}


def test_the_hook_creates_once_and_a_rerun_changes_nothing(cluster, capsys):
    args = ["--namespace", "ops", "--secret", "keys=admin-key,api-key", "--label", "a=b"]
    assert main(args) == 0
    first = read(cluster, "keys")
    assert first["metadata"]["annotations"] == KEEP_ANNOTATIONS
    assert first["metadata"]["labels"] == {"a": "b"}
    assert set(decoded(first)) == set(KEYS)
    assert main(args) == 0
    assert read(cluster, "keys")["data"] == first["data"]
    out = capsys.readouterr().out
    assert "Secret ops/keys: created" in out and "Secret ops/keys: unchanged" in out


def test_a_secret_an_older_chart_rendered_keeps_its_values_and_becomes_kept(cluster):
    old = secret(
        {"admin-key": base64.b64encode(b"old-admin").decode()},
        {"meta.helm.sh/release-name": "ho"},
    )
    del old["metadata"]["resourceVersion"]
    assert call("POST", f"{cluster.url}/api/v1/namespaces/ops/secrets", old)[0] in (200, 201)
    assert main(["--namespace", "ops", "--secret", "keys=admin-key,api-key"]) == 0
    kept = read(cluster, "keys")
    assert kept["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert kept["metadata"]["annotations"]["meta.helm.sh/release-name"] == "ho"
    values_now = decoded(kept)
    assert values_now["admin-key"] == "old-admin" and len(values_now["api-key"]) == VALUE_LENGTH


def test_two_hooks_at_once_agree_on_one_value(cluster):
    async def both():
        kube = await KubeApi.connect()
        try:
            return await asyncio.gather(
                *(ensure(kube, "ops", "pw", ["redis-password"], {}) for _ in range(2))
            )
        finally:
            await kube.close()

    assert sorted(asyncio.run(both())) == ["created", "unchanged"]
    assert len(decoded(read(cluster, "pw"))["redis-password"]) == VALUE_LENGTH


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["--secret", "keys=admin-key"], id="no-namespace"),
        pytest.param(["--namespace", "ops", "--secret", "keys="], id="no-keys"),
        pytest.param(["--namespace", "ops"], id="no-secret"),
    ],
)
def test_bad_arguments_exit_non_zero_with_a_message(args, capsys, monkeypatch):
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    assert code == 2
    assert "error" in capsys.readouterr().err
