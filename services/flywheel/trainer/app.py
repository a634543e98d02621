"""Composition of the trainer service: PPO trainer + Kafka loop + gRPC TrainerService.

`flywheel serve trainer` runs it. Under `torchrun --nproc_per_node N` (WORLD_SIZE > 1) every
rank loads the model, wraps it in DistributedDataParallel (gloo on CPU, NCCL on GPU); rank 0 runs
the service (Kafka, gRPC, checkpoints) and the other ranks follow its broadcast batches.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from flywheel.bus import consumer_for, ensure_topics_for, producer_for, topics
from flywheel.bus.probe import BrokerProbe
from flywheel.bus.topics import Topic
from flywheel.runtime import ServiceRuntime
from flywheel.runtime.auth import Guard
from flywheel.runtime.uris import UriPolicy
from flywheel.trainer.checkpoint import CheckpointStore
from flywheel.trainer.loop import LoadedTrainer, TrainerLoop, follow, load_trainer
from flywheel.trainer.service import RewardJobRunner, TrainerServicer, auth_interceptor, registrations
from flywheel.trainer.settings import TrainerSettings
from flywheel.versions import BASE_POLICY_VERSION

log = logging.getLogger(__name__)

Settings = TrainerSettings


@dataclass
class TrainerApp:
    """Handles to the parts of a built service (tests and the demo use them)."""

    runtime: ServiceRuntime
    loop: TrainerLoop
    store: CheckpointStore
    jobs: RewardJobRunner


def base_model_path(settings: TrainerSettings) -> Path:
    if settings.trainer_base_model:
        return Path(settings.trainer_base_model)
    from flywheel.models import smollm2_checkpoint

    return smollm2_checkpoint()


def _ddp_wrap():  # noqa: ANN202
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None

    def wrap(policy):  # noqa: ANN001, ANN202
        # (the reference model follows the policy's device in PPOTrainer)
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            policy.to(device)
            return torch.nn.parallel.DistributedDataParallel(policy, device_ids=[device.index])
        return torch.nn.parallel.DistributedDataParallel(policy)

    return wrap


def load(settings: TrainerSettings, store: CheckpointStore) -> LoadedTrainer:
    return load_trainer(settings.ppo_config(), store, base_model_path(settings), wrap=_ddp_wrap())


def model_name(loaded: LoadedTrainer, store: CheckpointStore) -> str:
    """The name versions are announced under: the one the run started with (kept in every checkpoint's
    metadata), not the directory a resumed trainer happened to load from."""
    if loaded.version != BASE_POLICY_VERSION:
        info = store.info(loaded.version)
        if info is not None and info.model_name:
            return info.model_name
    return Path(loaded.base_model_path).name


def build_app(settings: TrainerSettings) -> TrainerApp:
    scored_topic = Topic(settings.trainer_scored_rollouts_topic, topics.SCORED_ROLLOUTS.message_type)
    versions_topic = Topic(settings.trainer_model_versions_topic, topics.MODEL_VERSIONS.message_type)
    ensure_topics_for(settings, [scored_topic, versions_topic])
    store = CheckpointStore(settings.checkpoint_root())
    store.cleanup_staging()
    loaded = load(settings, store)
    producer = producer_for(settings)
    consumer = consumer_for(settings, scored_topic, None, producer, max_poll_records=settings.trainer_batch_size,
                            max_poll_interval_ms=settings.trainer_max_poll_interval_ms)
    loop = TrainerLoop(
        loaded, store, consumer, producer, batch_size=settings.trainer_batch_size,
        model_versions_topic=versions_topic, max_steps=settings.trainer_max_steps,
        keep_checkpoints=settings.trainer_keep_checkpoints, start_paused=settings.trainer_start_paused,
        poll_timeout_ms=settings.kafka_poll_timeout_ms, model_name=model_name(loaded, store),
        reload=lambda: load(settings, store))
    jobs = RewardJobRunner(
        default_dataset_uri=settings.trainer_reward_dataset_uri, output_dir=settings.trainer_reward_output_dir,
        default_epochs=settings.trainer_reward_epochs, bootstrap_servers=settings.kafka_bootstrap_servers,
        model_versions_topic=settings.trainer_model_versions_topic,
        torch_threads=settings.trainer_reward_job_torch_threads or settings.torch_threads,
        dtype=settings.trainer_reward_job_dtype,
        cache_dir=settings.home / "datasets",
        dataset_policy=UriPolicy("dataset_uri", settings.reward_dataset_roots(), settings.trainer_reward_dataset_remote),
        max_queued=settings.trainer_reward_max_queued_jobs)
    runtime = ServiceRuntime(settings)
    for name, register in registrations(TrainerServicer(loop, jobs)):
        runtime.add_service(name, register)
    runtime.add_interceptor(auth_interceptor(Guard.from_settings(settings)))
    runtime.add_worker(loop)
    # Status and control RPCs work without the broker: stay ready, report the dependency.
    runtime.add_worker(BrokerProbe(settings, runtime.readiness, gate=False))

    async def close() -> None:  # both block (a running job, unsent records): off the event loop
        await asyncio.to_thread(jobs.shutdown)
        await asyncio.to_thread(producer.close)

    runtime.on_stop(close)
    return TrainerApp(runtime=runtime, loop=loop, store=store, jobs=jobs)


def build(settings: TrainerSettings) -> ServiceRuntime:
    return build_app(settings).runtime


def init_distributed() -> tuple[int, int]:
    """Initialise torch.distributed from torchrun's environment; (rank, world_size)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


async def serve(settings: TrainerSettings) -> None:
    rank, world = init_distributed()
    if rank == 0:
        await build_app(settings).runtime.serve()
    else:
        import asyncio

        store = CheckpointStore(settings.checkpoint_root())
        loaded = load(settings, store)
        pad = loaded.tokenizer.pad_token_id or loaded.tokenizer.eos_token_id or 0
        steps = await asyncio.to_thread(follow, loaded.trainer, int(pad))
        log.info("rank %d/%d: followed %d steps", rank, world, steps)
