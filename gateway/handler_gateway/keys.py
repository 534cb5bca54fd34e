"""API keys: client keys (Bearer), admin keys (Bearer) and per-endpoint worker tokens (raw).

Keys come from files (one per line, e.g. a mounted Kubernetes Secret) and environment
variables; comparisons are constant-time. `Verdict` says 200, 401 (unknown) or 403 (known
credential, wrong scope).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

CLIENT_KEYS_ENV = "HANDLER_GATEWAY_API_KEYS"
ADMIN_KEYS_ENV = "HANDLER_GATEWAY_ADMIN_KEYS"


class Verdict(Enum):
    OK = 200
    UNAUTHORIZED = 401
    FORBIDDEN = 403


class KeyConfigError(ValueError):
    """Keys are missing or unreadable at start."""


def _matches(candidate: str, keys: Iterable[str]) -> bool:
    found = False
    for key in keys:
        found |= hmac.compare_digest(candidate.encode(), key.encode())
    return found


def bearer(header: str | None) -> str:
    """The credential in an Authorization header (`Bearer x`, or raw as the runpod SDK sends)."""
    if not header:
        return ""
    header = header.strip()
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return header


def read_key_file(path: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise KeyConfigError(f"cannot read key file {path}: {exc.strerror}") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


@dataclass(frozen=True)
class Keys:
    client: frozenset[str]
    admin: frozenset[str]
    insecure: bool = False

    @classmethod
    def load(
        cls,
        client_files: Iterable[str] = (),
        admin_files: Iterable[str] = (),
        insecure: bool = False,
        environ: dict[str, str] | None = None,
    ) -> Keys:
        env = os.environ if environ is None else environ
        client = {k.strip() for k in env.get(CLIENT_KEYS_ENV, "").split(",") if k.strip()}
        admin = {k.strip() for k in env.get(ADMIN_KEYS_ENV, "").split(",") if k.strip()}
        for path in client_files:
            client.update(read_key_file(path))
        for path in admin_files:
            admin.update(read_key_file(path))
        if not insecure and not admin:
            raise KeyConfigError(
                "no admin key configured: pass --admin-key-file or set "
                f"{ADMIN_KEYS_ENV} (or run with --insecure-dev for local development only)"
            )
        return cls(frozenset(client), frozenset(admin), insecure)

    def client_verdict(self, header: str | None, worker_tokens: Iterable[str] = ()) -> Verdict:
        """OK for a client or admin key; FORBIDDEN for another credential this gateway knows
        (any of `worker_tokens`); UNAUTHORIZED else."""
        return self._verdict(header, [*self.client, *self.admin], worker_tokens)

    def admin_verdict(self, header: str | None, worker_tokens: Iterable[str] = ()) -> Verdict:
        return self._verdict(header, self.admin, [*self.client, *worker_tokens])

    def worker_verdict(
        self, header: str | None, own_token: str | None, other_tokens: Iterable[str] = ()
    ) -> Verdict:
        own = [own_token] if own_token else []
        return self._verdict(header, own, [*self.client, *self.admin, *other_tokens])

    def _verdict(self, header: str | None, granted: Iterable[str], known: Iterable[str]) -> Verdict:
        if self.insecure:
            return Verdict.OK
        credential = bearer(header)
        if credential and _matches(credential, granted):
            return Verdict.OK
        if credential and _matches(credential, known):
            return Verdict.FORBIDDEN
        return Verdict.UNAUTHORIZED
