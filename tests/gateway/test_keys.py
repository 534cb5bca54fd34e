"""Who a credential names and what it may call: gateway key files and their reload, keys and
worker tokens found on an endpoint's registration, digests kept instead of keys."""

from __future__ import annotations

import os

import pytest

from handler_gateway.keys import (
    INSECURE,
    Caller,
    KeyConfigError,
    Keys,
    Scope,
    endpoint_callers,
    may_call_client_routes,
    parse_keys,
)
from handler_protocol.models import EndpointConfig, digest

TOKEN = "w" * 24


def config(**fields) -> EndpointConfig:
    return EndpointConfig(id="ep", workerToken=TOKEN, **fields)


def test_keys_from_files_and_env(tmp_path):
    (tmp_path / "client").write_text("# comment\nk1\n\nci-bot k2\n")
    (tmp_path / "admin").write_text("a1\n")
    keys = Keys.load(
        [str(tmp_path / "client")],
        [str(tmp_path / "admin")],
        environ={"HANDLER_GATEWAY_API_KEYS": "k3,  k4 "},
    )
    assert set(keys.client) == {digest(k) for k in ("k1", "k2", "k3", "k4")}
    assert keys.gateway_caller(digest("k2")) == Caller("global:ci-bot", Scope.GLOBAL)
    assert keys.gateway_caller(digest("k1")) == Caller(f"global:{digest('k1')[:8]}", Scope.GLOBAL)
    assert keys.gateway_caller(digest("a1")).scope == Scope.ADMIN
    assert keys.gateway_caller(digest("nope")) is None


def test_only_digests_are_kept(tmp_path):
    (tmp_path / "admin").write_text("secret-admin-key\n")
    keys = Keys.load([], [str(tmp_path / "admin")], environ={})
    held = repr(keys.client) + repr(keys.admin)
    assert "secret-admin-key" not in held and digest("secret-admin-key") in held


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("key", {digest("key"): f"global:{digest('key')[:8]}"}),
        ("  name   key  ", {digest("key"): "global:name"}),
        ("key  # a comment after it", {digest("key"): f"global:{digest('key')[:8]}"}),
        ("# key", {}),
        ("", {}),
    ],
)
def test_key_lines(line, expected):
    assert parse_keys(line, "global") == expected


def test_a_line_of_more_words_is_refused_naming_the_line_not_its_words():
    with pytest.raises(KeyConfigError) as refused:
        parse_keys("ok-key\ns3cr3t-value trailing words\n", "global", "key file k")
    assert "key file k, line 2" in str(refused.value)
    assert "s3cr3t" not in str(refused.value)


def test_a_key_file_that_is_not_text_is_a_clear_error(tmp_path):
    (tmp_path / "admin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(KeyConfigError, match="not UTF-8 text"):
        Keys.load([], [str(tmp_path / "admin")], environ={})


def test_keys_keep_only_their_own_environment_variables():
    keys = Keys.load(environ={"HANDLER_GATEWAY_ADMIN_KEYS": "a", "AWS_SECRET": "x"})
    assert dict(keys.environ) == {"HANDLER_GATEWAY_ADMIN_KEYS": "a"}
    assert "AWS_SECRET" not in repr(keys) and "digest" not in repr(keys)


def test_a_rewritten_key_file_rotates_keys_without_a_restart(tmp_path):
    path = tmp_path / "client"
    path.write_text("old\n")
    (tmp_path / "admin").write_text("a\n")
    keys = Keys.load([str(path)], [str(tmp_path / "admin")], environ={})
    assert not keys.reload()  # nothing changed: nothing re-read
    # A Secret volume swaps a link to new data; here: a new file in its place.
    (tmp_path / "new").write_text("new\nalso-new\n")
    os.replace(tmp_path / "new", path)
    assert keys.reload()
    assert keys.gateway_caller(digest("old")) is None
    assert keys.gateway_caller(digest("new")).scope == Scope.GLOBAL


def test_an_unreadable_key_file_keeps_its_last_keys(tmp_path):
    path = tmp_path / "client"
    path.write_text("k\n")
    (tmp_path / "admin").write_text("a\n")
    keys = Keys.load([str(path)], [str(tmp_path / "admin")], environ={})
    path.unlink()
    assert not keys.reload()
    assert keys.gateway_caller(digest("k")).scope == Scope.GLOBAL


def test_a_raw_worker_token_is_kept_as_its_digest_only():
    registered = config()
    assert TOKEN not in registered.model_dump_json()
    assert registered.workerTokenSha256 == [digest(TOKEN)]
    again = EndpointConfig.model_validate_json(registered.model_dump_json())
    assert again.workerTokenSha256 == [digest(TOKEN)]


def test_a_rotating_worker_token_has_two_digests_the_new_one_first():
    rotating = config(workerTokenSha256=[digest("previous-token-xxxxx")])
    assert rotating.workerTokenSha256 == [digest(TOKEN), digest("previous-token-xxxxx")]


def test_a_registration_needs_a_worker_token():
    with pytest.raises(ValueError, match="workerToken or workerTokenSha256"):
        EndpointConfig(id="ep")


@pytest.mark.parametrize(
    ("scope", "expected"), [("endpoint", Scope.ENDPOINT), ("namespace", Scope.NAMESPACE)]
)
def test_scoped_keys_and_the_worker_token_are_found_on_the_registration(scope, expected):
    registered = config(clientKeys=[{"id": "ns/s/k", "sha256": digest("k"), "scope": scope}])
    assert endpoint_callers(registered, digest("k")) == [Caller("ns/s/k", expected)]
    assert endpoint_callers(registered, digest(TOKEN)) == [Caller("worker:ep", Scope.WORKER)]
    assert endpoint_callers(registered, digest("other")) == []


def test_a_credential_may_be_both_a_key_and_the_worker_token():
    registered = config(clientKeys=[{"id": "ns/s/token", "sha256": digest(TOKEN)}])
    assert [c.scope for c in endpoint_callers(registered, digest(TOKEN))] == [
        Scope.ENDPOINT,
        Scope.WORKER,
    ]


@pytest.mark.parametrize(
    ("scope", "plain", "runs_caller_code"),
    [
        (Scope.ENDPOINT, True, True),
        (Scope.NAMESPACE, True, True),
        (Scope.GLOBAL, True, False),
        (Scope.ADMIN, True, False),
        (Scope.WORKER, False, False),
        (Scope.FOREIGN, False, False),
    ],
)
def test_who_may_call_client_routes(scope, plain, runs_caller_code):
    caller = Caller("x", scope)
    assert may_call_client_routes(caller, config()) is plain
    assert may_call_client_routes(caller, config(runsCallerCode=True)) is runs_caller_code


def test_insecure_dev_may_call_an_endpoint_running_caller_code():
    assert may_call_client_routes(INSECURE, config(runsCallerCode=True))
