"""Trainer service settings (environment variables FLYWHEEL_TRAINER_*)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from flywheel.bus import topics
from flywheel.runtime.config import ServiceSettings


class TrainerSettings(ServiceSettings):
    """Settings of the PPO trainer service."""

    service_name: str = Field("trainer", description="Name used in logs, metrics and the Kafka client id.")
    grpc_port: int = Field(50054, ge=0, le=65535, description="gRPC port; 0 picks a free port.")
    metrics_port: int = Field(9104, ge=0, le=65535, description="Prometheus /metrics HTTP port; 0 picks a free port.")

    trainer_base_model: str | None = Field(
        None, description="Base policy (and frozen reference) checkpoint directory: a Hugging Face causal LM "
        "+ tokenizer. Unset: SmolLM2-135M-Instruct from flywheel.models (version policy-0000).")
    trainer_checkpoint_uri: str | None = Field(
        None, description="Where policy checkpoints are written (fsspec URI; default file://<home>/checkpoints/policy).")
    trainer_keep_checkpoints: int = Field(
        0, ge=0, description="Keep only the newest N policy checkpoints (0 keeps all).")
    kafka_consumer_group: str = Field("flywheel-trainer", description="Kafka consumer group for scored rollouts.")
    trainer_scored_rollouts_topic: str = Field(
        topics.SCORED_ROLLOUTS.name, description="Topic of scored rollouts to train on.")
    trainer_model_versions_topic: str = Field(
        topics.MODEL_VERSIONS.name, description="Topic new policy versions are published to.")
    trainer_batch_size: int = Field(16, gt=0, description="Scored rollouts per PPO step (one step = one new "
                                    "policy version); under DDP the global batch, split across ranks.")
    trainer_max_steps: int | None = Field(None, description="Stop training after this many steps (unset: run forever).")
    trainer_start_paused: bool = Field(False, description="Start paused (resume with the Resume RPC).")
    trainer_max_poll_interval_ms: int = Field(
        1_800_000, gt=0, description="Kafka max.poll.interval.ms: longest allowed PPO step before the group "
        "considers the trainer dead.")

    # PPO (see flywheel.trainer.ppo.PPOConfig for what each does and common-practice defaults)
    trainer_learning_rate: float = Field(1e-5, gt=0, description="AdamW learning rate.")
    trainer_ppo_epochs: int = Field(4, ge=1, description="PPO epochs over each batch.")
    trainer_mini_batch_size: int = Field(4, ge=1, description="Sequences per optimizer step (per rank).")
    trainer_gamma: float = Field(1.0, ge=0, le=1, description="GAE discount.")
    trainer_lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    trainer_cliprange: float = Field(0.2, gt=0, description="PPO ratio clip.")
    trainer_cliprange_value: float = Field(0.2, gt=0, description="Value-function clip.")
    trainer_vf_coef: float = Field(0.1, ge=0, description="Value-loss weight.")
    trainer_ent_coef: float = Field(0.0, ge=0, description="Entropy-bonus weight (0 disables it).")
    trainer_max_grad_norm: float = Field(1.0, ge=0, description="Gradient-norm clip (0 disables it).")
    trainer_kl_coef: float = Field(0.05, ge=0, description="Initial (adaptive) or fixed KL coefficient.")
    trainer_adaptive_kl: bool = Field(False, description="Adaptive KL controller (target, horizon) instead of fixed.")
    trainer_target_kl: float = Field(6.0, gt=0, description="Adaptive KL target per sequence (nats).")
    trainer_kl_horizon: int = Field(10_000, gt=0, description="Adaptive KL horizon (sequences).")
    trainer_kl_estimator: Literal["k1", "k3"] = Field("k1", description="Per-token KL estimator in the reward.")
    trainer_missing_eos_penalty: float | None = Field(
        None, description="Subtracted from the score of truncated responses (unset: no penalty).")
    trainer_score_clip: float | None = Field(None, description="Clip scores to +-this (unset: no clip).")
    trainer_ratio_logprobs: Literal["behaviour", "recompute"] = Field(
        "behaviour", description="Old log-probs of the PPO ratio: the behaviour policy's (from the rollout) "
        "or recomputed by the current policy.")
    trainer_dtype: Literal["float32", "bfloat16", "auto"] = Field(
        "float32", description="Precision of the PPO step's forward passes: bfloat16 runs policy, value head and "
        "reference under torch.autocast (fp32 weights, optimizer and loss maths); `auto` = bfloat16 on CUDA with "
        "bf16 and on CPUs with AMX-BF16/AVX512-BF16. Opt-in: not yet shown to learn as well (docs/policy.md).")
    trainer_max_version_lag: int = Field(2, ge=0, description="Drop rollouts more than this many policy versions "
                                         "behind the trainer.")
    trainer_staleness_weight_decay: float = Field(
        1.0, gt=0, le=1, description="Weight kept rollouts by decay ** version_lag in the losses (1 = off).")
    trainer_seed: int = Field(0, description="Seed of minibatch shuffling and the value-head init.")

    # Reward-model training jobs (TriggerRewardModelTraining)
    trainer_reward_dataset_uri: str | None = Field(
        None, description="Default preference dataset for reward-model training (JSONL/Parquet file or "
        "directory); unset: read the aggregated-preferences topic.")
    trainer_reward_output_dir: str | None = Field(
        None, description="Where reward-model checkpoints go (default <home>/checkpoints/reward).")
    trainer_reward_epochs: int = Field(1, ge=1, description="Default epochs of a reward-model training job.")
    trainer_reward_dataset_roots: list[Path] = Field(
        default_factory=list, description="Local directories a TriggerRewardModelTraining dataset_uri may name "
        "(JSON list; empty: <home>/preference/exports, where a preference service sharing this home exports). "
        "Anything else is PERMISSION_DENIED.")
    trainer_reward_dataset_remote: list[str] = Field(
        default_factory=list, description="Remote `scheme://host` locations a dataset_uri may name (JSON list, "
        "e.g. [\"s3://datasets\"]); none by default, so no request makes the trainer fetch from anywhere.")
    trainer_reward_max_queued_jobs: int = Field(
        4, ge=1, description="Reward-model training jobs queued or running at once; more is RESOURCE_EXHAUSTED.")
    trainer_reward_job_torch_threads: int = Field(
        0, ge=0, description="torch intra-op threads of a reward-model training job (its own process; also its "
        "OMP_NUM_THREADS). 0: the trainer's own torch_threads.")

    def reward_dataset_roots(self) -> list[Path]:
        return list(self.trainer_reward_dataset_roots) or [self.home / "preference" / "exports"]

    def ppo_config(self):  # noqa: ANN201 - PPOConfig (import kept lazy: torch)
        from flywheel.trainer.ppo import PPOConfig

        return PPOConfig(
            learning_rate=self.trainer_learning_rate, ppo_epochs=self.trainer_ppo_epochs,
            mini_batch_size=self.trainer_mini_batch_size, gamma=self.trainer_gamma, lam=self.trainer_lam,
            cliprange=self.trainer_cliprange, cliprange_value=self.trainer_cliprange_value,
            vf_coef=self.trainer_vf_coef, ent_coef=self.trainer_ent_coef, max_grad_norm=self.trainer_max_grad_norm,
            kl_estimator=self.trainer_kl_estimator, adaptive_kl=self.trainer_adaptive_kl,
            init_kl_coef=self.trainer_kl_coef, target_kl=self.trainer_target_kl, kl_horizon=self.trainer_kl_horizon,
            missing_eos_penalty=self.trainer_missing_eos_penalty, score_clip=self.trainer_score_clip,
            ratio_logprobs=self.trainer_ratio_logprobs, compute_dtype=self.trainer_dtype,
            max_version_lag=self.trainer_max_version_lag,
            staleness_weight_decay=self.trainer_staleness_weight_decay, seed=self.trainer_seed,
        ).validate()

    def checkpoint_root(self) -> str:
        return self.trainer_checkpoint_uri or (self.home / "checkpoints" / "policy").resolve().as_uri()
