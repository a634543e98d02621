"""Bounded waits for tests: poll a condition until it holds or a deadline passes.

Tests never sleep a fixed time to "let something happen"; they wait for the observable event with
`wait_until` (threads) or `await wait_until_async` (asyncio), which fail with a message saying what
was awaited and the last value seen.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout_s: float = 30.0, interval_s: float = 0.05,
               what: str = "condition", alive: Callable[[], object] | None = None) -> T:
    """Call `condition` until it returns something truthy; return that value.

    Exceptions raised by `condition` count as "not yet" (the last one is reported on timeout).
    `alive`, called before each try, fails the wait at once by raising (e.g. asserting that the
    process being waited for has not exited), instead of at the timeout.
    """
    deadline = time.monotonic() + timeout_s
    last: object = None
    while True:
        if alive is not None:
            alive()
        try:
            value = condition()
            if value:
                return value
            last = value
        except Exception as exc:  # noqa: BLE001 - a not-yet-ready resource often raises
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:.1f}s waiting for {what}; last: {last!r}")
        time.sleep(interval_s)


async def wait_until_async(condition: Callable[[], T | Awaitable[T]], timeout_s: float = 30.0,
                           interval_s: float = 0.05, what: str = "condition") -> T:
    """Async twin of `wait_until`; `condition` may be a plain or an async callable."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while True:
        try:
            value = condition()
            if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
                value = await value
            if value:
                return value
            last = value
        except Exception as exc:  # noqa: BLE001
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:.1f}s waiting for {what}; last: {last!r}")
        await asyncio.sleep(interval_s)
