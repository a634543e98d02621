"""Kafka side of the reward service: the scoring worker and the reward-model hot reloader.

Scoring worker (group `flywheel-reward`): rollouts -> scored-rollouts. Each polled batch is scored
through the service's `DynamicBatcher` (so Kafka and gRPC traffic share forward passes and the
served model), produced keyed by prompt_id with the rollout id in a header, and acknowledged by
the broker before the offsets are committed: at-least-once. Redelivered rollouts produce records
with the same rollout id (and the same reward while the model is unchanged), which downstream
consumers de-duplicate on.

Hot reload (per-instance group, from the beginning): of the REWARD versions in a batch, the newest
wins; it is loaded on the consumer's thread (serving continues on the old model meanwhile),
smoke-tested, then swapped in atomically.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Callable, Sequence

from google.protobuf.timestamp_pb2 import Timestamp

from flywheel.bus import topics
from flywheel.bus.consumer import Rejection
from flywheel.bus.codec import Delivery
from flywheel.bus.producer import TypedProducer
from flywheel.bus.topics import Topic
from flywheel.reward import metrics
from flywheel.reward.batching import DynamicBatcher
from flywheel.reward.scorers import EnsembleScorer, Scorer, TransformerRewardScorer, with_reward_model
from flywheel.v1 import common_pb2

log = logging.getLogger(__name__)

HEADER_ROLLOUT_ID = "flywheel-rollout-id"


def scoring_prompt(rollout: common_pb2.Rollout) -> str:
    """The reward model sees the user-facing prompt, not the policy's chat-templated text."""
    return rollout.raw_prompt or rollout.prompt_text


class ScoringHandler:
    """Batch handler for `ConsumerWorker` over the rollouts topic."""

    def __init__(self, batcher: DynamicBatcher, producer: TypedProducer, *,
                 output_topic: Topic = topics.SCORED_ROLLOUTS, chunk_size: int | None = None,
                 timeout_s: float = 300.0, produce_timeout_s: float = 30.0) -> None:
        self.batcher = batcher
        self.producer = producer
        self.output_topic = output_topic
        self.chunk_size = chunk_size or batcher.max_batch_size
        self.timeout_s = timeout_s
        self.produce_timeout_s = produce_timeout_s

    def _validate(self, delivery: Delivery) -> str | None:
        rollout = delivery.value
        if not rollout.rollout_id:
            return "rollout_id is empty"
        if not rollout.prompt_id:
            return "prompt_id is empty"
        return None

    def __call__(self, batch: list[Delivery[common_pb2.Rollout]]) -> list[Rejection]:
        rejections: list[Rejection] = []
        todo: list[Delivery[common_pb2.Rollout]] = []
        seen: set[str] = set()
        for delivery in batch:
            reason = self._validate(delivery)
            if reason:
                rejections.append(Rejection(delivery, reason, "InvalidRollout"))
            elif delivery.value.rollout_id not in seen:  # a redelivered duplicate in the same poll
                seen.add(delivery.value.rollout_id)
                todo.append(delivery)
        if not todo:
            return rejections
        prompts = [scoring_prompt(d.value) for d in todo]
        responses = [d.value.response_text for d in todo]
        # Chunks go to the batcher as separate requests, so gRPC callers interleave with them.
        results = self._score_chunks(prompts, responses)
        futures = []
        now = Timestamp()
        now.GetCurrentTime()
        for delivery, (value, components, scorer, version) in zip(todo, results):
            rollout = delivery.value
            scored = common_pb2.ScoredRollout(
                rollout=rollout, reward=value, scorer=scorer, scorer_version=version, scored_at=now,
                scores=[common_pb2.Score(scorer=c[0], scorer_version=c[1], value=c[2]) for c in components])
            futures.append(self.producer.send(self.output_topic, scored, key=rollout.prompt_id,
                                              trace_id=delivery.trace_id or None,
                                              headers=[(HEADER_ROLLOUT_ID, rollout.rollout_id.encode())]))
        for future in futures:  # durable (acks=all) before the worker commits the input offsets
            future.get(timeout=self.produce_timeout_s)
        metrics.SCORED_ROLLOUTS.inc(len(futures))
        return rejections

    def _score_chunks(self, prompts: list[str], responses: list[str]):
        import asyncio

        loop = self.batcher.loop
        if loop is None:
            raise RuntimeError("batcher is not running")
        pending = []
        for start in range(0, len(prompts), self.chunk_size):
            coro = self.batcher.score(prompts[start:start + self.chunk_size],
                                      responses[start:start + self.chunk_size], timeout_s=self.timeout_s)
            pending.append(asyncio.run_coroutine_threadsafe(coro, loop))
        out = []
        for future in pending:
            # Overloaded / deadline: raise -> the worker rewinds and retries the batch after a backoff.
            # The batcher enforces timeout_s; the margin only bounds a wedged event loop.
            result = future.result(timeout=self.timeout_s + 30.0)
            for i, value in enumerate(result.values):
                out.append((value, [(c.scorer, c.version, c.values[i]) for c in result.components],
                            result.scorer, result.scorer_version))
        return out


