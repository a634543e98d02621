"""Async request batching in front of the engine (continuous batching).

Concurrent requests are gathered (for `batch_wait_ms` when the engine is idle), padded into one
batch of up to `max_batch_size` sequences and decoded together on a single engine thread. While a
batch runs, queued sequences join it at the next step boundary (one batched prefill, then merged)
and finished ones leave it, so the engine never waits for a batch's longest row. A running batch
stays on the policy version it started with: after a hot swap it stops admitting rows, drains, and
the next batch starts on the new version (every row is produced by exactly one version).
The queue is bounded (`Overloaded` -> RESOURCE_EXHAUSTED), deadlines are honoured (expired
requests never reach the engine; rows whose caller gave up leave the batch at the next step) and
streaming callers get every token as soon as it is sampled.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator

from flywheel.policy import metrics
from flywheel.policy.decode import DecodeBatch, Generation
from flywheel.policy.engine import PolicyEngine
from flywheel.runtime.errors import DeadlineExceeded, NotReady, Overloaded

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Request:
    seqs: list[Generation]
    future: asyncio.Future
    submitted: float
    deadline: float | None
    stream: asyncio.Queue | None = None
    pending: int = 0
    first_token_at: float | None = None
    gone: bool = False  # caller stopped waiting (deadline, cancellation)

    def give_up(self) -> None:
        self.gone = True
        for s in self.seqs:
            s.cancelled = True

    def finish(self, exc: BaseException | None = None) -> None:
        if not self.future.done():
            if exc is None:
                self.future.set_result(self.seqs)
            else:
                self.future.set_exception(exc)
                self.future.exception()  # mark retrieved: the caller may be gone
        if self.stream is not None:
            self.stream.put_nowait(None)


@dataclass
class _Stats:
    batches: int = 0  # decode batches started (a batch lives while rows keep joining it)
    steps: int = 0
    sequences: int = 0
    tokens: int = 0
    max_batch: int = 0  # most rows decoded in one step


class Batcher:
    def __init__(self, engine: PolicyEngine, *, max_batch_size: int = 32, batch_wait_ms: float = 5.0,
                 max_queue: int = 512) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.max_queue = max_queue
        self.stats = _Stats()
        self._queue: collections.deque[tuple[_Request, Generation]] = collections.deque()
        self._queue_lock = threading.Lock()  # the engine thread pops while the loop appends
        self._rate_window = (time.perf_counter(), 0)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy-engine")
        self._wakeup: asyncio.Event | None = None
        self._space: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------------
    def _ensure_started(self) -> None:
        if self._closed:
            raise NotReady("the policy engine is shutting down")
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._wakeup = asyncio.Event()
            self._space = asyncio.Event()
            self._task = self._loop.create_task(self._run(), name="policy-batcher")

    async def start(self) -> None:
        self._ensure_started()

    async def stop(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        with self._queue_lock:
            pending = list(self._queue)
            self._queue.clear()
        for request, _ in pending:
            request.give_up()
            request.finish(NotReady("the policy engine is shutting down"))
        metrics.QUEUE_DEPTH.set(0)
        await asyncio.to_thread(self._executor.shutdown, True)

    @property
    def queued(self) -> int:
        return len(self._queue)

    # -- submission ------------------------------------------------------------------------------
    async def _admit(self, seqs: list[Generation], timeout: float | None, *, block: bool,
                     stream: bool) -> _Request:
        self._ensure_started()
        assert self._space is not None and self._wakeup is not None
        now = time.monotonic()
        deadline = now + timeout if timeout is not None else None
        while self.queued + len(seqs) > self.max_queue and self.queued > 0:
            if not block:
                metrics.REQUESTS.labels("overloaded").inc()
                raise Overloaded(f"policy queue is full ({self.queued} sequences waiting, limit {self.max_queue})")
            self._space.clear()
            await self._space.wait()
        loop = asyncio.get_running_loop()
        request = _Request(seqs=seqs, future=loop.create_future(), submitted=now, deadline=deadline,
                           stream=asyncio.Queue() if stream else None, pending=len(seqs))
        with self._queue_lock:
            for s in seqs:
                self._queue.append((request, s))
        metrics.QUEUE_DEPTH.set(self.queued)
        self._wakeup.set()
        return request

    async def generate(self, seqs: list[Generation], *, timeout: float | None = None,
                       block: bool = False) -> list[Generation]:
        """Generate all `seqs` (possibly across batches); returns them filled in.

        block=True waits for queue space instead of failing with Overloaded (internal callers such
        as the Kafka worker, which must not drop work).
        """
        request = await self._admit(seqs, timeout, block=block, stream=False)
        try:
            result = await asyncio.wait_for(asyncio.shield(request.future), timeout)
        except asyncio.TimeoutError:
            request.give_up()
            self._observe(request, "deadline_exceeded")
            raise DeadlineExceeded("deadline exceeded while generating") from None
        except asyncio.CancelledError:
            request.give_up()
            self._observe(request, "cancelled")
            raise
        except Exception:
            self._observe(request, "error")
            raise
        self._observe(request, "ok")
        return result

    async def stream(self, seq: Generation, *, timeout: float | None = None) -> AsyncIterator[tuple[int, float]]:
        """Yield (token id, logprob) as they are sampled; on return `seq` holds the full result."""
        request = await self._admit([seq], timeout, block=False, stream=True)
        assert request.stream is not None
        outcome = "cancelled"
        try:
            while True:
                remaining = None if request.deadline is None else request.deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise asyncio.TimeoutError
                item = await asyncio.wait_for(request.stream.get(), remaining)
                if item is None:
                    request.future.result()  # raises if the batch failed
                    outcome = "ok"
                    return
                yield item
        except asyncio.TimeoutError:
            outcome = "deadline_exceeded"
            raise DeadlineExceeded("deadline exceeded while streaming") from None
        except Exception:
            outcome = "error"
            raise
        finally:
            if outcome != "ok":
                request.give_up()
            self._observe(request, outcome)

    @staticmethod
    def _observe(request: _Request, outcome: str) -> None:
        metrics.REQUESTS.labels(outcome).inc()
        metrics.REQUEST_LATENCY.labels(outcome).observe(time.monotonic() - request.submitted)

    # -- the batch loop --------------------------------------------------------------------------
    def _pop(self, room: int) -> list[tuple[_Request, Generation]]:
        """Engine thread: up to `room` live queued sequences (expired requests are failed on the loop)."""
        assert self._loop is not None
        taken: list[tuple[_Request, Generation]] = []
        expired: list[_Request] = []
        now = time.monotonic()
        with self._queue_lock:
            while self._queue and len(taken) < room:
                request, seq = self._queue.popleft()
                if request.gone or request.future.done():
                    continue
                if request.deadline is not None and now >= request.deadline:
                    request.give_up()
                    expired.append(request)
                    continue
                taken.append((request, seq))
        if taken or expired:
            self._loop.call_soon_threadsafe(self._popped, expired)
        return taken

    def _popped(self, expired: list[_Request]) -> None:
        for request in expired:
            request.finish(DeadlineExceeded("deadline exceeded before generation started"))
        metrics.QUEUE_DEPTH.set(self.queued)
        assert self._space is not None
        self._space.set()

    def _drive(self) -> None:
        """Engine thread: decode until there is no work left, admitting queued rows between steps."""
        assert self._loop is not None
        loop = self._loop
        owners: dict[int, _Request] = {}
        batch: DecodeBatch | None = None

        def on_step(events: list[tuple[Generation, int, float]]) -> None:
            loop.call_soon_threadsafe(self._deliver, events, dict(owners))

        while True:
            if self._closed and batch is not None:  # shutting down: retire every row at the next step
                for seq in batch.rows:
                    seq.cancelled = True
            current = self.engine.current
            if not self._closed and (batch is None or (batch.policy is current and len(batch) < self.max_batch_size)):
                room = self.max_batch_size - (len(batch) if batch is not None else 0)
                taken = self._pop(room)
                if taken:
                    if batch is None:
                        batch = DecodeBatch(current)
                        self.stats.batches += 1
                    for request, seq in taken:
                        owners[id(seq)] = request
                    self.stats.sequences += len(taken)
                    try:
                        with self.engine.lock:
                            done = batch.add([seq for _, seq in taken])
                    except Exception as exc:  # noqa: BLE001 - fail the joining requests, keep the batch
                        log.exception("prefill of %d sequences failed", len(taken))
                        for request, seq in taken:
                            owners.pop(id(seq), None)
                            loop.call_soon_threadsafe(request.finish, exc)
                        done = []
                    if done:
                        loop.call_soon_threadsafe(self._rows_done, done, [owners.pop(id(s)) for s in done])
            if batch is None or not batch:
                return
            started = time.perf_counter()
            rows = len(batch)
            try:
                with self.engine.lock:
                    finished = batch.step(on_step)
            except Exception as exc:  # noqa: BLE001 - fail this batch's requests, keep serving
                log.exception("decode step of %d sequences failed", rows)
                for seq in batch.rows:
                    request = owners.pop(id(seq), None)
                    if request is not None:
                        loop.call_soon_threadsafe(request.finish, exc)
                batch = None
                continue
            self._observe_step(rows, time.perf_counter() - started)
            if finished:
                loop.call_soon_threadsafe(self._rows_done, finished, [owners.pop(id(s)) for s in finished])
            if not batch:
                batch = None

    def _observe_step(self, rows: int, seconds: float) -> None:
        self.stats.steps += 1
        self.stats.tokens += rows
        self.stats.max_batch = max(self.stats.max_batch, rows)
        metrics.BATCH_SIZE.observe(rows)
        metrics.STEP_SECONDS.observe(seconds)
        metrics.GENERATED_TOKENS.inc(rows)
        window_start, window_tokens = self._rate_window
        window_tokens += rows
        now = time.perf_counter()
        if now - window_start >= 1.0:
            metrics.TOKENS_PER_SECOND.set(window_tokens / (now - window_start))
            self._rate_window = (now, 0)
        else:
            self._rate_window = (window_start, window_tokens)

    def _rows_done(self, seqs: list[Generation], requests: list[_Request]) -> None:
        for request in requests:
            request.pending -= 1
            if request.pending == 0:
                request.finish()

    async def _run(self) -> None:
        assert self._wakeup is not None and self._loop is not None
        loop = self._loop
        while True:
            await self._wakeup.wait()
            if not self._queue:
                self._wakeup.clear()
                continue
            if self.queued < self.max_batch_size and self.batch_wait_s > 0:
                await asyncio.sleep(self.batch_wait_s)  # gather concurrent arrivals on an idle engine
            try:
                await loop.run_in_executor(self._executor, self._drive)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - _drive handles its own failures; never stop serving
                log.exception("policy engine loop failed")
            metrics.TOKENS_PER_SECOND.set(0)

    def _deliver(self, events: list[tuple[Generation, int, float]], owners: dict[int, _Request]) -> None:
        now = time.monotonic()
        for seq, token, logprob in events:
            request = owners.get(id(seq))
            if request is None or request.gone:
                continue
            if request.first_token_at is None:
                request.first_token_at = now
                metrics.TIME_TO_FIRST_TOKEN.observe(now - request.submitted)
            if request.stream is not None:
                request.stream.put_nowait((token, logprob))
