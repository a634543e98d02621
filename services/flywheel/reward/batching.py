"""Dynamic batching: concurrent scoring requests share one forward pass.

Requests (each a list of (prompt, response) items) wait in a bounded queue. One collector task
takes queued requests until the batch holds `max_batch_size` items or the wait budget is spent,
then runs the scorer once on a dedicated thread (torch work never blocks the event loop) and hands
each request its slice of the results. While a forward pass runs, the next batch fills up.

The wait budget is `max_wait_s`, counted from the later of the oldest item's arrival and the end
of the previous forward pass, and, when the previous batch served several requests, at least
`wait_fraction` of that pass's duration. Without this, closed-loop clients (each sends its next
request when the previous one returns) split into cohorts that alternate between forward passes:
the requests answered by pass k come back while pass k+1 runs on the rest, and batches stay small
for ever. Waiting a small fraction of a pass for the answered cohort to return merges them again,
at a latency cost bounded by that fraction; a single sequential client never pays it. Nor does it
pay `max_wait_s`: a request that finds the batcher idle (empty queue, no pass since it arrived)
after a pass that served a single request runs at once - an app scoring one request at a time
would otherwise wait for company that never comes.

- Bounded: more than `max_queue_items` waiting items -> `Overloaded` (RESOURCE_EXHAUSTED).
- Deadlines: a request whose deadline passed before its batch ran is dropped (DeadlineExceeded)
  and costs no compute; a caller that gave up (cancelled) is skipped the same way. A batch runs in
  slices of `max_batch_size` items with the same check between slices, so a large request whose
  caller is gone stops after the current slice (each scorer bounds the cost of one item).
- Hot swap: `swap(scorer)` replaces the scorer reference; the batch in flight keeps the scorer it
  started with, so in-flight requests finish on the old model and no request is lost.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

from flywheel.reward import metrics
from flywheel.reward.scorers import Component, Scorer, ScoreResult
from flywheel.runtime.errors import DeadlineExceeded, NotReady, Overloaded

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoredBatch:
    """One request's results and the identity of the scorer that produced them."""

    values: list[float]
    components: list[Component]
    scorer: str
    scorer_version: str


@dataclass
class _Request:
    prompts: list[str]
    responses: list[str]
    future: asyncio.Future
    deadline: float | None  # time.monotonic()
    enqueued: float = field(default_factory=time.monotonic)

    def __len__(self) -> int:
        return len(self.prompts)


