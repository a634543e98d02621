"""Composition of the reward service: scorer + batcher + gRPC servicers + Kafka workers."""

from __future__ import annotations

import asyncio
import logging
import uuid

from flywheel.bus import ensure_topics_for, producer_for, topics, worker_for
from flywheel.bus.probe import BrokerProbe
from flywheel.bus.topics import Topic
from flywheel.reward.batching import DynamicBatcher
from flywheel.reward.scorers import Scorer, build_scorer, transformer_from_settings
from flywheel.reward.service import registrations
from flywheel.reward.settings import RewardSettings
from flywheel.reward.worker import ReloadHandler, ScoringHandler
from flywheel.runtime import ServiceRuntime

log = logging.getLogger(__name__)

Settings = RewardSettings


class RewardApp:
    """Handles to the parts of a built service (tests and the benchmark use them)."""

    def __init__(self, runtime: ServiceRuntime, batcher: DynamicBatcher,
                 scoring: ScoringHandler | None, reload: ReloadHandler | None) -> None:
        self.runtime = runtime
        self.batcher = batcher
        self.scoring = scoring
        self.reload = reload


def build_app(settings: RewardSettings, *, scorer: Scorer | None = None,
              rollouts_topic: Topic = topics.ROLLOUTS, scored_topic: Topic = topics.SCORED_ROLLOUTS,
              versions_topic: Topic = topics.MODEL_VERSIONS) -> RewardApp:
    """Everything `build` does, with the parts exposed; topics are overridable for isolated tests."""
    runtime = ServiceRuntime(settings)
    scorer = scorer or build_scorer(settings)
    batcher = DynamicBatcher(scorer, max_batch_size=settings.reward_max_batch_size,
                             max_wait_s=settings.reward_max_wait_ms / 1000.0,
                             max_queue_items=settings.reward_max_queue_items,
                             wait_fraction=settings.reward_batch_wait_fraction)

    async def start_batcher() -> None:  # on the server's loop; stopped in on_stop, after RPCs drained
        batcher.start()

    runtime.add_lifecycle(start_batcher)
    for name, register in registrations(batcher, settings,
                                        is_ready=lambda: runtime.readiness.ready and not batcher.closed):
        runtime.add_service(name, register)

    scoring: ScoringHandler | None = None
    reload: ReloadHandler | None = None
    producer = None
    if settings.reward_worker_enabled or settings.reward_hot_reload:
        ensure_topics_for(settings, [t for t in (rollouts_topic, scored_topic, versions_topic)])
        producer = producer_for(settings)
        # Scoring RPCs work without the broker: stay ready, report the dependency.
        runtime.add_worker(BrokerProbe(settings, runtime.readiness, gate=False))
    if settings.reward_worker_enabled:
        assert producer is not None
        scoring = ScoringHandler(batcher, producer, output_topic=scored_topic)
        # One unit per forward-pass chunk, committed once its scores are durable.
        runtime.add_worker(worker_for(settings, rollouts_topic, None, scoring, producer,
                                      commit_every=scoring.chunk_size))
    if settings.reward_hot_reload:
        assert producer is not None
        reload = ReloadHandler(batcher, lambda mv: transformer_from_settings(settings, mv.checkpoint_uri))
        instance = settings.reward_instance_id or uuid.uuid4().hex[:12]
        runtime.add_worker(worker_for(settings, versions_topic, f"{settings.kafka_consumer_group}-reload-{instance}",
                                      reload, producer, static=False))

    def release() -> None:
        if producer is not None:
            producer.flush(10.0)
            producer.close()
        batcher.scorer.close()

    async def shutdown() -> None:
        await batcher.stop()
        await asyncio.to_thread(release)  # flushing and closing block: keep them off the event loop

    runtime.on_stop(shutdown)
    return RewardApp(runtime, batcher, scoring, reload)


def build(settings: RewardSettings) -> ServiceRuntime:
    return build_app(settings).runtime


async def serve(settings: RewardSettings) -> None:
    runtime = build(settings)
    await runtime.serve(ready=True)
