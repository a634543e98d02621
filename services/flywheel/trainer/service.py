"""TrainerService: Status, Pause, Resume, TriggerRewardModelTraining."""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from grpc import aio

from flywheel.runtime import InvalidArgument, NotFound, require
from flywheel.trainer import metrics
from flywheel.trainer.loop import LoopState, TrainerLoop
from flywheel.v1 import common_pb2, trainer_pb2, trainer_pb2_grpc

log = logging.getLogger(__name__)

_STATE = {
    LoopState.WAITING: trainer_pb2.TRAINER_STATE_WAITING,
    LoopState.TRAINING: trainer_pb2.TRAINER_STATE_TRAINING,
    LoopState.PAUSED: trainer_pb2.TRAINER_STATE_PAUSED,
    LoopState.STOPPING: trainer_pb2.TRAINER_STATE_STOPPING,
}


def status_message(loop: TrainerLoop, job: "RewardJob | None" = None) -> trainer_pb2.TrainerStatus:
    snap = loop.snapshot()
    stats = snap.last_stats
    return trainer_pb2.TrainerStatus(
        reward_model_job=job.to_proto() if job is not None else None,
        state=_STATE[snap.state], step=snap.step, policy_version=loop.model_version_message(),
        kl=stats.get("kl", 0.0), kl_coef=snap.kl_coef, mean_reward=stats.get("mean_score", 0.0),
        policy_loss=stats.get("policy_loss", 0.0), value_loss=stats.get("value_loss", 0.0),
        entropy=stats.get("entropy", 0.0), rollouts_consumed=snap.counters.consumed,
        rollouts_dropped_stale=snap.counters.dropped_stale, buffered_rollouts=snap.buffered,
        metrics={**{k: float(v) for k, v in stats.items()},
                 "rollouts_trained": float(snap.counters.trained),
                 "batch_size": float(loop.batch_size),
                 "rollouts_skipped_eval": float(snap.counters.skipped_eval),
                 "rollouts_duplicate": float(snap.counters.duplicates),
                 "rollouts_invalid": float(snap.counters.invalid)})


# ---------------------------------------------------------------------------------------------
# Reward-model training jobs
# ---------------------------------------------------------------------------------------------


@dataclass
class RewardJob:
    job_id: str
    dataset_uri: str
    epochs: int
    state: str = "queued"
    message: str = ""
    model_version: common_pb2.ModelVersion = field(default_factory=common_pb2.ModelVersion)

    def to_proto(self) -> trainer_pb2.RewardModelTrainingJob:
        return trainer_pb2.RewardModelTrainingJob(job_id=self.job_id, state=self.state,
                                                  model_version=self.model_version, message=self.message)


