"""Rater bearer tokens: issued and revoked by the CLI, checked on every RPC.

Tokens are 256-bit random strings (`fwp_` + urlsafe base64). Only their SHA-256 is stored. A fast
hash is the right choice here (unlike for passwords): a token has 256 bits of entropy, so neither
dictionary attacks nor brute force against a leaked hash are feasible, and slow KDFs (bcrypt,
argon2) would only add per-RPC latency. Hashing also makes the lookup an indexed equality query,
so no comparison over secret material happens in Python.

Scopes: `rater` may submit events (only as itself) and read consensus; `admin` may also export
datasets.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from flywheel.runtime import PermissionDenied, Unauthenticated

TOKEN_PREFIX = "fwp_"
SCOPE_RATER = "rater"
SCOPE_ADMIN = "admin"
SCOPES = (SCOPE_RATER, SCOPE_ADMIN)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    token_sha256 TEXT PRIMARY KEY,
    rater_id     TEXT NOT NULL,
    scope        TEXT NOT NULL,
    created_at   REAL NOT NULL,
    revoked_at   REAL,
    label        TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS tokens_by_rater ON tokens (rater_id);
"""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Principal:
    rater_id: str
    scope: str

    @property
    def is_admin(self) -> bool:
        return self.scope == SCOPE_ADMIN


@dataclass(frozen=True)
class TokenInfo:
    token_prefix: str
    rater_id: str
    scope: str
    created_at: float
    revoked_at: float | None
    label: str


class TokenStore:
    """Hashed tokens in SQLite; safe to share between the server and the CLI (WAL, busy timeout)."""

    def __init__(self, path: Path | str) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def issue(self, rater_id: str, *, scope: str = SCOPE_RATER, label: str = "") -> str:
        """A new token for `rater_id`; the plain token is returned once and never stored."""
        if not rater_id:
            raise ValueError("rater_id must not be empty")
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._lock:
            self._db.execute(
                "INSERT INTO tokens (token_sha256, rater_id, scope, created_at, label) VALUES (?, ?, ?, ?, ?)",
                (hash_token(token), rater_id, scope, time.time(), label))
        return token

    def revoke_rater(self, rater_id: str) -> int:
        """Revoke every active token of `rater_id`; returns how many."""
        with self._lock:
            cur = self._db.execute("UPDATE tokens SET revoked_at = ? WHERE rater_id = ? AND revoked_at IS NULL",
                                   (time.time(), rater_id))
        return cur.rowcount

    def revoke_token(self, token: str) -> bool:
        with self._lock:
            cur = self._db.execute("UPDATE tokens SET revoked_at = ? WHERE token_sha256 = ? AND revoked_at IS NULL",
                                   (time.time(), hash_token(token)))
        return cur.rowcount > 0

    def list(self) -> list[TokenInfo]:
        with self._lock:
            rows = self._db.execute(
                "SELECT token_sha256, rater_id, scope, created_at, revoked_at, label FROM tokens "
                "ORDER BY created_at").fetchall()
        return [TokenInfo(r[0][:12], r[1], r[2], r[3], r[4], r[5]) for r in rows]

    def lookup(self, token: str) -> Principal | None:
        return self.lookup_hash(hash_token(token))

    def lookup_hash(self, token_sha256: str) -> Principal | None:
        """The principal of a token known only by its hash (web UI sessions keep no plain token)."""
        with self._lock:
            row = self._db.execute(
                "SELECT rater_id, scope FROM tokens WHERE token_sha256 = ? AND revoked_at IS NULL",
                (token_sha256,)).fetchone()
        return Principal(row[0], row[1]) if row else None


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """The token of an `authorization: Bearer <token>` header; Unauthenticated when absent or malformed."""
    values = [v for k, v in (metadata or ()) if k.lower() == "authorization"]
    if not values:
        raise Unauthenticated("missing authorization metadata (expected 'Bearer <token>')")
    if len(values) > 1:
        raise Unauthenticated("more than one authorization header")
    value = values[0].decode() if isinstance(values[0], bytes) else values[0]
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("authorization must be 'Bearer <token>'")
    return token.strip()


class Authenticator:
    def __init__(self, tokens: TokenStore | None) -> None:
        """`tokens=None` disables authentication (every caller is an anonymous admin)."""
        self._tokens = tokens

    @property
    def enabled(self) -> bool:
        return self._tokens is not None

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Principal | None:
        if self._tokens is None:
            return None
        principal = self._tokens.lookup(bearer_token(metadata))
        if principal is None:
            raise Unauthenticated("unknown or revoked token")
        return principal

    @staticmethod
    def check_rater(principal: Principal | None, rater_id: str, field: str = "rater_id") -> None:
        """A rater may only submit as itself (admins included: feedback is attributable)."""
        if principal is not None and rater_id != principal.rater_id:
            raise PermissionDenied(f"{field}: token of rater {principal.rater_id!r} cannot submit as {rater_id!r}")

    @staticmethod
    def require_admin(principal: Principal | None, what: str) -> None:
        if principal is not None and not principal.is_admin:
            raise PermissionDenied(f"{what} needs an admin token")
