"""The Kafka-driven training loop: scored rollouts in, policy versions out.

    poll (at most what the batch still needs) -> admit (skip eval, dedup, drop stale) -> buffer
    -> PPO step -> checkpoint written durably -> ModelVersion published (acks=all)
    -> consumer.commit()

Offsets are committed only after the checkpoint holding the step is durable, and the checkpoint
records which (behaviour version, rollout id) pairs it was trained on. So a trainer killed at any
point resumes from its last checkpoint and the committed offsets: records after the commit are
redelivered; those already in the checkpoint (killed between checkpoint and commit) are recognised
and skipped. Nothing is lost, nothing is trained twice in one version.

Under torchrun (DDP), rank 0 owns Kafka, checkpoints and publishing; it broadcasts each batch to
the other ranks (`follow`), every rank trains on its shard and DDP averages the gradients.
"""

from __future__ import annotations

import enum
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from google.protobuf import timestamp_pb2

from flywheel import checkpoints
from flywheel.bus import ConsumerThread, TypedConsumer, TypedProducer
from flywheel.bus.topics import Topic
from flywheel.bus import metrics as metrics_bus
from flywheel.trainer import metrics
from flywheel.trainer.batch import RolloutFilter, collate
from flywheel.trainer.checkpoint import CheckpointInfo, CheckpointStore
from flywheel.trainer.ppo import PolicyWithValueHead, PPOConfig, PPOTrainer, StepStats
from flywheel.v1 import common_pb2
from flywheel.versions import BASE_POLICY_VERSION, next_version, version_number

log = logging.getLogger(__name__)


class LoopState(enum.Enum):
    WAITING = 1
    TRAINING = 2
    PAUSED = 3
    STOPPING = 4


@dataclass
class LoopCounters:
    consumed: int = 0
    trained: int = 0
    dropped_stale: int = 0
    skipped_eval: int = 0
    duplicates: int = 0
    invalid: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Snapshot:
    """What Status reports; replaced atomically after every step."""

    state: LoopState
    step: int
    version: str
    version_uri: str
    parent_version: str
    counters: LoopCounters
    buffered: int
    last_stats: dict[str, float] = field(default_factory=dict)
    kl_coef: float = 0.0


# ---------------------------------------------------------------------------------------------
# Building the trainer from a base model or the latest checkpoint
# ---------------------------------------------------------------------------------------------


@dataclass
class LoadedTrainer:
    trainer: PPOTrainer
    tokenizer: Any
    version: str
    uri: str
    parent_version: str
    state: dict[str, Any]
    base_model_path: Path
    reference_uri: str = ""


