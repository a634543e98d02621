"""TrainerService: Status, Pause, Resume, TriggerRewardModelTraining."""

from __future__ import annotations

import asyncio
import json
import os
import logging
import subprocess
import sys
import tempfile
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from google.protobuf import json_format
from grpc import aio

from flywheel import checkpoints
from flywheel.runtime import InvalidArgument, NotFound, Overloaded, require
from flywheel.runtime.auth import ANY_SCOPE, SCOPE_ADMIN, AuthInterceptor, Guard
from flywheel.runtime.config import default_home
from flywheel.runtime.errors import clip
from flywheel.runtime.uris import UriPolicy, check_uri
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
    """Runs reward-model training jobs one at a time, each as its own process.

    A job is `python -m flywheel.cli reward train ...` (the same command as a Kubernetes Job would
    run): training sets its own threads and seeds at start-up and cannot change the trainer's,
    and a crash or out-of-memory kill of the job leaves the trainer running.
    """

    def __init__(self, *, default_dataset_uri: str | None, output_dir: str | Path | None, default_epochs: int,
                 bootstrap_servers: str | None, model_versions_topic: str | None, torch_threads: int = 0,
                 dtype: str = "float32",
                 cache_dir: Path | None = None, timeout_s: float = 6 * 3600,
                 dataset_policy: UriPolicy | None = None, max_queued: int = 4) -> None:
        self.default_dataset_uri = default_dataset_uri
        # What a caller's dataset_uri may name (the operator's default_dataset_uri is trusted).
        self.dataset_policy = dataset_policy or UriPolicy("dataset_uri", local_roots=())
        self.max_queued = max_queued
        self.output_dir = output_dir
        self.default_epochs = default_epochs
        self.bootstrap_servers = bootstrap_servers
        self.model_versions_topic = model_versions_topic
        self.torch_threads = torch_threads
        self.dtype = dtype
        self.cache_dir = cache_dir or default_home() / "datasets"
        self.timeout_s = timeout_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-model-training")
        self._jobs: dict[str, RewardJob] = {}
        self._lock = threading.Lock()
        self._process: subprocess.Popen[str] | None = None

    def submit(self, dataset_uri: str, epochs: int) -> RewardJob:
        job = RewardJob(job_id=uuid.uuid4().hex[:12], dataset_uri=dataset_uri or (self.default_dataset_uri or ""),
                        epochs=epochs or self.default_epochs)
        with self._lock:
            pending = sum(1 for j in self._jobs.values() if j.state in ("queued", "running"))
            if pending >= self.max_queued:
                raise Overloaded(f"{pending} reward-model training jobs are queued or running; retry later")
            self._jobs[job.job_id] = job
        self._executor.submit(self._run, job)
        return job

    def get(self, job_id: str) -> RewardJob:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no reward-model training job {clip(job_id)!r}")
        return job

    def latest(self) -> RewardJob | None:
        with self._lock:
            return list(self._jobs.values())[-1] if self._jobs else None

    def command(self, job: RewardJob, result_file: Path) -> list[str]:
        """The `flywheel reward train` command line of `job`."""
        cmd = [sys.executable, "-m", "flywheel.cli", "reward", "train", "--epochs", str(job.epochs),
               "--torch-threads", str(self.torch_threads), "--dtype", self.dtype, "--result-file", str(result_file)]
        if job.dataset_uri:
            cmd += ["--data", str(checkpoints.resolve(job.dataset_uri, self.cache_dir))]
        elif self.bootstrap_servers:
            cmd += ["--from-topic"]
        else:
            raise ValueError("no dataset_uri given and no Kafka to read aggregated preferences from")
        if self.bootstrap_servers:
            cmd += ["--bootstrap-servers", self.bootstrap_servers, "--publish"]
            if self.model_versions_topic:
                cmd += ["--model-versions-topic", self.model_versions_topic]
        if self.output_dir is not None:
            cmd += ["--output-dir", str(self.output_dir)]
        return cmd

    def job_env(self) -> dict[str, str]:
        """The trainer's environment, with OpenMP's thread count matching the job's torch threads (an
        inherited OMP_NUM_THREADS=1 would otherwise cap torch's inter-op pools and its default)."""
        env = dict(os.environ)
        if self.torch_threads > 0:
            env["OMP_NUM_THREADS"] = str(self.torch_threads)
        return env

    def _run(self, job: RewardJob) -> None:
        job.state = "running"
        try:
            with tempfile.TemporaryDirectory(prefix="flywheel-reward-job-") as tmp:
                result_file = Path(tmp) / "result.json"
                with self._lock:
                    self._process = subprocess.Popen(self.command(job, result_file), stdout=subprocess.DEVNULL,
                                                     stderr=subprocess.PIPE, text=True, env=self.job_env())
                try:
                    _, stderr = self._process.communicate(timeout=self.timeout_s)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.communicate()
                    raise TimeoutError(f"reward-model training ran over {self.timeout_s:.0f}s") from None
                result = json.loads(result_file.read_text()) if result_file.exists() else {}
                if self._process.returncode != 0 or "error" in result:
                    tail = (stderr or "").strip().splitlines()[-1:] or [f"exit status {self._process.returncode}"]
                    raise RuntimeError(result.get("error") or tail[0])
            job.model_version = json_format.ParseDict(result["model_version"], common_pb2.ModelVersion())
            accuracy = result["metrics"].get("eval_accuracy")
            job.message = f"trained {job.model_version.version}" + (
                f" (held-out accuracy {accuracy:.3f})" if accuracy is not None else "")
            job.state = "succeeded"
        except Exception as exc:  # noqa: BLE001 - reported through the job's state
            log.error("reward-model training job %s failed: %s", job.job_id, exc)
            job.state = "failed"
            job.message = str(exc) if isinstance(exc, RuntimeError) else f"{type(exc).__name__}: {exc}"
        finally:
            with self._lock:
                self._process = None
        metrics.REWARD_JOBS.labels(job.state).inc()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the running job (SIGTERM, then SIGKILL after `timeout_s`) and drop queued ones."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()


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
            checked = check_uri(uri, self.jobs.dataset_policy)
            if checked.local_path is not None and not await asyncio.to_thread(checked.local_path.exists):
                raise InvalidArgument("dataset_uri", f"{clip(uri)!r} does not exist")
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


TRAINER_SERVICE = "flywheel.v1.TrainerService"


def auth_interceptor(guard: Guard) -> AuthInterceptor:
    """Control RPCs (pause, resume, reward-model training) need an admin key; reading status any key."""
    return AuthInterceptor(guard, {TRAINER_SERVICE: ANY_SCOPE,
                                   **{f"/{TRAINER_SERVICE}/{m}": SCOPE_ADMIN
                                      for m in ("Pause", "Resume", "TriggerRewardModelTraining")}})


def registrations(servicer: TrainerServicer) -> list[tuple[str, Callable[[aio.Server], None]]]:
    return [(TRAINER_SERVICE,
             lambda server: trainer_pb2_grpc.add_TrainerServiceServicer_to_server(servicer, server))]
