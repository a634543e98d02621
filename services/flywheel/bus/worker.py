"""The one threaded consumer loop: every Kafka consumer in Flywheel runs on a `ConsumerThread`.

    step() (poll -> handle -> dead-letter rejects -> commit)   until stop()
      raised?  -> count a handler failure, recover() (rewind: nothing committed), back off
               (exponential, capped), try again
      then     -> refresh the lag gauge (its own failures are logged as such, never as handler
               failures)

Subclasses say what one step is: `ConsumerWorker` runs a batch handler over each poll (policy,
reward, the loop's raters); the trainer buffers polls into PPO batches; preference's followers
replay topics into their store. All of them export the same bus metrics (consumed, handler
failures, lag) under (topic, group), start and stop the same way, and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Generic, TypeVar

from google.protobuf.message import Message

from flywheel.bus import metrics
from flywheel.bus.consumer import BatchHandler, TypedConsumer

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)


class ConsumerThread:
    """Runs `step()` on a daemon thread with retry/backoff; a runtime `BackgroundWorker`."""

    def __init__(self, *, name: str, topic: str, group: str, retry_backoff_s: float = 1.0,
                 max_backoff_s: float = 30.0, stop_timeout_s: float = 60.0) -> None:
        self.name = name
        self.labels = (topic, group)
        self._retry_backoff_s = retry_backoff_s
        self._max_backoff_s = max_backoff_s
        self._stop_timeout_s = stop_timeout_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failures = 0
        self.leave_group_on_close = False  # set by a clean shutdown (stop), not by a crash

    # -- what subclasses provide -------------------------------------------------------------
    def step(self) -> None:
        """One poll/handle/commit cycle. Raise on a transient failure (nothing committed)."""
        raise NotImplementedError

    def recover(self) -> None:
        """After a failed step: make the next step see the uncommitted records again."""

    def lag(self) -> int | None:
        """Records behind the partition ends (None: unknown)."""
        return None

    def close(self) -> None:
        """Release the Kafka client (on the loop's thread, after the last step)."""

    # -- the loop ----------------------------------------------------------------------------
    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        """The loop; returns when stop() is called."""
        backoff = self._retry_backoff_s
        while not self._stop.is_set():
            try:
                self.step()
                backoff = self._retry_backoff_s
            except Exception:  # noqa: BLE001 - transient: retry what was not committed
                self.failures += 1
                metrics.HANDLER_FAILURES.labels(*self.labels).inc()
                log.exception("%s: handler failed; retrying in %.1fs", self.name, backoff)
                try:
                    self.recover()
                except Exception:  # noqa: BLE001 - e.g. the broker is down: next round
                    log.exception("%s: recovery failed; retrying", self.name)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self._max_backoff_s)
                continue
            self._observe_lag()

    def _observe_lag(self) -> None:
        try:
            lag = self.lag()
        except Exception as exc:  # noqa: BLE001 - a metric, not the handler: keep consuming
            log.debug("%s: consumer lag unavailable: %s", self.name, exc)
            return
        if lag is not None:
            metrics.CONSUMER_LAG.labels(*self.labels).set(lag)

    def _run_then_close(self) -> None:
        try:
            self.run()
        finally:
            try:
                self.close()
            except Exception:  # noqa: BLE001
                log.exception("%s: close failed", self.name)

    # BackgroundWorker protocol (see flywheel.runtime.server)
    async def start(self) -> None:
        self.start_thread()

    def start_thread(self) -> None:
        """start() for callers without an event loop."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run_then_close, name=self.name, daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        self._stop.set()

    async def stop(self) -> None:
        """Clean shutdown: finish the step in progress, close, leave the group (bounded wait)."""
        self.leave_group_on_close = True
        self.request_stop()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, self._stop_timeout_s)
            if self._thread.is_alive():
                log.error("%s did not stop within %.0fs; abandoning it", self.name, self._stop_timeout_s)

    def join(self, timeout_s: float) -> bool:
        """Thread-side variant of stop() for callers without an event loop; True once stopped."""
        self.leave_group_on_close = True
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout_s)
            return not self._thread.is_alive()
        return True


class ConsumerWorker(ConsumerThread, Generic[M]):
    """Runs `handler` over a topic: poll -> handle (per unit) -> dead-letter rejects -> commit.

    With `commit_every`, a poll is handled in units of that many records (in poll order, so in
    offset order per partition) and each unit is committed as soon as it is done: a crash replays
    at most one unit. Without it, the whole poll is one unit.
    """

    def __init__(self, consumer: TypedConsumer[M], handler: BatchHandler[M], *, name: str | None = None,
                 poll_timeout_ms: int = 500, retry_backoff_s: float = 1.0, max_backoff_s: float = 30.0,
                 commit_every: int | None = None, stop_timeout_s: float = 60.0) -> None:
        super().__init__(name=name or f"{consumer.topic.name}/{consumer.group_id}", topic=consumer.topic.name,
                         group=consumer.group_id, retry_backoff_s=retry_backoff_s, max_backoff_s=max_backoff_s,
                         stop_timeout_s=stop_timeout_s)
        self.consumer = consumer
        self.handler = handler
        self._poll_timeout_ms = poll_timeout_ms
        self._commit_every = commit_every
        self.handled = 0

    def run_once(self) -> int:
        """One poll/handle/commit cycle. Returns the number of deliveries handled.

        Raises whatever the handler raised, after rewinding (units already finished stay committed).
        """
        batch = self.consumer.poll(timeout_ms=self._poll_timeout_ms)
        if not batch:
            self.consumer.commit()  # records that were all poison are committed past
            return 0
        unit = self._commit_every or len(batch)
        for start in range(0, len(batch), unit):
            chunk = batch[start:start + unit]
            began = time.perf_counter()
            try:
                rejections = list(self.handler(chunk) or [])
            except Exception:
                self.consumer.rewind()
                raise
            for rejection in rejections:
                self.consumer.dead_letter(rejection)
            self.consumer.commit_through(chunk)
            metrics.HANDLE_SECONDS.labels(*self.labels).observe(time.perf_counter() - began)
            metrics.CONSUMED.labels(*self.labels).inc(len(chunk))
            self.handled += len(chunk)
        self.consumer.commit()  # poison records after the last delivery
        return len(batch)

    def step(self) -> None:
        self.run_once()

    def recover(self) -> None:
        self.consumer.rewind()

    def lag(self) -> int:
        return self.consumer.lag()

    def close(self) -> None:
        self.consumer.close(leave_group=self.leave_group_on_close)
