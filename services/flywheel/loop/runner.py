"""The whole RLHF loop, run locally as real services talking over Kafka and gRPC.

    prompts topic -> policy -> rollouts -> simulated raters -> preference (Bradley–Terry)
      -> export -> trainer.TriggerRewardModelTraining -> reward-model version -> reward service
      -> scored rollouts -> trainer (PPO) -> policy version -> policy hot reload -> ...

The simulated raters judge by a hidden ground truth (VADER compound of the response) with noise,
and some of them are adversarial. PPO only ever sees the learned reward model; the loop measures
the hidden ground truth on held-out prompts for every policy version to show that it learns.

`LoopRunner` is used by `flywheel demo`; the learning test (tests/test_demo.py) runs `flywheel demo`
with smaller numbers.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc

from flywheel.bus import TypedConsumer, TypedProducer, ensure_topics, topics
from flywheel.loop.evaluation import EvalResult, evaluate_policy, paired_improvement_z
from flywheel.loop.local import LocalCluster
from flywheel.loop.prompts import CorpusPrompt, load_prompts, to_proto
from flywheel.loop.report import LoopReport, VersionRecord
from flywheel.policy.settings import PolicySettings
from flywheel.preference.settings import PreferenceSettings
from flywheel.reward.settings import RewardSettings
from flywheel.runtime.config import ServiceSettings, settings_env
from flywheel.runtime.process import machine_threads
from flywheel.trainer.settings import TrainerSettings
from flywheel.v1 import (
    common_pb2,
    policy_pb2,
    policy_pb2_grpc,
    preference_pb2,
    preference_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)

log = logging.getLogger(__name__)


@dataclass
class LoopConfig:
    """Knobs of the local loop. Defaults are the demo's (about 30 minutes on 2 CPU cores)."""

    minutes: float = 30.0
    # End the PPO phase after this many new policy versions, even before `minutes` (0: run for `minutes`).
    max_policy_versions: int = 0
    # sampling of training rollouts. Eight candidates per prompt: the raters rank all eight, so a
    # prompt yields up to 28 pairs; measured against four candidates on twice the prompts (the same
    # sampling cost), the reward model reached 0.85 instead of 0.80 pairwise accuracy on clear pairs.
    candidates: int = 8
    temperature: float = 0.9
    top_p: float = 0.95
    max_new_tokens: int = 24
    # raters
    raters: int = 6
    adversarial_raters: int = 1
    rater_noise: float = 0.05
    # A rater calls two responses equally good when their (noisy) sentiment differs by less than this,
    # as people do with "about the same": VADER separates responses by tiny lexical differences no
    # reader could rank, and forcing an order there only adds coin-flip pairs to the dataset.
    rater_tie_threshold: float = 0.25
    # reward model
    # Prompts rated before the first reward model is trained (x candidates responses). Measured with
    # four candidates: 64 prompts (~300 pairs) gave a chance-level reward model, 240 a policy that learns.
    bootstrap_prompts: int = 120
    # Train reward models on clear preferences only: pairs whose Bradley–Terry consensus gap is at
    # least this (log-strength units). Ties and near-ties carry no order to learn.
    export_min_margin: float = 1.0
    reward_epochs: int = 2
    # Retrain on all preferences so far this long after the previous model (0: never); the job runs
    # on the trainer service beside PPO.
    reward_retrain_minutes: float = 8.0
    # PPO (trainer service settings)
    ppo_batch_size: int = 32
    ppo_mini_batch_size: int = 8
    ppo_epochs: int = 2
    learning_rate: float = 5e-5  # measured: +0.2 held-out truth in 5 steps with an oracle reward
    # KL to the reference: an adaptive controller (Ziegler et al.) keeps it near the target. The
    # horizon is in sequences and sized to this loop (a batch moves the coefficient by up to 10%);
    # Ziegler's 10,000 suits runs of many thousand batches and would leave it fixed here. The first
    # steps train on the base policy's rollouts (KL exactly 0) and lower the start value. Measured
    # in 30-minute runs before reward normalisation: start 0.05 let KL run to 15-20 nats; 0.1 kept it
    # at 6-10 until the second reward model arrived, then 13-17 (held-out truth +0.36 at the end); 0.2
    # held it at ~6 for 13 steps but learned no faster (+0.28). With normalised rewards and 0.1: at most
    # 12.6, truth +0.33 (docs/results/demo-2026-11-30).
    kl_coef: float = 0.1
    adaptive_kl: bool = True
    target_kl: float = 6.0
    kl_horizon: int = 64
    # A policy checkpoint with its optimizer state is ~1.6 GB for SmolLM2-135M: keep the newest few
    # (the reference model is never pruned), or a 30-minute run fills 35 GB of disk.
    keep_checkpoints: int = 3
    # feeding: keep this many prompts queued ahead of the trainer (two batches: rollouts more than
    # max_version_lag versions old are dropped by the trainer)
    prompts_in_flight: int = 8
    # One torch thread per serving process: on 2 shared cores, more threads per process thrash...
    torch_threads: int = 1
    # ...but the trainer, the loop's bottleneck (a PPO step is ~50 s of one core's compute, while the
    # policy needs a few seconds per batch), gets the machine's cores, and so do its reward-model jobs.
    # Measured 2026-12-01 in the 12-minute learning test: with one trainer thread 5 PPO steps ran and the
    # held-out truth rose +0.074 (z 1.0); before 2026-12-01 the first in-process reward-model job
    # silently switched the trainer to 2 threads, which is what the earlier +0.2 (z ~4, 9 steps) ran on.
    trainer_torch_threads: int = field(default_factory=lambda: min(4, machine_threads()))
    # Precision of the PPO step's forward passes and of reward scoring ("auto": bf16 where the hardware
    # has it). Measured 2026-12-01 on AMX: a PPO step 1.6x, MiniLM scoring 1.4x faster, and the
    # learning test passes with both (docs/policy.md). The services default to float32.
    # `reward_dtype` is also the reward-model training jobs' (164.5 s -> 130.3 s for 1,001 pairs).
    trainer_dtype: str = "auto"
    reward_dtype: str = "auto"
    # held-out evaluation
    eval_prompts: int = 48  # at most this many (chatterbot-corpus has 107 held-out prompts)
    eval_temperature: float = 0.7
    eval_seed: int = 1234
    # Evaluate every new policy version (1), every n-th one, or only the base and the last (0).
    eval_every: int = 1
    extra_env: dict[str, dict[str, str]] = field(default_factory=dict)  # per service overrides