class RewardJobRunner:
    """Runs `flywheel.reward.training.train_reward_model` jobs one at a time on a worker thread."""

    def __init__(self, *, default_dataset_uri: str | None, output_dir: str | Path | None, default_epochs: int,
                 bootstrap_servers: str | None, model_versions_topic: str | None,
                 train: Callable[..., object] | None = None, kafka_config: dict[str, object] | None = None) -> None:
        self.default_dataset_uri = default_dataset_uri
        self.output_dir = output_dir
        self.default_epochs = default_epochs
        self.bootstrap_servers = bootstrap_servers
        self.model_versions_topic = model_versions_topic
        self.kafka_config = kafka_config or {}
        self._train = train
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-model-training")
        self._jobs: dict[str, RewardJob] = {}
        self._lock = threading.Lock()

    def submit(self, dataset_uri: str, epochs: int) -> RewardJob:
        job = RewardJob(job_id=uuid.uuid4().hex[:12], dataset_uri=dataset_uri or (self.default_dataset_uri or ""),
                        epochs=epochs or self.default_epochs)
        with self._lock:
            self._jobs[job.job_id] = job
        self._executor.submit(self._run, job)
        return job

    def get(self, job_id: str) -> RewardJob:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no reward-model training job {job_id!r}")
        return job

    def latest(self) -> RewardJob | None:
        with self._lock:
            return list(self._jobs.values())[-1] if self._jobs else None

    def _run(self, job: RewardJob) -> None:
        job.state = "running"
        try:
            from flywheel.reward.training import RewardTrainingConfig, load_pairs_from_topic, train_reward_model

            kwargs: dict[str, object] = dict(epochs=job.epochs, progress=False,
                                             publish=bool(self.bootstrap_servers),
                                             bootstrap_servers=self.bootstrap_servers,
                                             model_versions_topic=self.model_versions_topic,
                                             kafka_config=self.kafka_config)
            if self.output_dir is not None:
                kwargs["output_dir"] = self.output_dir
            if job.dataset_uri:
                kwargs["data"] = _localise(job.dataset_uri)
            else:
                if not self.bootstrap_servers:
                    raise ValueError("no dataset_uri given and no Kafka to read aggregated preferences from")
                kwargs["pairs"] = load_pairs_from_topic(self.bootstrap_servers, **self.kafka_config)
            train = self._train or train_reward_model
            result = train(RewardTrainingConfig(**kwargs))
            job.model_version = result.model_version  # type: ignore[attr-defined]
            accuracy = result.metrics.get("eval_accuracy")  # type: ignore[attr-defined]
            job.message = f"trained {job.model_version.version}" + (
                f" (held-out accuracy {accuracy:.3f})" if accuracy is not None else "")
            job.state = "succeeded"
        except Exception as exc:  # noqa: BLE001 - reported through the job's state
            log.exception("reward-model training job %s failed", job.job_id)
            job.state = "failed"
            job.message = f"{type(exc).__name__}: {exc}"
        metrics.REWARD_JOBS.labels(job.state).inc()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _localise(uri: str) -> str:
    """A local path for `uri`: file:// URIs map directly, other fsspec URLs are downloaded."""
    if "://" not in uri:
        return uri
    import tempfile

    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols:
        return path
    local = tempfile.mkdtemp(prefix="flywheel-preferences-")
    fs.get(path, local, recursive=True)
    return local


# ---------------------------------------------------------------------------------------------
# The servicer
# ---------------------------------------------------------------------------------------------


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, loop: TrainerLoop, jobs: RewardJobRunner) -> None:
        self.loop = loop
        self.jobs = jobs

    async def Status(self, request: trainer_pb2.StatusRequest, context: aio.ServicerContext) -> trainer_pb2.TrainerStatus:
        return status_message(self.loop, self.jobs.latest())

    async def Pause(self, request: trainer_pb2.PauseRequest, context: aio.ServicerContext) -> trainer_pb2.TrainerStatus:
        self.loop.pause()
        return status_message(self.loop, self.jobs.latest())

    async def Resume(self, request: trainer_pb2.ResumeRequest, context: aio.ServicerContext) -> trainer_pb2.TrainerStatus:
        self.loop.resume()
        return status_message(self.loop, self.jobs.latest())

    async def TriggerRewardModelTraining(self, request: trainer_pb2.TriggerRewardModelTrainingRequest,
                                         context: aio.ServicerContext) -> trainer_pb2.RewardModelTrainingJob:
        require(request.epochs >= 0, "epochs", "must be >= 0 (0 = the configured default)")
        require(request.epochs <= 1000, "epochs", "must be <= 1000")
        uri = request.dataset_uri
        if uri:
            local = uri[len("file://"):] if uri.startswith("file://") else uri
            if "://" not in local and not Path(local).exists():
                raise InvalidArgument("dataset_uri", f"{uri!r} does not exist")
        job = await asyncio.to_thread(self.jobs.submit, uri, request.epochs)
        return job.to_proto()

    async def GetRewardModelTrainingJob(self, request: trainer_pb2.GetRewardModelTrainingJobRequest,
                                        context: aio.ServicerContext) -> trainer_pb2.RewardModelTrainingJob:
        if request.job_id:
            return self.jobs.get(request.job_id).to_proto()
        job = self.jobs.latest()
        if job is None:
            raise NotFound("no reward-model training job has been triggered")
        return job.to_proto()


def registrations(servicer: TrainerServicer) -> list[tuple[str, Callable[[aio.Server], None]]]:
    return [("flywheel.v1.TrainerService",
             lambda server: trainer_pb2_grpc.add_TrainerServiceServicer_to_server(servicer, server))]
