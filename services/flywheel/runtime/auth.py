"""API keys and rater tokens for every service: hashed storage, scopes, per-key quotas and metrics.

Keys are 256-bit random strings (`fwk_` app keys, `fwp_` rater tokens, + urlsafe base64). Only their
SHA-256 is stored, in SQLite. A fast hash is the right choice here (unlike for passwords): a key has
256 bits of entropy, so neither dictionary attacks nor brute force against a leaked hash are
feasible, and slow KDFs would only add per-call latency. The lookup is an indexed equality query on
the hash, so no comparison over secret material happens in Python. Revocation is immediate: every
call looks the key up (no cache).

Scopes: `rater` (submit feedback as itself), `score` (reward service), `generate` (policy service),
`admin` (everything, including control RPCs and dataset export). A key may hold several.

Callers send `authorization: Bearer <key>` as gRPC metadata or an HTTP header. `Guard` checks the
key, its scope and its quotas (token buckets for requests/s and items/s; refusals are
`QuotaExceeded` = RESOURCE_EXHAUSTED / HTTP 429 with a retry-after) and counts calls, items and
refusals per key. `AuthInterceptor` applies a Guard to a gRPC server; `http_middleware` to aiohttp.
"""

from __future__ import annotations

import contextvars
import hashlib
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence

from prometheus_client import Counter

from flywheel.runtime.errors import Overloaded, PermissionDenied, Unauthenticated
from flywheel.runtime.interceptors import _WrappingInterceptor

TOKEN_PREFIX = "fwp_"  # rater tokens (preference service)
KEY_PREFIX = "fwk_"  # app keys (reward, policy, trainer)
SCOPE_RATER = "rater"
SCOPE_SCORE = "score"
SCOPE_GENERATE = "generate"
SCOPE_ADMIN = "admin"
SCOPES = (SCOPE_RATER, SCOPE_SCORE, SCOPE_GENERATE, SCOPE_ADMIN)
ANY_SCOPE = "*"  # any valid key, whatever its scopes

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
# Added after the first release; older databases get them on open.
_QUOTA_COLUMNS = {"requests_per_s": "REAL NOT NULL DEFAULT 0", "items_per_s": "REAL NOT NULL DEFAULT 0"}

CALLS = Counter("flywheel_api_key_calls_total", "Calls admitted, per service and key owner.", ("service", "key"))
ITEMS = Counter("flywheel_api_key_items_total", "Items (texts scored, prompts generated) admitted, per key owner.",
                ("service", "key"))
REFUSALS = Counter("flywheel_api_key_refusals_total", "Calls refused, per key owner and reason (unauthenticated, "
                   "permission_denied, rate_limited).", ("service", "key", "reason"))


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def parse_scopes(scope: str | Iterable[str]) -> tuple[str, ...]:
    items = scope.replace(",", " ").split() if isinstance(scope, str) else list(scope)
    if not items:
        raise ValueError("a key needs at least one scope")
    for s in items:
        if s not in SCOPES:
            raise ValueError(f"unknown scope {s!r} (scopes: {', '.join(SCOPES)})")
    return tuple(dict.fromkeys(items))


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's owner (a rater id or an app name), scopes and quotas."""

    rater_id: str
    scope: str  # comma-separated
    requests_per_s: float = 0.0
    items_per_s: float = 0.0
    key_id: str = ""  # first 12 hex digits of the key's hash: names one key among an owner's keys

    @property
    def owner(self) -> str:
        return self.rater_id

    @property
    def scopes(self) -> frozenset[str]:
        return frozenset(self.scope.split(","))

    @property
    def is_admin(self) -> bool:
        return SCOPE_ADMIN in self.scopes

    def allows(self, scope: str) -> bool:
        return scope == ANY_SCOPE or self.is_admin or scope in self.scopes