class DynamicBatcher:
    def __init__(self, scorer: Scorer, *, max_batch_size: int = 32, max_wait_s: float = 0.005,
                 max_queue_items: int = 1024, wait_fraction: float = 0.1) -> None:
        if max_batch_size < 1 or max_queue_items < 1:
            raise ValueError("max_batch_size and max_queue_items must be >= 1")
        self._scorer = scorer
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue_items = max_queue_items
        self.wait_fraction = wait_fraction
        self._last_forward_s = 0.0
        self._last_forward_end = 0.0
        self._last_batch_requests = 0
        self._queue: deque[_Request] = deque()
        self._queued_items = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # One thread: forward passes are serialised (torch parallelises inside one pass).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-forward")
        self._swap_lock = threading.Lock()
        self._closed = False
        self.batches = 0
        self.forward_items = 0
        metrics.publish_model(scorer)

    # -- scorer ------------------------------------------------------------------------------
    @property
    def scorer(self) -> Scorer:
        return self._scorer

    def swap(self, scorer: Scorer) -> Scorer:
        """Serve `scorer` from the next batch on; returns the previous one (its in-flight batch
        still completes on it)."""
        with self._swap_lock:
            old, self._scorer = self._scorer, scorer
        metrics.publish_model(scorer)
        log.info("reward scorer now %s@%s (was %s@%s)", scorer.name, scorer.version, old.name, old.version)
        return old

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    def start(self) -> None:
        """Start the collector on the running loop (idempotent)."""
        if self._task is not None and not self._task.done():
            return
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._closed = False
        self._task = self._loop.create_task(self._run(), name="reward-batcher")

    async def stop(self) -> None:
        """Finish what is queued, then stop."""
        self._closed = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            try:
                await self._task
            finally:
                self._task = None
        await asyncio.to_thread(self._executor.shutdown, wait=True)  # a forward pass may still be running

    # -- submitting --------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def queued_items(self) -> int:
        return self._queued_items

    async def score(self, prompts: Sequence[str], responses: Sequence[str], *,
                    timeout_s: float | None = None) -> ScoredBatch:
        """Score one request's items within `timeout_s` (None: no deadline)."""
        if len(prompts) != len(responses):
            raise ValueError("prompts and responses differ in length")
        if self._closed:
            raise NotReady("reward scorer is shutting down")
        if self._task is None:
            self.start()
        n = len(prompts)
        if n == 0:
            scorer = self._scorer
            return ScoredBatch([], [], scorer.name, scorer.version)
        if self._queued_items + n > self.max_queue_items:
            metrics.REJECTED.labels("overloaded").inc()
            raise Overloaded(f"scoring queue full ({self._queued_items} items waiting, "
                             f"limit {self.max_queue_items})")
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        request = _Request(list(prompts), list(responses), loop.create_future(), deadline)
        self._queue.append(request)
        self._queued_items += n
        metrics.QUEUE_DEPTH.set(self._queued_items)
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            if timeout_s is None:
                return await asyncio.shield(request.future)
            return await asyncio.wait_for(asyncio.shield(request.future), timeout=max(timeout_s, 0.0))
        except asyncio.TimeoutError:
            request.future.cancel()
            metrics.REJECTED.labels("deadline").inc()
            raise DeadlineExceeded(f"scoring did not finish within {timeout_s:.3f}s") from None
        except asyncio.CancelledError:
            request.future.cancel()  # the collector skips it
            raise
        finally:
            metrics.REQUEST_SECONDS.observe(time.monotonic() - request.enqueued)

    # -- the collector -----------------------------------------------------------------------
    def _take_batch(self) -> list[_Request]:
        batch: list[_Request] = []
        items = 0
        now = time.monotonic()
        while self._queue:
            request = self._queue[0]
            if request.future.done():  # cancelled or timed out by its caller
                self._queue.popleft()
                self._queued_items -= len(request)
                continue
            if request.deadline is not None and request.deadline <= now:
                self._queue.popleft()
                self._queued_items -= len(request)
                metrics.REJECTED.labels("deadline").inc()
                request.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                continue
            # A request larger than a batch runs alone (the scorer chunks it); never split requests.
            if batch and items + len(request) > self.max_batch_size:
                break
            self._queue.popleft()
            self._queued_items -= len(request)
            batch.append(request)
            items += len(request)
            if items >= self.max_batch_size:
                break
        metrics.QUEUE_DEPTH.set(self._queued_items)
        return batch

    async def _wait_to_fill(self) -> None:
        """Wait until a full batch is queued, or the oldest queued item waited max_wait_s."""
        assert self._wakeup is not None
        if (self._last_batch_requests <= 1 and len(self._queue) == 1
                and self._queue[0].enqueued >= self._last_forward_end):
            return  # a lone caller found the batcher idle: nobody is about to join, so don't wait
        budget = self.max_wait_s
        if self._last_batch_requests > 1:  # concurrent callers: let the answered cohort come back
            budget = max(budget, self.wait_fraction * self._last_forward_s)
        while not self._closed and self._queued_items < self.max_batch_size and self._queue:
            remaining = max(self._queue[0].enqueued, self._last_forward_end) + budget - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
            except asyncio.TimeoutError:
                return

    @staticmethod
    def _abandoned(batch: list[_Request]) -> bool:
        """Fail requests whose deadline passed; True when no caller of `batch` still waits."""
        now = time.monotonic()
        for request in batch:
            if not request.future.done() and request.deadline is not None and request.deadline <= now:
                metrics.REJECTED.labels("deadline").inc()
                request.future.set_exception(DeadlineExceeded("deadline passed while scoring"))
        return all(request.future.done() for request in batch)

    async def _forward(self, scorer: Scorer, batch: list[_Request], prompts: list[str],
                       responses: list[str]) -> ScoreResult | None:
        """Score the batch in slices of max_batch_size items (a request larger than a batch runs
        alone), checking deadlines between slices: work for callers who are gone stops there.
        None when it stopped."""
        assert self._loop is not None
        size = self.max_batch_size
        parts: list[ScoreResult] = []
        for begin in range(0, len(prompts), size):
            if begin and self._abandoned(batch):
                return None
            parts.append(await self._loop.run_in_executor(self._executor, scorer.score_components,
                                                          prompts[begin:begin + size], responses[begin:begin + size]))
            self.forward_items += len(parts[-1].values)
        if len(parts) == 1:
            return parts[0]
        return ScoreResult(values=[v for p in parts for v in p.values],
                           components=[type(c)(c.scorer, c.version, [v for p in parts for v in p.components[i].values])
                                       for i, c in enumerate(parts[0].components)])

    async def _run(self) -> None:
        assert self._wakeup is not None and self._loop is not None
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._wait_to_fill()
            batch = self._take_batch()
            if not batch:
                continue
            scorer = self._scorer  # the whole batch runs on one scorer, even if a swap happens now
            prompts = [p for r in batch for p in r.prompts]
            responses = [x for r in batch for x in r.responses]
            start = time.monotonic()
            try:
                result = await self._forward(scorer, batch, prompts, responses)
            except Exception as exc:  # noqa: BLE001 - delivered to every request of the batch
                log.exception("forward pass of %d items failed", len(prompts))
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(exc)
                continue
            elapsed = time.monotonic() - start
            self._last_forward_s = elapsed
            self._last_forward_end = time.monotonic()
            self._last_batch_requests = len(batch)
            self.batches += 1
            if result is None:  # every caller of the batch gave up or ran out of time part-way
                continue
            metrics.BATCH_SIZE.observe(len(prompts))
            metrics.FORWARD_SECONDS.observe(elapsed)
            for v in result.values:
                metrics.SCORES.labels(scorer.name).observe(v)
            offset = 0
            for request in batch:
                n = len(request)
                if not request.future.done():
                    request.future.set_result(ScoredBatch(
                        values=result.values[offset:offset + n],
                        components=[type(c)(c.scorer, c.version, c.values[offset:offset + n])
                                    for c in result.components],
                        scorer=scorer.name,
                        scorer_version=scorer.version,
                    ))
                offset += n