# -- hot reload -----------------------------------------------------------------------------------

_VERSION_NUMBER = re.compile(r"(\d+)$")


def version_key(version: str, created_at_s: float = 0.0) -> tuple[int, float]:
    """Order of model versions: the trailing number of `<kind>-<NNNN>`, then creation time."""
    match = _VERSION_NUMBER.search(version or "")
    return (int(match.group(1)) if match else -1, created_at_s)


def reward_model_of(scorer: Scorer) -> TransformerRewardScorer | None:
    if isinstance(scorer, TransformerRewardScorer):
        return scorer
    if isinstance(scorer, EnsembleScorer):
        for member, _ in scorer.members:
            if isinstance(member, TransformerRewardScorer):
                return member
    return None


class ReloadHandler:
    """Batch handler for `ConsumerWorker` over model-versions: newest REWARD version wins."""

    def __init__(self, batcher: DynamicBatcher, load: Callable[[common_pb2.ModelVersion], TransformerRewardScorer]):
        self.batcher = batcher
        self.load = load
        current = reward_model_of(batcher.scorer)
        self._applied = version_key(current.version) if current else (-1, 0.0)
        self.loaded: list[str] = []

    @property
    def newest_considered(self) -> tuple[int, float]:
        """Ordering key of the newest version applied or given up on (see `version_key`)."""
        return self._applied

    def __call__(self, batch: Sequence[Delivery[common_pb2.ModelVersion]]) -> list[Rejection]:
        candidates = [d.value for d in batch if d.value.kind == common_pb2.MODEL_KIND_REWARD]
        if not candidates:
            return []
        if reward_model_of(self.batcher.scorer) is None:
            metrics.RELOADS.labels("ignored").inc(len(candidates))
            return []  # this scorer has no reward model to replace (vader / remote)
        newest = max(candidates, key=lambda mv: version_key(mv.version, mv.created_at.ToSeconds() if mv.HasField("created_at") else 0.0))
        key = version_key(newest.version, newest.created_at.ToSeconds() if newest.HasField("created_at") else 0.0)
        if key <= self._applied:
            metrics.RELOADS.labels("ignored").inc(len(candidates))
            return []
        start = time.monotonic()
        try:
            model = self.load(newest)
            model.score(["smoke test"], ["a response"])  # never swap in a model that cannot score
        except Exception:  # noqa: BLE001 - a bad checkpoint must not take the service down
            log.exception("could not load reward model %s from %s; keeping %s", newest.version,
                          newest.checkpoint_uri, self.batcher.scorer.version)
            metrics.RELOADS.labels("failed").inc()
            self._applied = key  # do not retry this version forever; a newer one will come
            return []
        replacement = with_reward_model(self.batcher.scorer, model)
        if replacement is None:  # pragma: no cover - checked above
            return []
        self.batcher.swap(replacement)
        self._applied = key
        self.loaded.append(newest.version)
        metrics.RELOADS.labels("loaded").inc()
        log.info("reward model %s loaded in %.1fs from %s", newest.version, time.monotonic() - start,
                 newest.checkpoint_uri)
        return []