@dataclass(frozen=True)
class TokenInfo:
    token_prefix: str
    rater_id: str
    scope: str
    created_at: float
    revoked_at: float | None
    label: str
    requests_per_s: float = 0.0
    items_per_s: float = 0.0


class TokenStore:
    """Hashed keys in SQLite; safe to share between a server and the CLI (WAL, busy timeout)."""

    def __init__(self, path: Path | str) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(tokens)")}
        for name, decl in _QUOTA_COLUMNS.items():
            if name not in columns:
                self._db.execute(f"ALTER TABLE tokens ADD COLUMN {name} {decl}")
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def issue(self, rater_id: str, *, scope: str | Iterable[str] = SCOPE_RATER, label: str = "",
              requests_per_s: float = 0.0, items_per_s: float = 0.0) -> str:
        """A new key for `rater_id` (owner); the plain key is returned once and never stored.
        Quotas of 0 mean the service default."""
        if not rater_id:
            raise ValueError("the key's owner must not be empty")
        scopes = parse_scopes(scope)
        if requests_per_s < 0 or items_per_s < 0:
            raise ValueError("quotas must be >= 0")
        prefix = TOKEN_PREFIX if scopes == (SCOPE_RATER,) else KEY_PREFIX
        token = prefix + secrets.token_urlsafe(32)
        with self._lock:
            self._db.execute(
                "INSERT INTO tokens (token_sha256, rater_id, scope, created_at, label, requests_per_s, items_per_s) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (hash_token(token), rater_id, ",".join(scopes), time.time(), label, requests_per_s, items_per_s))
        return token

    def revoke_rater(self, rater_id: str) -> int:
        """Revoke every active key of `rater_id`; returns how many."""
        with self._lock:
            cur = self._db.execute("UPDATE tokens SET revoked_at = ? WHERE rater_id = ? AND revoked_at IS NULL",
                                   (time.time(), rater_id))
        return cur.rowcount

    def revoke_token(self, token: str) -> bool:
        return self.revoke_key_id(hash_token(token)) > 0

    def revoke_key_id(self, key_id: str) -> int:
        """Revoke the key whose hash starts with `key_id` (as `list` shows it); at least 8 hex digits."""
        if len(key_id) < 8:
            raise ValueError("give at least 8 hex digits of the key id")
        with self._lock:
            cur = self._db.execute("UPDATE tokens SET revoked_at = ? WHERE token_sha256 LIKE ? AND revoked_at IS NULL",
                                   (time.time(), key_id.lower() + "%"))
        return cur.rowcount

    def list(self) -> list[TokenInfo]:
        with self._lock:
            rows = self._db.execute(
                "SELECT token_sha256, rater_id, scope, created_at, revoked_at, label, requests_per_s, items_per_s "
                "FROM tokens ORDER BY created_at").fetchall()
        return [TokenInfo(r[0][:12], r[1], r[2], r[3], r[4], r[5], r[6], r[7]) for r in rows]

    def lookup(self, token: str) -> Principal | None:
        return self.lookup_hash(hash_token(token))

    def lookup_hash(self, digest: str) -> Principal | None:
        """The principal of a key known only by its hash (web UI sessions keep no plain token)."""
        with self._lock:
            row = self._db.execute(
                "SELECT rater_id, scope, requests_per_s, items_per_s FROM tokens "
                "WHERE token_sha256 = ? AND revoked_at IS NULL", (digest,)).fetchone()
        return Principal(row[0], row[1], row[2], row[3], digest[:12]) if row else None


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """The key of an `authorization: Bearer <key>` header; Unauthenticated when absent or malformed."""
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


# -- quotas -------------------------------------------------------------------------------------

class QuotaExceeded(Overloaded):
    """A key used up its rate; `retry_after_s` says when the call would be admitted."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(f"{message}; retry after {retry_after_s:.3f}s")
        self.retry_after_s = retry_after_s


class TokenBucket:
    """`rate` tokens per second, holding at most `capacity`. A take larger than the capacity is
    admitted from a full bucket (which then goes into debt), so big requests are slowed, not barred."""

    def __init__(self, rate: float, capacity: float) -> None:
        self.rate = rate
        self.capacity = max(capacity, 1.0)
        self.tokens = self.capacity
        self.updated = time.monotonic()

    def take(self, n: float, now: float | None = None) -> float:
        """Take `n` tokens and return 0, or take nothing and return the seconds until they'd be there."""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        need = min(n, self.capacity)
        if self.tokens >= need:
            self.tokens -= n
            return 0.0
        return (need - self.tokens) / self.rate


# -- the guard ----------------------------------------------------------------------------------

_CURRENT: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("flywheel_principal", default=None)


def current_principal() -> Principal | None:
    """The caller of the gRPC call being handled (None when auth is disabled)."""
    return _CURRENT.get()


class Guard(Authenticator):
    """Authentication, scope checks, per-key quotas and per-key metrics for one service."""

    def __init__(self, tokens: TokenStore | None, *, service: str, default_requests_per_s: float = 0.0,
                 default_items_per_s: float = 0.0, burst_s: float = 1.0) -> None:
        super().__init__(tokens)
        self.service = service
        self.default_requests_per_s = default_requests_per_s
        self.default_items_per_s = default_items_per_s
        self.burst_s = burst_s
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Any) -> "Guard":
        """A Guard over `settings.api_keys_path()`, or a disabled one when `auth_enabled` is false."""
        store = TokenStore(settings.api_keys_path()) if settings.auth_enabled else None
        return cls(store, service=settings.service_name,
                   default_requests_per_s=settings.auth_default_requests_per_s,
                   default_items_per_s=settings.auth_default_items_per_s, burst_s=settings.auth_burst_s)

    def _refuse(self, key: str, reason: str, exc: Exception) -> Exception:
        REFUSALS.labels(self.service, key, reason).inc()
        return exc

    def _take(self, principal: Principal, kind: str, rate: float, n: float) -> None:
        if rate <= 0 or n <= 0:
            return
        with self._lock:
            bucket = self._buckets.get((principal.key_id, kind))
            if bucket is None or bucket.rate != rate:
                bucket = self._buckets[(principal.key_id, kind)] = TokenBucket(rate, rate * self.burst_s)
            wait = bucket.take(n)
        if wait > 0:
            raise self._refuse(principal.owner, "rate_limited", QuotaExceeded(
                f"key of {principal.owner!r} is over its {kind} quota ({rate:g}/s)", wait))

    def admit(self, metadata: Sequence[tuple[str, str | bytes]] | None, scope: str) -> Principal | None:
        """Check the caller's key and scope and take one request from its quota."""
        if not self.enabled:
            return None
        try:
            principal = self.authenticate(metadata)
        except Unauthenticated as exc:
            raise self._refuse("-", "unauthenticated", exc) from None
        assert principal is not None
        if not principal.allows(scope):
            raise self._refuse(principal.owner, "permission_denied", PermissionDenied(
                f"this call needs a key with scope {scope!r} (the key of {principal.owner!r} has {principal.scope!r})"))
        self._take(principal, "requests", principal.requests_per_s or self.default_requests_per_s, 1)
        CALLS.labels(self.service, principal.owner).inc()
        return principal

    def charge_items(self, principal: Principal | None, n: int) -> None:
        """Take `n` items (texts to score, sequences to generate) from the caller's quota."""
        if principal is None:
            return
        self._take(principal, "items", principal.items_per_s or self.default_items_per_s, n)
        ITEMS.labels(self.service, principal.owner).inc(n)


