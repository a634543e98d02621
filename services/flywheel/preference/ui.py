"""The rater/admin web UI: static assets from the package and a small JSON API, on its own port.

Sign-in exchanges a bearer token for a session: the cookie holds a random session id (HttpOnly,
SameSite=Strict, Secure under TLS); the server keeps only hashes of the session id and of the token
(in the tasks SQLite file, so sessions survive a restart and a page can resubmit). Every request
re-checks the token, so a revoked token ends its sessions on the next request. Every POST but
sign-in needs the session's CSRF token in `X-CSRF-Token`. The API calls the same servicer code as
gRPC (leases, validated idempotent ingestion), so both paths behave identically.

Nothing a model or rater wrote is ever inserted as HTML: the page builds text nodes only, and the
Content-Security-Policy allows scripts from this origin alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import sqlite3
import ssl
import threading
import time
from collections import deque
from importlib import resources
from typing import Any, Awaitable, Callable

from aiohttp import web

from flywheel.preference.aggregation import consensus
from flywheel.preference.auth import SCOPES, Principal, hash_token
from flywheel.runtime import FlywheelError, InvalidArgument, PermissionDenied, Unauthenticated, require
from flywheel.runtime.errors import status_for
from flywheel.v1 import common_pb2, preference_pb2

log = logging.getLogger(__name__)

COOKIE = "fw_session"
ASSETS = {"app.js": "text/javascript", "style.css": "text/css", "index.html": "text/html"}
_HTTP_STATUS = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404,
                "FAILED_PRECONDITION": 409, "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503,
                "DEADLINE_EXCEEDED": 504}
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; object-src 'none'; "
        "base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
_KINDS = {"rank": preference_pb2.TASK_KIND_RANK, "compare": preference_pb2.TASK_KIND_COMPARE,
          "demonstrate": preference_pb2.TASK_KIND_DEMONSTRATE, "": preference_pb2.TASK_KIND_UNSPECIFIED}
_KIND_NAMES = {v: k for k, v in _KINDS.items() if k}
_CHOICES = {"A": common_pb2.CHOICE_A, "B": common_pb2.CHOICE_B, "tie": common_pb2.CHOICE_TIE}
_REASONS = {"unsafe": preference_pb2.FLAG_REASON_UNSAFE, "nonsense": preference_pb2.FLAG_REASON_NONSENSE,
            "cannot_judge": preference_pb2.FLAG_REASON_CANNOT_JUDGE}


class Sessions:
    """Sessions by the sha256 of their id; the token is kept as its sha256 only."""

    def __init__(self, path, ttl_s: float) -> None:
        self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS ui_sessions (session_sha256 TEXT PRIMARY KEY, "
                         "token_sha256 TEXT NOT NULL, csrf TEXT NOT NULL, expires_at REAL NOT NULL)")
        self._lock = threading.Lock()
        self.ttl_s = ttl_s

    def create(self, token: str) -> tuple[str, str]:
        session_id, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        with self._lock:
            self._db.execute("DELETE FROM ui_sessions WHERE expires_at < ?", (time.time(),))
            self._db.execute("INSERT INTO ui_sessions VALUES (?, ?, ?, ?)",
                             (hash_token(session_id), hash_token(token), csrf, time.time() + self.ttl_s))
        return session_id, csrf

    def get(self, session_id: str) -> tuple[str, str] | None:
        """(token_sha256, csrf) of a live session."""
        with self._lock:
            row = self._db.execute("SELECT token_sha256, csrf, expires_at FROM ui_sessions WHERE session_sha256 = ?",
                                   (hash_token(session_id),)).fetchone()
        return (row[0], row[1]) if row and row[2] > time.time() else None

    def delete(self, session_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM ui_sessions WHERE session_sha256 = ?", (hash_token(session_id),))

    def close(self) -> None:
        self._db.close()


def _error(exc: BaseException) -> web.Response:
    code, message = status_for(exc)
    status = _HTTP_STATUS.get(code.name, 500)
    if status == 500:
        log.exception("web UI request failed", exc_info=exc)
    return web.json_response({"error": message, "code": code.name}, status=status)


class WebUI:
    """A BackgroundWorker of the preference runtime serving the UI on `preference_ui_port`."""

    def __init__(self, service) -> None:
        self.service = service
        settings = service.settings
        self.tls = bool(settings.tls_cert_file and settings.tls_key_file)
        self.sessions = Sessions(settings.tasks_db_path(), settings.preference_ui_session_ttl_s)
        self.coverage_history: deque[tuple[float, int, int]] = deque(maxlen=24 * 60)
        self._runner: web.AppRunner | None = None
        self._sampler: asyncio.Task | None = None
        self.port = 0
        self.app = self._build()

    # -- lifecycle -----------------------------------------------------------------------------
    def _build(self) -> web.Application:
        app = web.Application(middlewares=[self._headers], client_max_size=1024 * 1024)
        r = app.router
        for path in ("/", "/task", "/me", "/admin"):
            r.add_get(path, self._index)
        r.add_get("/static/{name}", self._asset)
        r.add_post("/api/login", self._login)
        routes: list[tuple[str, str, Callable[..., Awaitable[Any]], bool]] = [
            ("POST", "/api/logout", self._logout, False), ("GET", "/api/me", self._me, False),
            ("POST", "/api/lease", self._lease, False), ("POST", "/api/submit", self._submit, False),
            ("POST", "/api/release", self._release, False), ("POST", "/api/flag", self._flag, False),
            ("GET", "/api/admin/overview", self._overview, True), ("POST", "/api/admin/tokens", self._issue, True),
            ("POST", "/api/admin/revoke", self._revoke, True), ("POST", "/api/admin/gold", self._gold, True),
            ("GET", "/api/admin/prompt", self._prompt, True), ("POST", "/api/admin/export", self._export, True)]
        for method, path, handler, admin in routes:
            r.add_route(method, path, self._api(handler, admin))
        return app

    async def start(self) -> None:
        settings = self.service.settings
        if self.service.tokens is None:
            log.warning("web UI not started: it needs authentication (FLYWHEEL_PREFERENCE_AUTH_ENABLED)")
            return
        context = None
        if self.tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(settings.tls_cert_file), str(settings.tls_key_file))
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, settings.host, settings.preference_ui_port, ssl_context=context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._sampler = asyncio.ensure_future(self._sample_coverage())
        log.info("web UI on %s://%s:%d/", "https" if self.tls else "http", settings.host, self.port)

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        self.sessions.close()

    async def _sample_coverage(self) -> None:
        while True:
            covered, total = self.service.board.coverage()
            self.coverage_history.append((time.time(), covered, total))
            await asyncio.sleep(60)

    # -- plumbing ------------------------------------------------------------------------------
    @web.middleware
    async def _headers(self, request: web.Request, handler) -> web.StreamResponse:
        response = await handler(request)
        response.headers["Content-Security-Policy"] = _CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Cache-Control"] = "no-store"
        return response

    async def _index(self, request: web.Request) -> web.Response:
        return await self._asset(request, "index.html")

    async def _asset(self, request: web.Request, name: str | None = None) -> web.Response:
        name = name or request.match_info["name"]
        if name not in ASSETS:
            raise web.HTTPNotFound()
        body = resources.files("flywheel.preference").joinpath("ui_assets", name).read_bytes()
        return web.Response(body=body, content_type=ASSETS[name], charset="utf-8")

    def _principal(self, request: web.Request) -> tuple[Principal, str]:
        session_id = request.cookies.get(COOKIE, "")
        found = self.sessions.get(session_id) if session_id else None
        if found is None:
            raise Unauthenticated("you are not signed in (or your session ended); sign in with your token")
        token_sha256, csrf = found
        principal = self.service.tokens.lookup_hash(token_sha256)
        if principal is None:
            self.sessions.delete(session_id)
            raise Unauthenticated("your token was revoked; ask an admin for a new one")
        return principal, csrf

    def _api(self, handler, admin: bool):
        async def wrapped(request: web.Request) -> web.StreamResponse:
            try:
                principal, csrf = await asyncio.to_thread(self._principal, request)
                if request.method != "GET":
                    sent = request.headers.get("X-CSRF-Token", "")
                    if not hmac.compare_digest(sent.encode(), csrf.encode()):
                        raise PermissionDenied("this request lacks the page's CSRF token; reload the page")
                if admin and not principal.is_admin:
                    raise PermissionDenied("this needs an admin token")
                body = await request.json() if request.method == "POST" and request.can_read_body else {}
                if not isinstance(body, dict):
                    raise InvalidArgument("body", "must be a JSON object")
                result = await handler(principal, body, request)
                return result if isinstance(result, web.StreamResponse) else web.json_response(result)
            except FlywheelError as exc:
                return _error(exc)
            except ValueError as exc:  # malformed JSON
                return _error(InvalidArgument("body", f"not valid JSON ({exc})"))
            except Exception as exc:  # noqa: BLE001 - a plain message, never a stack trace
                return _error(exc)

        return wrapped

    def _cookie(self, request: web.Request, response: web.Response, value: str, max_age: float) -> None:
        # Secure whenever the browser speaks HTTPS: TLS here, or terminated by an ingress in front
        secure = self.tls or request.headers.get("X-Forwarded-Proto", "").lower() == "https"
        response.set_cookie(COOKIE, value, max_age=int(max_age), httponly=True, secure=secure, samesite="Strict",
                            path="/")

    # -- session -------------------------------------------------------------------------------
    async def _login(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            token = str(body.get("token", "")).strip() if isinstance(body, dict) else ""
            require(bool(token), "token", "required")
            principal = await asyncio.to_thread(self.service.tokens.lookup, token)
            if principal is None:
                raise Unauthenticated("that token is not valid (unknown or revoked)")
            session_id, csrf = await asyncio.to_thread(self.sessions.create, token)
        except FlywheelError as exc:
            return _error(exc)
        except ValueError as exc:
            return _error(InvalidArgument("body", f"not valid JSON ({exc})"))
        response = web.json_response({"rater_id": principal.rater_id, "scope": principal.scope, "csrf": csrf})
        self._cookie(request, response, session_id, self.sessions.ttl_s)
        return response

    async def _logout(self, principal, body, request) -> web.Response:
        self.sessions.delete(request.cookies.get(COOKIE, ""))
        response = web.json_response({"signed_out": True})
        self._cookie(request, response, "", 0)
        return response

    async def _me(self, principal: Principal, body, request) -> dict:
        _, csrf = self.sessions.get(request.cookies.get(COOKIE, "")) or ("", "")
        stats = await asyncio.to_thread(self._rater_rows, principal.rater_id)
        return {"rater_id": principal.rater_id, "scope": principal.scope, "csrf": csrf,
                "stats": stats[0] if stats else _public(_empty_row(principal.rater_id))}

    # -- tasks ---------------------------------------------------------------------------------
    async def _lease(self, principal: Principal, body: dict, request) -> dict:
        kind = _KINDS.get(str(body.get("kind", "")))
        require(kind is not None, "kind", "must be rank, compare or demonstrate")
        task = await self.service.servicer.lease(principal, principal.rater_id, kind)
        if not task.lease_id:
            return {"task": None}
        return {"task": {
            "lease_id": task.lease_id, "kind": _KIND_NAMES[task.kind], "prompt_id": task.prompt_id,
            "prompt_text": task.prompt_text, "policy_version": task.policy_version, "remaining": task.remaining,
            "expires_in_s": max(0.0, task.lease_expires_at.ToNanoseconds() / 1e9 - time.time()),
            "candidates": [{"response_id": c.response_id, "text": c.text} for c in task.candidates]}}

    async def _submit(self, principal: Principal, body: dict, request) -> dict:
        kind = body.get("kind")
        common = dict(event_id=str(body.get("event_id", "")), rater_id=principal.rater_id,
                      prompt_id=str(body.get("prompt_id", "")), lease_id=str(body.get("lease_id", "")),
                      lead_time_ms=int(body.get("lead_time_ms", 0) or 0))
        ids = body.get("response_ids") or []
        require(isinstance(ids, list), "response_ids", "must be a list")
        refs = [common_pb2.ResponseRef(response_id=str(i)) for i in ids]
        if kind == "rank":
            ranks = body.get("ranks") or []
            require(isinstance(ranks, list) and all(isinstance(r, int) for r in ranks), "ranks",
                    "must be whole numbers")
            event = common_pb2.PreferenceEvent(ranking=common_pb2.Ranking(responses=refs, ranks=ranks, **common))
        elif kind == "compare":
            require(len(refs) == 2, "response_ids", "a comparison needs exactly two responses")
            choice = _CHOICES.get(str(body.get("choice", "")))
            require(choice is not None, "choice", "must be A, B or tie")
            event = common_pb2.PreferenceEvent(comparison=common_pb2.Comparison(
                response_a=refs[0], response_b=refs[1], choice=choice, **common))
        elif kind == "demonstrate":
            event = common_pb2.PreferenceEvent(demonstration=common_pb2.Demonstration(
                response_text=str(body.get("text", "")), **common))
        else:
            raise InvalidArgument("kind", "must be rank, compare or demonstrate")
        servicer = self.service.servicer
        servicer._check_ready()
        lease = self.service.board._leases.get(common["lease_id"])
        late = lease is None or time.time() > lease.expires_at
        [(event_id, duplicate)] = await servicer._ingest([event], [""], principal)
        return {"event_id": event_id, "duplicate": duplicate, "late": bool(common["lease_id"]) and late}

    async def _release(self, principal: Principal, body: dict, request) -> dict:
        lease_id = str(body.get("lease_id", ""))
        require(bool(lease_id), "lease_id", "required")
        self.service.board.release(lease_id, principal.rater_id)
        return {"released": True}

    async def _flag(self, principal: Principal, body: dict, request) -> dict:
        reason = _REASONS.get(str(body.get("reason", "")))
        require(reason is not None, "reason", "must be unsafe, nonsense or cannot_judge")
        flag_id = await asyncio.to_thread(self.service.board.flag, str(body.get("lease_id", "")), principal.rater_id,
                                          str(body.get("response_id", "")), reason, str(body.get("note", "")))
        return {"flag_id": flag_id}

    # -- statistics ----------------------------------------------------------------------------
    def _rater_rows(self, only: str | None = None) -> list[dict]:
        """Per rater: judgements, agreement with the consensus, gold accuracy, weight, flags, late."""
        svc = self.service
        store, engine, board = svc.store, svc.engine, svc.board
        last = engine._last
        scores: dict[str, float] = {}
        if last is not None:
            for c in consensus(last.problem, last.result):
                scores.update(zip(c.response_ids, c.scores))
        j = store.judgements()
        rows: dict[str, dict] = {}
        for rater, winner, loser, tie in zip(j.rater_id, j.winner_id, j.loser_id, j.tie):
            if only is not None and rater != only:
                continue
            row = rows.setdefault(rater, _empty_row(rater))
            row["judgements"] += 1
            if not tie and winner in scores and loser in scores and scores[winner] != scores[loser]:
                row["_agree"] += int(scores[winner] > scores[loser])
                row["_scored"] += 1
        for rater, (correct, total) in board.gold_counts().items():
            if only is None or rater == only:
                rows.setdefault(rater, _empty_row(rater)).update(gold_correct=correct, gold_total=total)
        for flag in board.db.flags():
            if only is None or flag[1] == only:
                rows.setdefault(flag[1], _empty_row(flag[1]))["flags"] += 1
        for rater, counts in list(board.counts.items()):
            if only is None or rater == only:
                rows.setdefault(rater, _empty_row(rater)).update(late=counts.late, released=counts.released,
                                                                 completed_here=counts.completed)
        for rater, row in rows.items():
            row["weight"] = engine.rater_weights.get(rater)
            row["agreement"] = row["_agree"] / row["_scored"] if row["_scored"] else None
            row["gold_accuracy"] = row["gold_correct"] / row["gold_total"] if row["gold_total"] else None
        return sorted((_public(r) for r in rows.values()), key=lambda r: r["rater_id"])

    async def _overview(self, principal, body, request) -> dict:
        svc = self.service
        covered, total = svc.board.coverage()
        self.coverage_history.append((time.time(), covered, total))
        now = time.time()
        per_hour = [0] * 24
        for _, _, stored_at in await asyncio.to_thread(svc.store.judgements_since, now - 24 * 3600):
            per_hour[min(23, int((now - stored_at) // 3600))] += 1
        tokens = await asyncio.to_thread(svc.tokens.list)
        return {"queue_depth": svc.board.queue_depth(), "judgements_per_hour": per_hour[::-1],
                "raters": await asyncio.to_thread(self._rater_rows),
                "tokens": [{"prefix": t.token_prefix, "rater_id": t.rater_id, "scope": t.scope,
                            "revoked": t.revoked_at is not None, "label": t.label} for t in tokens],
                "coverage": [{"t": t, "covered": c, "total": n} for t, c, n in self.coverage_history],
                "live_leases": len(svc.board.live_leases())}

    # -- admin actions -------------------------------------------------------------------------
    async def _issue(self, principal, body: dict, request) -> dict:
        rater_id, scope = str(body.get("rater_id", "")).strip(), str(body.get("scope", "rater"))
        require(bool(rater_id) and rater_id.isprintable() and len(rater_id) <= 128, "rater_id",
                "required, printable, at most 128 characters")
        require(scope in SCOPES, "scope", f"must be one of {', '.join(SCOPES)}")
        token = await asyncio.to_thread(self.service.tokens.issue, rater_id, scope=scope, label="web-ui")
        return {"rater_id": rater_id, "scope": scope, "token": token}

    async def _revoke(self, principal, body: dict, request) -> dict:
        rater_id = str(body.get("rater_id", "")).strip()
        require(bool(rater_id), "rater_id", "required")
        return {"revoked": await asyncio.to_thread(self.service.tokens.revoke_rater, rater_id)}

    async def _prompt(self, principal, body, request) -> dict:
        prompt_id = request.query.get("prompt_id", "")
        require(bool(prompt_id), "prompt_id", "required")
        rows = [r for r in await asyncio.to_thread(self.service.store.rollout_responses) if r[0] == prompt_id]
        known = self.service.store.responses([r[1] for r in rows])
        return {"prompt_id": prompt_id, "prompt_text": self.service.store.prompt_texts([prompt_id]).get(prompt_id, ""),
                "responses": [{"response_id": r[1], "policy_version": r[2], "text": known[r[1]].text}
                              for r in rows if r[1] in known]}

    async def _gold(self, principal, body: dict, request) -> dict:
        ids, ranks = body.get("response_ids") or [], body.get("ranks") or []
        require(isinstance(ids, list), "response_ids", "must be a list")
        require(isinstance(ranks, list) and all(isinstance(r, int) for r in ranks), "ranks", "must be whole numbers")
        await asyncio.to_thread(self.service.board.mark_gold, str(body.get("prompt_id", "")), [str(i) for i in ids],
                                ranks)
        return {"gold": True}

    async def _export(self, principal, body: dict, request) -> dict:
        fmt = {"jsonl": preference_pb2.DATASET_FORMAT_JSONL, "parquet": preference_pb2.DATASET_FORMAT_PARQUET}.get(
            str(body.get("format", "jsonl")))
        require(fmt is not None, "format", "must be jsonl or parquet")
        svc = self.service.servicer
        svc._check_ready()
        export, _ = await asyncio.to_thread(svc._export, str(self.service.settings.export_dir()),
                                            {1: "jsonl", 2: "parquet"}[fmt], 0.0)
        return {"dataset_version": export.dataset_version, "pairs_uri": export.pairs_uri,
                "demonstrations_uri": export.demonstrations_uri, "num_pairs": export.num_pairs,
                "num_demonstrations": export.num_demonstrations}


def _empty_row(rater: str) -> dict:
    return {"rater_id": rater, "judgements": 0, "gold_correct": 0, "gold_total": 0, "flags": 0, "late": 0,
            "released": 0, "completed_here": 0, "weight": None, "agreement": None, "gold_accuracy": None,
            "_agree": 0, "_scored": 0}


def _public(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}
