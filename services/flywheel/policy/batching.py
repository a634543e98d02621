"""Async request batching in front of the engine.

Concurrent requests are gathered (for `batch_wait_ms` when the engine is idle; while a batch runs
new requests simply accumulate), padded into one batch of up to `max_batch_size` sequences and
decoded together on a single engine thread. The queue is bounded (`Overloaded` ->
RESOURCE_EXHAUSTED), deadlines are honoured (expired requests never reach the engine; rows whose
caller gave up are dropped from the running batch at the next step) and streaming callers get
every token as soon as it is sampled.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator

from flywheel.policy import metrics
from flywheel.policy.engine import PolicyEngine, Sequence_, generate_batch
from flywheel.runtime.errors import DeadlineExceeded, NotReady, Overloaded

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Request:
    seqs: list[Sequence_]
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
    batches: int = 0
    sequences: int = 0
    tokens: int = 0
    max_batch: int = 0
    batch_sizes: list[int] = field(default_factory=list)


class Batcher:
    def __init__(self, engine: PolicyEngine, *, max_batch_size: int = 32, batch_wait_ms: float = 5.0,
                 max_queue: int = 512) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.max_queue = max_queue
        self.stats = _Stats()
        self._queue: collections.deque[tuple[_Request, Sequence_]] = collections.deque()
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
        while self._queue:
            request, _ = self._queue.popleft()
            request.finish(NotReady("the policy engine is shutting down"))
        metrics.QUEUE_DEPTH.set(0)
        await asyncio.to_thread(self._executor.shutdown, True)

    @property
    def queued(self) -> int:
        return len(self._queue)

    # -- submission ------------------------------------------------------------------------------
    async def _admit(self, seqs: list[Sequence_], timeout: float | None, *, block: bool,
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
        for s in seqs:
            self._queue.append((request, s))
        metrics.QUEUE_DEPTH.set(self.queued)
        self._wakeup.set()
        return request

    async def generate(self, seqs: list[Sequence_], *, timeout: float | None = None,
                       block: bool = False) -> list[Sequence_]:
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

    async def stream(self, seq: Sequence_, *, timeout: float | None = None) -> AsyncIterator[tuple[int, float]]:
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
    def _take_batch(self) -> list[tuple[_Request, Sequence_]]:
        batch: list[tuple[_Request, Sequence_]] = []
        now = time.monotonic()
        while self._queue and len(batch) < self.max_batch_size:
            request, seq = self._queue.popleft()
            if request.gone or request.future.done():
                continue
            if request.deadline is not None and now >= request.deadline:
                request.give_up()
                request.finish(DeadlineExceeded("deadline exceeded before generation started"))
                continue
            batch.append((request, seq))
        metrics.QUEUE_DEPTH.set(self.queued)
        assert self._space is not None
        self._space.set()
        return batch

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
            batch = self._take_batch()
            if not batch:
                continue
            owners = {id(seq): request for request, seq in batch}
            seqs = [seq for _, seq in batch]
            policy = self.engine.current  # one version for the whole batch; swaps apply to the next

            def on_step(events: list[tuple[Sequence_, int, float]]) -> None:
                loop.call_soon_threadsafe(self._deliver, events, owners)

            def run() -> None:
                with self.engine.lock:
                    generate_batch(policy, seqs, on_step)

            started = time.perf_counter()
            try:
                await loop.run_in_executor(self._executor, run)
            except asyncio.CancelledError:
                for request, _ in batch:
                    request.give_up()
                raise
            except Exception as exc:  # noqa: BLE001 - fail this batch's requests, keep serving
                log.exception("generation batch of %d sequences failed", len(batch))
                for request, _ in batch:
                    request.finish(exc)
                continue
            elapsed = time.perf_counter() - started
            tokens = sum(len(s.token_ids) for s in seqs)
            self.stats.batches += 1
            self.stats.sequences += len(seqs)
            self.stats.tokens += tokens
            self.stats.max_batch = max(self.stats.max_batch, len(seqs))
            metrics.BATCH_SIZE.observe(len(seqs))
            metrics.BATCH_SECONDS.observe(elapsed)
            metrics.GENERATED_TOKENS.inc(tokens)
            if elapsed > 0:
                metrics.TOKENS_PER_SECOND.set(tokens / elapsed)
            for request, _ in batch:
                request.pending -= 1
                if request.pending == 0:
                    request.finish()

    def _deliver(self, events: list[tuple[Sequence_, int, float]], owners: dict[int, _Request]) -> None:
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
