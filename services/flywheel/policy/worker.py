"""Kafka worker: prompts -> n rollouts per prompt (keyed by prompt id), at-least-once.

Runs on the ConsumerWorker thread (which commits each chunk of `max_prompts` once its rollouts are
durable, so a kill replays at most one chunk); generation happens on the service's event loop (so worker
prompts share batches with gRPC traffic). A batch's rollouts are durable (acks=all) before its
offsets are committed; a crash in between redelivers the prompts, and deterministic rollout ids
make the duplicates recognisable downstream. Invalid prompts are dead-lettered.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import Iterable

from flywheel.bus import Rejection, Topic, TypedProducer
from flywheel.bus.codec import Delivery
from flywheel.policy import metrics
from flywheel.policy.backends import Backend, Job
from flywheel.policy.rollouts import prompt_job, to_rollout
from flywheel.policy.sampling import SamplingDefaults
from flywheel.runtime.errors import InvalidArgument
from flywheel.v1 import common_pb2

log = logging.getLogger(__name__)


class RolloutWorker:
    def __init__(self, backend: Backend, producer: TypedProducer, rollouts: Topic, defaults: SamplingDefaults,
                 loop: asyncio.AbstractEventLoop, *, max_prompts: int = 16, produce_timeout_s: float = 30.0,
                 generate_timeout_s: float = 600.0) -> None:
        self.backend = backend
        self.producer = producer
        self.rollouts = rollouts
        self.defaults = defaults
        self.loop = loop
        self.max_prompts = max_prompts
        self.produce_timeout_s = produce_timeout_s
        self.generate_timeout_s = generate_timeout_s
        self.produced = 0

    def handle(self, batch: list[Delivery[common_pb2.Prompt]]) -> Iterable[Rejection]:
        rejections: list[Rejection] = []
        valid: list[tuple[Delivery[common_pb2.Prompt], Job]] = []
        for delivery in batch:
            try:
                job = prompt_job(self.backend, delivery.value, None, self.defaults)
            except InvalidArgument as exc:
                rejections.append(Rejection(delivery, str(exc), "InvalidArgument"))
                continue
            valid.append((delivery, job))
        for start in range(0, len(valid), self.max_prompts):
            chunk = valid[start:start + self.max_prompts]
            future = asyncio.run_coroutine_threadsafe(
                self.backend.generate([job for _, job in chunk], block=True), self.loop)
            try:  # bounded: a wedged engine fails the unit (retried) instead of hanging the consumer
                grouped = future.result(timeout=self.generate_timeout_s)
            except concurrent.futures.TimeoutError:
                future.cancel()
                raise TimeoutError(f"generation of {len(chunk)} prompts took over {self.generate_timeout_s:.0f}s")
            sends = []
            for (delivery, job), group in zip(chunk, grouped):
                for completion in group:
                    rollout = to_rollout(delivery.value, job.sampling, completion)
                    sends.append(self.producer.send(self.rollouts, rollout, key=rollout.prompt_id,
                                                    trace_id=delivery.trace_id or None))
            for send in sends:
                send.get(timeout=self.produce_timeout_s)  # durable before the offsets are committed
            self.produced += len(sends)
            metrics.ROLLOUTS_PRODUCED.inc(len(sends))
        return rejections