# -- gRPC ---------------------------------------------------------------------------------------

class AuthInterceptor(_WrappingInterceptor):
    """Applies a Guard to gRPC calls. `scopes` maps a full method ("/pkg.Service/Method") or a
    service ("pkg.Service") to the scope it needs (None: public); services not named are public
    (health, reflection). `items` maps full methods to a function counting a request's items.
    Sits inside the exception-mapping interceptor, so refusals become status codes there; quota
    refusals also carry a `retry-after` trailer (seconds)."""

    def __init__(self, guard: Guard, scopes: Mapping[str, str | None],
                 items: Mapping[str, Callable[[Any], int]] | None = None) -> None:
        self.guard = guard
        self.scopes = dict(scopes)
        self.items = dict(items or {})

    def _scope(self, method: str) -> str | None:
        if method in self.scopes:
            return self.scopes[method]
        return self.scopes.get(method.lstrip("/").partition("/")[0])

    def _admit(self, method: str, request: Any, context: Any) -> tuple[Any, contextvars.Token | None]:
        """(the request, a context-var token to reset) - streamed requests are charged per message."""
        scope = self._scope(method)
        if scope is None or not self.guard.enabled:
            return request, None
        count = self.items.get(method)
        try:
            principal = self.guard.admit(context.invocation_metadata(), scope)
            if count is not None and not hasattr(request, "__aiter__"):
                self.guard.charge_items(principal, count(request))
        except QuotaExceeded as exc:
            context.set_trailing_metadata((("retry-after", f"{exc.retry_after_s:.3f}"),))
            raise
        if count is not None and hasattr(request, "__aiter__"):
            request = self._charged(request, principal, count)
        return request, _CURRENT.set(principal)

    async def _charged(self, requests: Any, principal: Principal | None, count: Callable[[Any], int]) -> Any:
        async for message in requests:
            self.guard.charge_items(principal, count(message))
            yield message

    async def around_unary(self, method, rpc_type, inner, request, context):  # type: ignore[override]
        request, token = self._admit(method, request, context)
        try:
            return await inner(request, context)
        finally:
            if token is not None:
                _CURRENT.reset(token)

    async def around_stream(self, method, rpc_type, inner, request, context):  # type: ignore[override]
        request, token = self._admit(method, request, context)
        try:
            async for item in super().around_stream(method, rpc_type, inner, request, context):
                yield item
        finally:
            if token is not None:
                _CURRENT.reset(token)


