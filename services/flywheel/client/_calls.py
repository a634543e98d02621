"""What every client shares: channels (TLS or not), the API key, deadlines, and retries.

Retries cover UNAVAILABLE (server starting, restarting, unreachable) and RESOURCE_EXHAUSTED
(queue full, or the key's quota: the server's `retry-after` trailer is honoured) with capped
exponential backoff; every attempt has its own deadline. All Flywheel write RPCs are idempotent
(event ids, item ids), so a retried call never counts twice.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

import grpc
from grpc import aio

from flywheel.runtime.client import API_KEY_ENV, channel_options

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


@dataclass(frozen=True)
class ClientOptions:
    """`api_key`: None reads $FLYWHEEL_API_KEY ("" sends none). `tls`: system roots unless
    `root_certificates` (PEM) is given. `timeout_s`: deadline of one attempt."""

    api_key: str | None = None
    tls: bool = False
    root_certificates: bytes | None = None
    timeout_s: float = 10.0
    retries: int = 3
    backoff_s: float = 0.1
    max_backoff_s: float = 5.0

    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        key = self.api_key if self.api_key is not None else os.environ.get(API_KEY_ENV, "")
        return (("authorization", f"Bearer {key}"),) if key else None

    def credentials(self) -> grpc.ChannelCredentials | None:
        if self.tls or self.root_certificates is not None:
            return grpc.ssl_channel_credentials(self.root_certificates)
        return None


def blocking_channel(target: str, options: ClientOptions) -> grpc.Channel:
    creds = options.credentials()
    opts = channel_options(retries=False)  # ours, below: they honour retry-after
    return grpc.secure_channel(target, creds, options=opts) if creds else grpc.insecure_channel(target, options=opts)


def async_channel(target: str, options: ClientOptions) -> aio.Channel:
    creds = options.credentials()
    opts = channel_options(retries=False)
    return aio.secure_channel(target, creds, options=opts) if creds else aio.insecure_channel(target, options=opts)


def _retry_delay(exc: grpc.RpcError, delay: float, options: ClientOptions) -> float | None:
    """Seconds to wait before the next attempt, or None when the error is final."""
    if exc.code() not in RETRYABLE:
        return None
    trailers = dict(exc.trailing_metadata() or ())
    hint = trailers.get("retry-after")
    wait = float(hint) if hint else delay
    return min(wait, options.max_backoff_s) * (1 + 0.1 * random.random())


def call(method: Callable[..., Any], request: Any, options: ClientOptions, timeout_s: float | None = None) -> Any:
    delay = options.backoff_s
    for attempt in range(options.retries + 1):
        try:
            return method(request, timeout=timeout_s or options.timeout_s, metadata=options.metadata())
        except grpc.RpcError as exc:
            wait = _retry_delay(exc, delay, options)
            if wait is None or attempt == options.retries:
                raise
            time.sleep(wait)
            delay = min(delay * 2, options.max_backoff_s)
    raise AssertionError("unreachable")  # pragma: no cover


async def acall(method: Callable[..., Any], request: Any, options: ClientOptions,
                timeout_s: float | None = None) -> Any:
    delay = options.backoff_s
    for attempt in range(options.retries + 1):
        try:
            return await method(request, timeout=timeout_s or options.timeout_s, metadata=options.metadata())
        except aio.AioRpcError as exc:
            wait = _retry_delay(exc, delay, options)
            if wait is None or attempt == options.retries:
                raise
            await asyncio.sleep(wait)
            delay = min(delay * 2, options.max_backoff_s)
    raise AssertionError("unreachable")  # pragma: no cover
