"""HTTP/JSON APIs beside the gRPC ones (aiohttp): server lifecycle, errors, body limits, metrics.

The same domain exceptions as on gRPC (`runtime.errors`) become JSON bodies
`{"error": message, "code": "INVALID_ARGUMENT", "field": "items[0].prompt"}` with the HTTP status
of the gRPC code (INVALID_ARGUMENT 400, UNAUTHENTICATED 401, PERMISSION_DENIED 403, NOT_FOUND 404,
RESOURCE_EXHAUSTED 429 + Retry-After, UNAVAILABLE 503, DEADLINE_EXCEEDED 504). Unexpected
exceptions are 500 without internals. Bodies over the limit are refused (413) from Content-Length
before they are read; POST bodies must be application/json (415).
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any, Awaitable, Callable

import grpc
from aiohttp import web
from prometheus_client import Counter, Histogram

from flywheel.runtime.errors import FlywheelError, InvalidArgument, status_for

log = logging.getLogger(__name__)

HTTP_REQUESTS = Counter("flywheel_http_requests_total", "HTTP requests by service, route and status.",
                        ("service", "route", "status"))
HTTP_SECONDS = Histogram("flywheel_http_request_seconds", "HTTP request latency by service and route.",
                         ("service", "route"),
                         buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def error_response(exc: BaseException) -> web.Response:
    """The JSON error for `exc` (the HTTP twin of the gRPC exception mapping)."""
    code, message = status_for(exc)
    status = _HTTP_STATUS.get(code, 500)
    body: dict[str, Any] = {"error": message, "code": code.name}
    if isinstance(exc, InvalidArgument):
        body["field"] = exc.field
    headers = {}
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))  # RFC 9110: whole seconds
        body["retry_after_s"] = round(retry_after, 3)
    if status == 500:
        log.exception("HTTP handler failed", exc_info=exc)
    elif not isinstance(exc, FlywheelError):
        log.info("HTTP %s: %s", status, message)
    return web.json_response(body, status=status, headers=headers)


async def json_body(request: web.Request, max_bytes: int) -> Any:
    """The parsed JSON body: 415 unless application/json, 413 over `max_bytes` (from Content-Length,
    before reading; aiohttp's client_max_size stops chunked bodies), InvalidArgument if not JSON."""
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(
            text=json.dumps({"error": f"Content-Type must be application/json, got {request.content_type!r}",
                             "code": "INVALID_ARGUMENT", "field": "Content-Type"}), content_type="application/json")
    if request.content_length is not None and request.content_length > max_bytes:
        raise web.HTTPRequestEntityTooLarge(max_bytes, request.content_length, text=json.dumps(
            {"error": f"body of {request.content_length} bytes is over the limit of {max_bytes}",
             "code": "INVALID_ARGUMENT", "field": "body"}), content_type="application/json")
    raw = await request.read()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument("body", f"not valid JSON ({exc})") from None
    except RecursionError:
        raise InvalidArgument("body", "nested too deeply") from None


def error_middleware(service: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Maps exceptions to JSON errors and records per-route metrics; aiohttp's own errors (404,
    405, 413, 415) get the same JSON shape."""

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
        start = time.perf_counter()
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.content_type == "application/json":
                response = web.Response(status=exc.status, body=exc.body, content_type="application/json")
            else:
                reason = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
                response = web.json_response({"error": reason, "code": f"HTTP_{exc.status}"}, status=exc.status)
        except Exception as exc:  # noqa: BLE001 - the mapping point
            response = error_response(exc)
        HTTP_REQUESTS.labels(service, route, str(response.status)).inc()
        HTTP_SECONDS.labels(service, route).observe(time.perf_counter() - start)
        return response

    return middleware


class HttpServer:
    """An aiohttp application on its own port, started and stopped as a runtime worker."""

    def __init__(self, app: web.Application, host: str, port: int, name: str) -> None:
        self.app = app
        self.host = host
        self.requested_port = port
        self.name = name
        self.port: int | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.requested_port)
        await site.start()
        server = site._server  # aiohttp exposes the bound sockets only here
        self.port = server.sockets[0].getsockname()[1] if server and server.sockets else self.requested_port
        log.info("%s HTTP API on %s:%s", self.name, self.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
