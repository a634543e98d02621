"""Composition of the reward service: scorer + batcher + gRPC servicers + HTTP API + API keys + Kafka workers."""

from __future__ import annotations

import asyncio
import logging
import uuid

from flywheel.bus import ensure_topics_for, producer_for, topics, worker_for
from flywheel.bus.probe import BrokerProbe
from flywheel.bus.topics import Topic
from flywheel.model_follower import ModelVersionFollower
from flywheel.reward.batching import DynamicBatcher
from flywheel.reward.http_api import RewardHttpApi
from flywheel.reward.scorers import Scorer, build_scorer, transformer_from_settings
from flywheel.reward.service import KSERVE_SERVICE, REWARD_SERVICE, KServeServicer, RewardServicer, registrations
from flywheel.reward.settings import RewardSettings
from flywheel.reward.worker import ScoringHandler, reward_follower, reward_model_of
from flywheel.runtime import ServiceRuntime
from flywheel.runtime.auth import SCOPE_SCORE, AuthInterceptor, Guard

log = logging.getLogger(__name__)

Settings = RewardSettings


class RewardApp:
    """Handles to the parts of a built service (tests and the benchmark use them)."""

    def __init__(self, runtime: ServiceRuntime, batcher: DynamicBatcher,
                 scoring: ScoringHandler | None, reload: ModelVersionFollower | None,
                 http: RewardHttpApi | None = None, guard: Guard | None = None) -> None:
        self.runtime = runtime
        self.batcher = batcher
        self.scoring = scoring
        self.reload = reload
        self.http = http
        self.guard = guard


def _kserve_items(request) -> int:  # type: ignore[no-untyped-def]
    return max((len(t.contents.bytes_contents) or (t.shape[0] if t.shape else 0) for t in request.inputs), default=0)


def auth_interceptor(guard: Guard) -> AuthInterceptor:
    """Scoring needs scope `score`; KServe liveness/readiness stay public (probes), as health does."""
    return AuthInterceptor(guard, {
        REWARD_SERVICE: SCOPE_SCORE, KSERVE_SERVICE: SCOPE_SCORE,
        f"/{KSERVE_SERVICE}/ServerLive": None, f"/{KSERVE_SERVICE}/ServerReady": None,
    }, items={
        f"/{REWARD_SERVICE}/Score": lambda r: len(r.items),
        f"/{REWARD_SERVICE}/ScoreStream": lambda r: len(r.items),
        f"/{REWARD_SERVICE}/Compare": lambda r: 2,
        f"/{KSERVE_SERVICE}/ModelInfer": _kserve_items,
    })


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

    def is_ready() -> bool:  # KServe ServerReady / ModelReady and /v2/health/ready mirror health
        return runtime.readiness.ready and not batcher.closed

    reward = RewardServicer(batcher, settings)
    kserve = KServeServicer(batcher, settings, is_ready)
    for name, register in registrations(reward, kserve):
        runtime.add_service(name, register)
    guard = Guard.from_settings(settings)
    runtime.add_interceptor(auth_interceptor(guard))
    http = RewardHttpApi(reward, kserve, settings, guard, is_ready) if settings.reward_http_enabled else None
    if http is not None:
        runtime.add_worker(http)

    scoring: ScoringHandler | None = None
    reload: ModelVersionFollower | None = None
    producer = None
    model = reward_model_of(scorer)
    if model is not None:
        log.info("reward model %s scores in %s (reward_dtype %s)", model.version, model.dtype, settings.reward_dtype)
    hot_reload = settings.reward_reload_enabled and model is not None
    if settings.reward_reload_enabled and not hot_reload:
        log.info("hot reload off: scorer %s has no reward model to replace", scorer.name)
    if settings.reward_worker_enabled or hot_reload:
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
    if hot_reload:
        assert producer is not None
        reload = reward_follower(batcher, lambda mv: transformer_from_settings(settings, mv.checkpoint_uri),
                                 settings.checkpoint_policy())
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
    return RewardApp(runtime, batcher, scoring, reload, http, guard)


def build(settings: RewardSettings) -> ServiceRuntime:
    return build_app(settings).runtime


async def serve(settings: RewardSettings) -> None:
    runtime = build(settings)
    await runtime.serve(ready=True)