def load_trainer(config: PPOConfig, store: CheckpointStore, base_model_path: str | Path, *,
                 wrap: Callable[[PolicyWithValueHead], torch.nn.Module] | None = None) -> LoadedTrainer:
    """The trainer at its newest complete checkpoint under `store`, or fresh from the base model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_model_path = Path(base_model_path)
    latest = store.latest()
    source = store.local_dir(latest.version) if latest else base_model_path
    state: dict[str, Any] = {}
    opt_state = None
    if latest is not None:
        state, opt_state = store.load_trainer_state(latest.version)
    # The frozen reference: the SFT model when there was an SFT stage, else the base model.
    reference_uri = state.get("reference_model") or base_model_path.resolve().as_uri()
    torch.manual_seed(config.seed)
    lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(checkpoints.resolve(reference_uri, store.cache_dir), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    policy = PolicyWithValueHead(lm, value_head_init_std=config.value_head_init_std)
    if latest is not None:
        store.load_value_head(latest.version, policy.value_head)
    module = wrap(policy) if wrap else policy
    trainer = PPOTrainer(config, module, ref)
    log.info("PPO forward passes in %s (trainer_dtype %s)", trainer.compute_dtype, config.dtype)
    if latest is not None:
        if opt_state is not None:
            trainer.optimizer.load_state_dict(opt_state)
        if "ppo" in state:
            trainer.load_state_dict(state["ppo"])
        log.info("resuming from %s (step %d)", latest.version, trainer.global_step)
        return LoadedTrainer(trainer, tokenizer, latest.version, latest.uri, latest.parent_version, state,
                             base_model_path, reference_uri)
    return LoadedTrainer(trainer, tokenizer, BASE_POLICY_VERSION, base_model_path.resolve().as_uri(), "", state,
                         base_model_path, reference_uri)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def version_message(info: CheckpointInfo) -> common_pb2.ModelVersion:
    """The announcement of a checkpoint, entirely from its metadata: announcing it again (after a
    restart) publishes exactly the same content."""
    created = timestamp_pb2.Timestamp()
    created.FromNanoseconds(int(info.created_at * 1e9))
    return common_pb2.ModelVersion(
        kind=common_pb2.MODEL_KIND_POLICY, version=info.version, checkpoint_uri=info.uri,
        metrics={k: float(v) for k, v in info.metrics.items()}, parent_version=info.parent_version,
        created_at=created, model_name=info.model_name, step=info.step)


class TrainerLoop(ConsumerThread):
    """Consumes scored rollouts, trains, checkpoints, publishes, commits: the bus's `ConsumerThread`
    (same metrics, backoff and lifecycle as every consumer), one step = one poll."""

    def __init__(self, loaded: LoadedTrainer, store: CheckpointStore, consumer: TypedConsumer,
                 producer: TypedProducer, *, batch_size: int, model_versions_topic: Topic,
                 max_steps: int | None = None, keep_checkpoints: int = 0, start_paused: bool = False,
                 poll_timeout_ms: int = 500, model_name: str = "", reload: Callable[[], LoadedTrainer] | None = None,
                 on_step: Callable[[StepStats, common_pb2.ModelVersion], None] | None = None) -> None:
        super().__init__(name="trainer-loop", topic=consumer.topic.name, group=consumer.group_id,
                         retry_backoff_s=1.0, max_backoff_s=60.0)
        self.store = store
        self.consumer = consumer
        self.producer = producer
        self.batch_size = batch_size
        self.model_versions_topic = model_versions_topic
        self.max_steps = max_steps
        self.keep_checkpoints = keep_checkpoints
        self.poll_timeout_ms = poll_timeout_ms
        self.model_name = model_name
        self._reload = reload
        self._on_step = on_step
        self._lock = threading.Lock()
        self._resume = threading.Event()
        if not start_paused:
            self._resume.set()
        self._announced = False
        self._buffer: list[common_pb2.ScoredRollout] = []
        self._pending: set[tuple[str, str]] = set()
        self._weights: list[float] = []
        self._lags: list[int] = []
        self.failed: BaseException | None = None
        self.steps_this_run = 0
        self._adopt(loaded)
        self.world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if batch_size % self.world_size:
            raise ValueError(f"batch_size {batch_size} must be divisible by the world size {self.world_size}")
        metrics.PAUSED.set(0 if self._resume.is_set() else 1)

    def _adopt(self, loaded: LoadedTrainer) -> None:
        self.loaded = loaded
        self.trainer = loaded.trainer
        self.tokenizer = loaded.tokenizer
        cfg = self.trainer.config
        self.filter = RolloutFilter(cfg.max_version_lag, cfg.staleness_weight_decay)
        self.filter.load_state_dict(loaded.state.get("trained_rollouts", {}))
        self.counters = LoopCounters(**loaded.state.get("counters", {}))
        self.version = loaded.version
        self.version_step = self.trainer.global_step  # the step of `version` (moves with it, atomically)
        self.version_uri = loaded.uri
        self.parent_version = loaded.parent_version
        self.last_stats: dict[str, float] = dict(loaded.state.get("last_stats", {}))
        self._buffer, self._pending, self._weights, self._lags = [], set(), [], []
        metrics.STEP.set(self.trainer.global_step)
        metrics.POLICY_VERSION.set(version_number(self.version))

    # -- status / control (any thread) ------------------------------------------------------
    @property
    def paused(self) -> bool:
        return not self._resume.is_set()

    def pause(self) -> None:
        self._resume.clear()
        metrics.PAUSED.set(1)

    def resume(self) -> None:
        self._resume.set()
        metrics.PAUSED.set(0)

    def snapshot(self) -> Snapshot:
        with self._lock:
            # A step in flight when Pause arrives still finishes (and publishes): until it has,
            # the state stays TRAINING, so PAUSED means no further version will appear.
            if self._stop.is_set():
                state = LoopState.STOPPING
            elif self._training:
                state = LoopState.TRAINING
            elif self.paused:
                state = LoopState.PAUSED
            else:
                state = LoopState.WAITING
            return Snapshot(state=state, step=self.version_step, version=self.version,
                            version_uri=self.version_uri, parent_version=self.parent_version,
                            counters=LoopCounters(**self.counters.as_dict()), buffered=len(self._buffer),
                            last_stats=dict(self.last_stats), kl_coef=self.trainer.kl_ctl.value)

    _training = False

    def model_version_message(self) -> common_pb2.ModelVersion:
        created = timestamp_pb2.Timestamp()
        created.GetCurrentTime()
        return common_pb2.ModelVersion(
            kind=common_pb2.MODEL_KIND_POLICY, version=self.version, checkpoint_uri=self.version_uri,
            metrics={k: float(v) for k, v in self.last_stats.items()}, parent_version=self.parent_version,
            created_at=created, model_name=self.model_name, step=self.version_step)

    # -- one iteration (loop thread) --------------------------------------------------------
    def run_once(self) -> StepStats | None:
        """Poll once (up to what the batch still needs); train + checkpoint + publish + commit when full."""
        needed = self.batch_size - len(self._buffer)
        deliveries = self.consumer.poll(timeout_ms=self.poll_timeout_ms, max_records=needed)
        metrics_bus.CONSUMED.labels(*self.labels).inc(len(deliveries))
        current = version_number(self.version)
        for delivery in deliveries:
            self._admit(delivery.value, current)
        metrics.BUFFERED.set(len(self._buffer))
        if deliveries and not self._buffer:
            # Everything polled since the last commit was skipped (eval, stale, duplicate): nothing
            # is pending, so committing past it loses nothing.
            self.consumer.commit()
        if len(self._buffer) < self.batch_size:
            return None
        return self.train_buffer()

    def _admit(self, scored: common_pb2.ScoredRollout, current: int) -> None:
        self.counters.consumed += 1
        verdict = self.filter.admit(scored, current, self._pending)
        if not verdict.accepted:
            metrics.ROLLOUTS.labels(verdict.reason).inc()
            if verdict.reason == "stale":
                self.counters.dropped_stale += 1
            elif verdict.reason == "eval":
                self.counters.skipped_eval += 1
            elif verdict.reason == "duplicate":
                self.counters.duplicates += 1
            else:
                self.counters.invalid += 1
            return
        with self._lock:
            self._buffer.append(scored)
            self._pending.add((scored.rollout.policy_version, scored.rollout.rollout_id))
            self._weights.append(verdict.weight)
            self._lags.append(verdict.lag)

    def train_buffer(self) -> StepStats:
        """PPO step on the buffer, then durable checkpoint, publish and commit (in that order).

        The state reads TRAINING until the new version is published, also when Pause arrived
        meanwhile: PAUSED then means that no further version will appear."""
        with self._lock:
            self._training = True
        try:
            return self._train_buffer()
        finally:
            with self._lock:
                self._training = False

    def _train_buffer(self) -> StepStats:
        rollouts = list(self._buffer)
        batch = collate(rollouts, pad_token_id=self._pad_id(), weights=self._weights)
        if self.world_size > 1:
            dist.broadcast_object_list([(*_encode(rollouts, self._weights), self.version)], src=0)
            stats = self.trainer.step(batch.shard(dist.get_rank(), self.world_size), current_version=self.version)
        else:
            stats = self.trainer.step(batch, current_version=self.version)
        for lag in self._lags:
            metrics.VERSION_LAG.observe(lag)
        metrics.ROLLOUTS.labels("trained").inc(len(rollouts))

        parent = self.version
        new_version = next_version(parent)
        self.filter.mark_trained(rollouts)
        self.filter.prune(version_number(new_version))
        counters = LoopCounters(**self.counters.as_dict())
        counters.trained += len(rollouts)
        step_metrics = stats.as_metrics()
        step_metrics.update({
            "rollouts_trained": float(counters.trained), "rollouts_dropped_stale": float(counters.dropped_stale),
            "rollouts_consumed": float(counters.consumed),
            "mean_version_lag": sum(self._lags) / len(self._lags) if self._lags else 0.0,
            "max_version_lag": float(max(self._lags, default=0)),
        })
        lineage = {
            "rollout_ids": [s.rollout.rollout_id for s in rollouts],
            "behaviour_versions": sorted({s.rollout.policy_version for s in rollouts}),
            "scorer_versions": sorted({s.scorer_version for s in rollouts if s.scorer_version}),
        }
        trainer_state = {"ppo": self.trainer.state_dict(), "trained_rollouts": self.filter.state_dict(),
                         "counters": counters.as_dict(), "last_stats": step_metrics,
                         "reference_model": self.loaded.reference_uri}
        started = time.perf_counter()
        module = self.trainer.module
        uri = self.store.save(
            new_version, model=module.lm, tokenizer=self.tokenizer, value_head=module.value_head,
            optimizer_state=self.trainer.optimizer.state_dict(), trainer_state=trainer_state,
            metadata={"parent_version": parent, "step": self.trainer.global_step, "metrics": step_metrics,
                      "model_name": self.model_name, "ppo_config": self.trainer.config.to_dict(),
                      "base_model": str(self.loaded.base_model_path),
                      "reference_model": self.loaded.reference_uri, **lineage})
        metrics.CHECKPOINT_SECONDS.observe(time.perf_counter() - started)
        with self._lock:
            self.version, self.version_uri, self.parent_version = new_version, uri, parent
            self.version_step = self.trainer.global_step
            self.counters = counters
            self.last_stats = step_metrics
            self._buffer, self._pending, self._weights, self._lags = [], set(), [], []
        info = self.store.info(new_version)
        message = version_message(info) if info is not None else self.model_version_message()
        self.producer.send_and_wait(self.model_versions_topic, message, key="POLICY")
        self.consumer.commit()  # only now: the step is durable and announced
        self.steps_this_run += 1
        metrics.STEP.set(self.trainer.global_step)
        metrics.POLICY_VERSION.set(version_number(new_version))
        metrics.BUFFERED.set(0)
        metrics.observe_step(step_metrics)
        if self.keep_checkpoints:
            reference = self.loaded.reference_uri.rstrip("/").rsplit("/", 1)[-1]
            self.store.prune(self.keep_checkpoints, protect={new_version, reference})
        log.info("step %d -> %s: score %.3f kl %.3f (coef %.3f) pg %.4f vf %.4f ent %.3f (%.1f ep/s)",
                 stats.step, new_version, stats.mean_score, stats.kl, stats.kl_coef, stats.policy_loss,
                 stats.value_loss, stats.entropy, stats.episodes_per_second)
        if self._on_step is not None:
            self._on_step(stats, message)
        return stats

    def _pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(self.tokenizer, "eos_token_id", None)
        return int(pad or 0)

    def announce(self) -> None:
        """Publish the current version again, as first announced (idempotent): after a restart the
        last checkpoint may have been written but not announced."""
        if self.version == BASE_POLICY_VERSION:
            return
        info = self.store.info(self.version)
        message = version_message(info) if info is not None else self.model_version_message()
        self.producer.send_and_wait(self.model_versions_topic, message, key="POLICY")

    # -- the thread (ConsumerThread) --------------------------------------------------------
    def step(self) -> None:
        if self.max_steps is not None and self.trainer.global_step >= self.max_steps:
            log.info("max_steps %d reached; idle", self.max_steps)
            self._stop.wait(1.0)
            return
        if not self._resume.is_set():
            self._resume.wait(0.5)
            return
        if not self._announced:
            self.announce()
            self._announced = True
        self.run_once()

    def recover(self) -> None:
        """Back to the last checkpoint: rewind the uncommitted records and reload the trainer."""
        self.failed = sys.exc_info()[1]
        metrics.STEP_FAILURES.inc()
        self.consumer.rewind()
        if self._reload is not None:
            self._adopt(self._reload())

    def lag(self) -> int:
        return self.consumer.lag()

    def run(self) -> None:
        super().run()
        self._broadcast_stop()

    def _broadcast_stop(self) -> None:
        if self.world_size > 1:
            dist.broadcast_object_list([None], src=0)

    def request_stop(self) -> None:
        super().request_stop()
        self._resume.set()

    def close(self) -> None:
        self.consumer.close(leave_group=self.leave_group_on_close)


def _encode(rollouts: list[common_pb2.ScoredRollout], weights: list[float]) -> tuple[list[bytes], list[float]]:
    return [r.SerializeToString() for r in rollouts], list(weights)


def follow(trainer: PPOTrainer, pad_token_id: int) -> int:
    """Non-zero ranks under torchrun: train on each broadcast batch's shard until rank 0 stops."""
    rank, world = dist.get_rank(), dist.get_world_size()
    steps = 0
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            return steps
        payload, weights, version = box[0]
        rollouts = [common_pb2.ScoredRollout.FromString(b) for b in payload]
        batch = collate(rollouts, pad_token_id=pad_token_id, weights=weights)
        trainer.step(batch.shard(rank, world), current_version=version)
        steps += 1
