"""Who a credential names and what it may call: gateway keys (admin, global client) from files
and environment variables, kept as digests and re-read when their files change; keys scoped to
an endpoint or a namespace and worker tokens, found on the endpoint's registration.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from handler_protocol.models import EndpointConfig, digest

CLIENT_KEYS_ENV = "HANDLER_GATEWAY_API_KEYS"
ADMIN_KEYS_ENV = "HANDLER_GATEWAY_ADMIN_KEYS"
# Id of a key named only by its digest: this many hex characters of it.
ID_DIGITS = 8

log = logging.getLogger("handler_gateway.keys")


class Scope(Enum):
    ADMIN = "admin"  # the gateway's admin keys: admin routes, and client routes as GLOBAL
    GLOBAL = "global"  # the gateway's client keys: every endpoint but those running caller code
    NAMESPACE = "namespace"  # a namespace's keys, registered on each of its endpoints
    ENDPOINT = "endpoint"  # keys of the Secrets an endpoint names
    WORKER = "worker"  # the endpoint's worker token
    FOREIGN = "foreign"  # a key or worker token of another endpoint


@dataclass(frozen=True)
class Caller:
    """A known credential: its id (logs and metrics show it, never the key) and scope."""

    id: str
    scope: Scope


INSECURE = Caller("insecure-dev", Scope.ADMIN)
GATEWAY_SCOPES = (Scope.ADMIN, Scope.GLOBAL)  # the gateway's own keys, not scoped to endpoints


class KeyConfigError(ValueError):
    """Keys are missing or unreadable at start."""


def bearer(header: str | None) -> str:
    """The credential in an Authorization header (`Bearer x`, or raw as the runpod SDK sends)."""
    if not header:
        return ""
    header = header.strip()
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return header


def parse_keys(text: str, prefix: str, source: str = "keys") -> dict[str, str]:
    """Digest -> id of the keys in `text`: one per line, `KEY` or `NAME KEY`; `#` starts a
    comment. Anything else is refused (KeyConfigError, naming the line, never its words): a
    word taken for the key by mistake would be a key anyone could guess."""
    found: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) > 2:
            raise KeyConfigError(
                f"{source}, line {number}: expected KEY or NAME KEY, got {len(words)} words"
            )
        key = words[-1]
        sha = digest(key)
        name = words[0] if len(words) > 1 else sha[:ID_DIGITS]
        found[sha] = f"{prefix}:{name}"
    return found


def read_key_file(path: str, prefix: str) -> dict[str, str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise KeyConfigError(f"cannot read key file {path}: {reason}") from None
    return parse_keys(text, prefix, f"key file {path}")


def _signature(path: str) -> tuple[int, int, int] | None:
    """What changes when a file is rewritten or a Secret volume swaps its data link."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


@dataclass
class Keys:
    """The gateway's own keys. `reload()` re-reads the files that changed (a mounted Secret
    updated in place rotates keys without a restart); an unreadable file keeps its last keys."""

    client_files: tuple[str, ...] = ()
    admin_files: tuple[str, ...] = ()
    insecure: bool = False
    environ: Mapping[str, str] = field(default_factory=dict, repr=False)  # the two variables
    client: dict[str, str] = field(default_factory=dict, repr=False)  # digest -> id
    admin: dict[str, str] = field(default_factory=dict, repr=False)
    _read: dict[tuple[str, str], tuple[tuple[int, int, int] | None, dict[str, str]]] = field(
        default_factory=dict, repr=False
    )

    @classmethod
    def load(
        cls,
        client_files: Iterable[str] = (),
        admin_files: Iterable[str] = (),
        insecure: bool = False,
        environ: Mapping[str, str] | None = None,
    ) -> Keys:
        env = os.environ if environ is None else environ
        wanted = {name: env[name] for name in (CLIENT_KEYS_ENV, ADMIN_KEYS_ENV) if name in env}
        keys = cls(tuple(client_files), tuple(admin_files), insecure, wanted)
        for prefix, paths in (("global", keys.client_files), ("admin", keys.admin_files)):
            for path in paths:
                keys._read[(prefix, path)] = (_signature(path), read_key_file(path, prefix))
        keys._combine()
        if not insecure and not keys.admin:
            raise KeyConfigError(
                "no admin key configured: pass --admin-key-file or set "
                f"{ADMIN_KEYS_ENV} (or run with --insecure-dev for local development only)"
            )
        return keys

    @classmethod
    def of(
        cls, client: Iterable[str] = (), admin: Iterable[str] = (), insecure: bool = False
    ) -> Keys:
        """Keys given as values (an embedded gateway, tests)."""
        environ = {CLIENT_KEYS_ENV: ",".join(client), ADMIN_KEYS_ENV: ",".join(admin)}
        keys = cls(insecure=insecure, environ=environ)
        keys._combine()
        return keys

    def _combine(self) -> None:
        def env(name: str, prefix: str) -> dict[str, str]:
            return parse_keys(self.environ.get(name, "").replace(",", "\n"), prefix, name)

        client, admin = env(CLIENT_KEYS_ENV, "global"), env(ADMIN_KEYS_ENV, "admin")
        for (prefix, _), (_, found) in self._read.items():
            (client if prefix == "global" else admin).update(found)
        self.client, self.admin = client, admin

    def reload(self) -> bool:
        """Re-read the key files that changed; whether any keys did."""
        changed = False
        for (prefix, path), (signature, found) in list(self._read.items()):
            now = _signature(path)
            if now == signature:
                continue
            try:
                fresh = read_key_file(path, prefix)
            except KeyConfigError as exc:
                log.warning("%s; its keys stay as they were", exc)
                self._read[(prefix, path)] = (now, found)  # said once per change
                continue
            self._read[(prefix, path)] = (now, fresh)
            if fresh != found:
                changed = True
                log.info(
                    "key file %s re-read: %d %s key(s): %s",
                    path, len(fresh), prefix, ", ".join(sorted(fresh.values())),
                )  # fmt: skip
        if changed:
            self._combine()
        return changed

    def gateway_caller(self, sha256: str) -> Caller | None:
        if sha256 in self.admin:
            return Caller(self.admin[sha256], Scope.ADMIN)
        if sha256 in self.client:
            return Caller(self.client[sha256], Scope.GLOBAL)
        return None


def endpoint_callers(config: EndpointConfig, sha256: str) -> list[Caller]:
    """The credential as `config`'s: a key scoped to it and/or its worker token."""
    found = []
    key = config.client_key(sha256)
    if key is not None:
        found.append(Caller(key.id, Scope(key.scope)))
    if sha256 in config.workerTokenSha256:
        found.append(Caller(f"worker:{config.id}", Scope.WORKER))
    return found


def may_call_client_routes(caller: Caller, config: EndpointConfig | None) -> bool:
    """Keys scoped to the endpoint always; gateway keys unless it runs its callers' code."""
    if caller.scope in (Scope.ENDPOINT, Scope.NAMESPACE):
        return True
    if caller.scope in GATEWAY_SCOPES:
        return caller is INSECURE or config is None or not config.runsCallerCode
    return False
