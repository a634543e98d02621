"""Kafka side of the reward service: the scoring worker and the reward-model hot reloader.

Scoring worker (group `flywheel-reward`): rollouts -> scored-rollouts. Each polled batch is scored
through the service's `DynamicBatcher` (so Kafka and gRPC traffic share forward passes and the
served model), produced keyed by prompt_id with the rollout id in a header, and acknowledged by
the broker before the offsets are committed: at-least-once. Redelivered rollouts produce records
with the same rollout id (and the same reward while the model is unchanged), which downstream
consumers de-duplicate on.

Hot reload (per-instance group, from the beginning): the shared `ModelVersionFollower` over REWARD
versions; a new model is loaded on the consumer's thread (serving continues on the old model
meanwhile), smoke-tested, then swapped in atomically.
"""

from __future__ import annotations

import logging
from typing import Callable

from google.protobuf.timestamp_pb2 import Timestamp

from flywheel.bus import topics
from flywheel.bus.consumer import Rejection
from flywheel.bus.codec import Delivery
from flywheel.bus.producer import TypedProducer
from flywheel.bus.topics import Topic
from flywheel.model_follower import ModelVersionFollower
from flywheel.reward import metrics
from flywheel.reward.batching import DynamicBatcher
from flywheel.reward.scorers import EnsembleScorer, Scorer, TransformerRewardScorer, with_reward_model
from flywheel.runtime.uris import UriPolicy
from flywheel.v1 import common_pb2
from flywheel.versions import REWARD

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

def reward_model_of(scorer: Scorer) -> TransformerRewardScorer | None:
    if isinstance(scorer, TransformerRewardScorer):
        return scorer
    if isinstance(scorer, EnsembleScorer):
        for member, _ in scorer.members:
            if isinstance(member, TransformerRewardScorer):
                return member
    return None


def reward_follower(batcher: DynamicBatcher, load: Callable[[common_pb2.ModelVersion], TransformerRewardScorer],
                    uri_policy: UriPolicy) -> ModelVersionFollower[TransformerRewardScorer]:
    """The shared follower over REWARD versions; `batcher.scorer` must contain a reward model."""
    if reward_model_of(batcher.scorer) is None:
        raise ValueError(f"scorer {batcher.scorer.name!r} has no reward model to hot-reload")

    def validate(model: TransformerRewardScorer) -> None:
        model.score(["smoke test"], ["a response"])  # never swap in a model that cannot score

    def swap(model: TransformerRewardScorer) -> None:
        replacement = with_reward_model(batcher.scorer, model)
        assert replacement is not None  # checked above
        batcher.swap(replacement)

    def current_version() -> str:
        current = reward_model_of(batcher.scorer)
        return current.version if current is not None else ""

    return ModelVersionFollower(REWARD, load, validate, swap, current_version=current_version,
                                uri_policy=uri_policy, reloads=metrics.RELOADS, reload_seconds=metrics.RELOAD_SECONDS)
