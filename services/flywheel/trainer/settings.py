"""Trainer service settings (environment variables FLYWHEEL_TRAINER_*).

The PPO hyper-parameters are defined once, in `PPOConfig`; each of its fields is the setting
`trainer_<field>` here (e.g. `kl_coef` -> FLYWHEEL_TRAINER_KL_COEF), generated with the same
type, default, validation and description, and `ppo_config()` gathers them back.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

from pydantic import Field, create_model

from flywheel.bus import topics
from flywheel.runtime.config import ServiceSettings
from flywheel.trainer.ppo_config import PPOConfig

PPO_PREFIX = "trainer_"

# ServiceSettings plus one trainer_<field> setting per PPOConfig field.
_WithPPOSettings = create_model(  # type: ignore[call-overload]
    "_WithPPOSettings", __base__=ServiceSettings,
    **{PPO_PREFIX + name: (info.annotation, copy.copy(info)) for name, info in PPOConfig.model_fields.items()})


class TrainerSettings(_WithPPOSettings):  # type: ignore[misc,valid-type]
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
    trainer_reward_job_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "float32", description="Precision of a reward-model training job's forward passes (weights, gradients and "
        "optimizer stay fp32; bf16 is torch.autocast). `auto` = bfloat16 where the hardware computes it natively.")

    def reward_dataset_roots(self) -> list[Path]:
        return list(self.trainer_reward_dataset_roots) or [self.home / "preference" / "exports"]

    def ppo_config(self) -> PPOConfig:
        return PPOConfig(**{name: getattr(self, PPO_PREFIX + name) for name in PPOConfig.model_fields})

    def checkpoint_root(self) -> str:
        return self.trainer_checkpoint_uri or (self.home / "checkpoints" / "policy").resolve().as_uri()