# -- HTTP (aiohttp) -----------------------------------------------------------------------------

def _principal_key() -> Any:
    from aiohttp import web

    return web.RequestKey("flywheel_principal", object)


PRINCIPAL_KEY = _principal_key()


def http_middleware(guard: Guard, scope_for: Callable[[Any], str | None],
                    items_for: Callable[[Any], int] | None = None) -> Callable[..., Awaitable[Any]]:
    """aiohttp middleware: `Authorization: Bearer <key>` checked against `scope_for(request)`
    (None: public route; a route with an `{api_key}` path segment takes the key from there when no
    header is sent), and `items_for(request)` items taken from the key's quota when the count
    is known from the route alone (otherwise the handler calls `charge_http_items` once it parsed
    the body). The principal is stored as request[PRINCIPAL_KEY]. Refusals are JSON errors: 401,
    403, or 429 with a Retry-After header."""
    from aiohttp import web

    from flywheel.runtime.http import error_response

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        scope = scope_for(request)
        if scope is not None and guard.enabled:
            try:
                credentials = list(request.headers.items())
                if "api_key" in request.match_info and "Authorization" not in request.headers:
                    # For clients that cannot set headers (RL frameworks take only a URL).
                    credentials.append(("authorization", f"Bearer {request.match_info['api_key']}"))
                request[PRINCIPAL_KEY] = guard.admit(credentials, scope)
                if items_for is not None:
                    guard.charge_items(request[PRINCIPAL_KEY], items_for(request))
            except (Unauthenticated, PermissionDenied, QuotaExceeded) as exc:
                return error_response(exc)
        return await handler(request)

    return middleware


def charge_http_items(guard: Guard, request: Any, n: int) -> None:
    """Take a request's items from the quota of the key the middleware admitted."""
    guard.charge_items(request.get(PRINCIPAL_KEY), n)