@dataclass
class LoopStatus:
    phase: str = "starting"
    prompts_sent: int = 0
    prompts_rated: int = 0
    rankings_submitted: int = 0
    policy_version: str = "policy-0000"
    reward_version: str = "-"
    trainer_step: int = 0
    trainer_consumed: int = 0
    trainer_buffered: int = 0
    kl: float = 0.0
    mean_reward: float = 0.0
    last_ground_truth: float = float("nan")


class LoopRunner:
    def __init__(self, cluster: LocalCluster, config: LoopConfig,
                 on_status: Callable[[LoopStatus, LoopReport], None] | None = None) -> None:
        self.cluster = cluster
        self.config = config
        self.report = LoopReport()
        self.status = LoopStatus()
        self.human: tuple[str, str] | None = None  # (web UI address, rater token) once the services run
        self._on_status = on_status or (lambda status, report: None)
        self._stop = threading.Event()
        self._start = time.monotonic()
        corpus = load_prompts()
        self.train_prompts: list[CorpusPrompt] = [p for p in corpus if p.split == "train"]
        self.eval_prompts: list[CorpusPrompt] = [p for p in corpus if p.split == "eval"][: config.eval_prompts]
        self._next_prompt = 0
        self.evals: list[EvalResult] = []

    # -- helpers -----------------------------------------------------------------------------
    def minutes(self) -> float:
        return (time.monotonic() - self._start) / 60.0

    def _emit(self) -> None:
        self._on_status(self.status, self.report)

    def _training_sampling(self) -> common_pb2.SamplingParams:
        c = self.config
        return common_pb2.SamplingParams(temperature=c.temperature, top_p=c.top_p, max_new_tokens=c.max_new_tokens,
                                         n=c.candidates)

    def _eval_sampling(self) -> common_pb2.SamplingParams:
        c = self.config
        return common_pb2.SamplingParams(temperature=c.eval_temperature, max_new_tokens=c.max_new_tokens, n=1,
                                         seed=c.eval_seed)

    def feed(self, producer: TypedProducer, count: int) -> None:
        """Publish the next `count` training prompts (cycling through the corpus)."""
        sampling = self._training_sampling()
        for _ in range(count):
            prompt = self.train_prompts[self._next_prompt % len(self.train_prompts)]
            message = to_proto(prompt, sampling)
            # A prompt can come round again; give each pass its own id so lineage stays unique.
            passes = self._next_prompt // len(self.train_prompts)
            if passes:
                message.prompt_id = f"{prompt.prompt_id}-r{passes}"
            producer.send(topics.PROMPTS, message, key=message.prompt_id)
            self._next_prompt += 1
            self.status.prompts_sent += 1
        producer.flush()

    def service_env(self, name: str) -> dict[str, str]:
        c = self.config
        threads = c.trainer_torch_threads if name == "trainer" else c.torch_threads
        env = settings_env(ServiceSettings, torch_threads=threads)
        env["OMP_NUM_THREADS"] = str(threads)
        if name == "policy":
            env.update(settings_env(PolicySettings, policy_http_port=0, policy_max_batch_size=32,
                                    policy_default_max_new_tokens=c.max_new_tokens))
        elif name == "preference":  # simulated raters lease tasks: every group to 3 of them, all candidates
            env.update(settings_env(PreferenceSettings, preference_task_overlap=3, preference_task_max_candidates=16,
                                    preference_task_random_share=0, preference_task_gold_rate=0))
        elif name == "reward":
            env.update(settings_env(RewardSettings, reward_dtype=c.reward_dtype))
        elif name == "trainer":
            env.update(settings_env(
                TrainerSettings, trainer_dtype=c.trainer_dtype, trainer_batch_size=c.ppo_batch_size, trainer_mini_batch_size=c.ppo_mini_batch_size,
                trainer_ppo_epochs=c.ppo_epochs, trainer_learning_rate=c.learning_rate, trainer_kl_coef=c.kl_coef,
                trainer_adaptive_kl=c.adaptive_kl, trainer_target_kl=c.target_kl, trainer_kl_horizon=c.kl_horizon,
                trainer_reward_epochs=c.reward_epochs, trainer_reward_job_dtype=c.reward_dtype,
                trainer_start_paused=True,
                trainer_keep_checkpoints=c.keep_checkpoints,
                trainer_reward_output_dir=self.cluster.run_dir / "home" / "checkpoints" / "reward"))
        env.update(c.extra_env.get(name, {}))
        return env

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> LoopReport:
        """Run the loop. Its own Kafka clients and rater threads are closed before this returns, on
        success, error or Ctrl-C alike, so the caller can then stop the services and the broker."""
        cluster = self.cluster
        self.status.phase = "starting kafka"
        self._emit()
        bootstrap = cluster.bootstrap or cluster.start_kafka()
        ensure_topics(bootstrap)
        producer = TypedProducer(bootstrap, client_id="flywheel-loop")
        self._raters = None
        try:
            self.status.phase = "starting services"
            self._emit()
            for name in ("policy", "preference", "trainer"):
                cluster.start_service(name, self.service_env(name))
            self._raters = self._start_raters(bootstrap)
            from flywheel.loop.raters import human_rater

            self.human = human_rater(cluster)  # (web UI address, rater token) for a person to join
            self._emit()
            self._run_phases(producer)
        finally:
            self._record_counters()
            if self._raters is not None:
                self._raters.stop()
            producer.close()
        return self.report

    def _run_phases(self, producer: TypedProducer) -> None:
        c = self.config
        cluster = self.cluster
        raters = self._raters
        with grpc.insecure_channel(cluster.services["policy"].target) as policy_channel, \
                grpc.insecure_channel(cluster.services["preference"].target) as preference_channel, \
                grpc.insecure_channel(cluster.services["trainer"].target) as trainer_channel:
            policy = policy_pb2_grpc.PolicyServiceStub(policy_channel)
            preference = preference_pb2_grpc.PreferenceServiceStub(preference_channel)
            trainer = trainer_pb2_grpc.TrainerServiceStub(trainer_channel)

            from flywheel.loop.raters import admin_metadata

            self._admin = admin_metadata(cluster)
            # The base policy is evaluated while it samples the bootstrap candidates: the policy
            # batches both into the same decoding steps, and the trainer has nothing to do yet.
            # Measured on 2 cores: one after the other, evaluating 80 prompts took 1.8 minutes and the
            # bootstrap 4.2; together, 107 prompts and the bootstrap took 3.2 (2026-12-02).
            self.status.phase = "collecting preferences for the first reward model"
            self.feed(producer, c.bootstrap_prompts)
            self._evaluate(policy, trainer_status=None)
            self._wait(lambda: raters.rated_prompts() >= c.bootstrap_prompts, raters, "first ratings")
            self._train_reward_model(preference, trainer)

            self.status.phase = "starting the reward service"
            self._emit()
            cluster.start_service("reward", self.service_env("reward"))
            trainer.Resume(trainer_pb2.ResumeRequest(), timeout=30)

            self.status.phase = "PPO"
            last_rm = self.minutes()
            seen_version = self.status.policy_version
            new_versions = 0
            retraining = None
            while self.minutes() < c.minutes and not self._stop.is_set() and \
                    not (c.max_policy_versions and new_versions >= c.max_policy_versions):
                self._check_services()
                st = trainer.Status(trainer_pb2.StatusRequest(), timeout=30)
                self._update_from_trainer(st)
                backlog = self.status.prompts_sent - int(st.rollouts_consumed) // max(1, c.candidates)
                if backlog < c.prompts_in_flight:
                    self.feed(producer, c.prompts_in_flight - backlog)
                version = st.policy_version.version
                if version and version != seen_version:
                    seen_version = version
                    new_versions += 1
                    if c.eval_every and new_versions % c.eval_every == 0:
                        self._wait_policy_serves(policy, version)
                        self._evaluate(policy, trainer_status=st)
                # Retraining runs on the trainer service beside PPO; the loop keeps evaluating.
                if retraining is not None and self._reward_model_done(trainer, retraining):
                    retraining, last_rm = None, self.minutes()
                if retraining is None and c.reward_retrain_minutes and \
                        self.minutes() - last_rm >= c.reward_retrain_minutes:
                    retraining = self._start_reward_model(preference, trainer)
                self.status.prompts_rated = raters.rated_prompts()
                self.status.rankings_submitted = raters.rankings_submitted()
                self._emit()
                self._stop.wait(2.0)
            self._evaluate_final(policy, trainer)
            self.status.phase = "done"
            if len(self.evals) >= 2:
                z = paired_improvement_z(self.evals[0], self.evals[-1])
                self.report.notes.append(
                    f"held-out ground truth {self.evals[0].policy_version} -> {self.evals[-1].policy_version}: "
                    f"{self.evals[0].mean:+.3f} -> {self.evals[-1].mean:+.3f} (paired z = {z:.1f} over "
                    f"{len(self.evals[0].scores)} prompts)")
            self._emit()

    def _record_counters(self) -> None:
        """What ran so far, also when the run ends early (error or Ctrl-C)."""
        counters = dict(prompts_sent=self.status.prompts_sent, trainer_steps=self.status.trainer_step)
        if self._raters is not None:
            try:
                counters.update(rankings_submitted=self._raters.rankings_submitted(),
                                prompts_rated=self._raters.runner.prompts_rated)
            except Exception:  # noqa: BLE001 - counting must never mask the run's own error
                log.exception("could not read the raters' counters")
        self.report.counters.update(counters)

    def _check_services(self) -> None:
        for name, service in self.cluster.services.items():
            if not service.alive():
                raise RuntimeError(f"{name} died; see {service.log_path}")

    def stop(self) -> None:
        self._stop.set()

    # -- pieces ------------------------------------------------------------------------------
    def _start_raters(self, bootstrap: str):
        from flywheel.loop.raters import RaterPool

        pool = RaterPool(self.cluster, raters=self.config.raters,
                         adversarial=self.config.adversarial_raters, noise=self.config.rater_noise,
                         tie_threshold=self.config.rater_tie_threshold)
        pool.start()
        return pool

    def _wait(self, condition: Callable[[], bool], raters, what: str, timeout_s: float = 3600.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if self._stop.is_set():
                raise KeyboardInterrupt
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            self._check_services()
            self.status.prompts_rated = raters.rated_prompts()
            self.status.rankings_submitted = raters.rankings_submitted()
            self._emit()
            time.sleep(1.0)

    def _train_reward_model(self, preference, trainer) -> None:
        """Export, train and wait for the result (the first reward model: PPO needs it)."""
        self.status.phase = "training a reward model"
        job = self._start_reward_model(preference, trainer)
        while not self._reward_model_done(trainer, job):
            time.sleep(2.0)
            self._emit()
        self.status.phase = "PPO"

    def _start_reward_model(self, preference, trainer) -> tuple[trainer_pb2.RewardModelTrainingJob, int]:
        """Export the preferences rated so far and start a training job on the trainer service."""
        self.status.prompts_rated = self._raters.rated_prompts()
        self.status.rankings_submitted = self._raters.rankings_submitted()
        self._emit()
        export = preference.ExportDataset(
            preference_pb2.ExportDatasetRequest(format=preference_pb2.DATASET_FORMAT_JSONL, publish=True,
                                                min_margin=self.config.export_min_margin),
            metadata=self._admin, timeout=600)
        job = trainer.TriggerRewardModelTraining(
            trainer_pb2.TriggerRewardModelTrainingRequest(dataset_uri=export.pairs_uri,
                                                          epochs=self.config.reward_epochs), timeout=60)
        return job, int(export.num_pairs)

    def _reward_model_done(self, trainer, started: tuple[trainer_pb2.RewardModelTrainingJob, int]) -> bool:
        """Poll a training job; when it succeeded, record the reward model (the reward service
        hot-reloads it from the model-versions topic). Raises if it failed."""
        job, pairs = started
        job = trainer.GetRewardModelTrainingJob(
            trainer_pb2.GetRewardModelTrainingJobRequest(job_id=job.job_id), timeout=30)
        if job.state in ("queued", "running"):
            return False
        if job.state != "succeeded":
            raise RuntimeError(f"reward-model training failed: {job.message}")
        mv = job.model_version
        self.status.reward_version = mv.version
        self.report.reward_models.append({
            "version": mv.version,
            "accuracy": mv.metrics.get("eval_accuracy", float("nan")),
            "pairs": pairs,
            "minutes": round(self.minutes(), 1),
        })
        return True

    def _wait_policy_serves(self, policy, version: str, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            served = policy.GetModelVersion(common_pb2.GetModelVersionRequest(), timeout=30).version
            if served == version:
                self.status.policy_version = version
                return
            time.sleep(1.0)
        raise TimeoutError(f"policy service did not load {version} within {timeout_s:.0f}s")

    def _evaluate(self, policy, trainer_status) -> None:
        previous_phase = self.status.phase
        self.status.phase = f"evaluating {self.status.policy_version} on {len(self.eval_prompts)} held-out prompts"
        self._emit()
        messages = [to_proto(p) for p in self.eval_prompts]
        result = evaluate_policy(policy, messages, self._eval_sampling())
        self.evals.append(result)
        record = VersionRecord(version=result.policy_version or self.status.policy_version,
                               minutes=self.minutes(), ground_truth_mean=result.mean,
                               ground_truth_stderr=result.stderr, ground_truth_scores=result.scores)
        if trainer_status is not None:
            record.step = int(trainer_status.step)
            metrics = trainer_status.policy_version.metrics
            record.kl = float(metrics.get("kl", trainer_status.kl))
            record.kl_coef = float(metrics.get("kl_coef", trainer_status.kl_coef))
            record.reward_mean = float(metrics.get("mean_score", trainer_status.mean_reward))
        else:
            record.kl = 0.0
        self.report.records.append(record)
        self.status.last_ground_truth = result.mean
        self.status.phase = previous_phase
        self._emit()

    def _evaluate_final(self, policy, trainer) -> None:
        """Pause the trainer and evaluate its last version, unless that one was evaluated already."""
        self.status.phase = "pausing the trainer for the final evaluation"
        self._emit()
        trainer.Pause(trainer_pb2.PauseRequest(), timeout=30)
        deadline = time.monotonic() + 600
        st = trainer.Status(trainer_pb2.StatusRequest(), timeout=30)
        while st.state == trainer_pb2.TRAINER_STATE_TRAINING and time.monotonic() < deadline:
            time.sleep(1.0)  # the step in flight finishes and publishes
            st = trainer.Status(trainer_pb2.StatusRequest(), timeout=30)
        self._update_from_trainer(st)
        version = st.policy_version.version
        if version and (not self.report.records or self.report.records[-1].version != version):
            self._wait_policy_serves(policy, version)
            self._evaluate(policy, trainer_status=st)

    def _update_from_trainer(self, st: trainer_pb2.TrainerStatus) -> None:
        self.status.trainer_step = int(st.step)
        self.status.trainer_consumed = int(st.rollouts_consumed)
        self.status.trainer_buffered = int(st.buffered_rollouts)
        self.status.kl = float(st.kl)
        self.status.mean_reward = float(st.mean_reward)


def default_run_dir() -> Path:
    """runs/demo-<time> under the current directory, as an absolute path: every path handed to a
    child process must mean the same directory whatever that process's working directory is."""
    return (Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")).absolute()
