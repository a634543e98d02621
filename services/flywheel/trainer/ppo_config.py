"""`PPOConfig`: every PPO knob, defined once (name, default, validation, description).

The trainer service exposes each field as the setting `trainer_<field>` (environment variable
`FLYWHEEL_TRAINER_<FIELD>`): `TrainerSettings` generates those settings from this model, so the
docs table, the chart's allowed `config` keys and the unknown-variable check follow it. The bench
and the tests build it directly. Kept free of torch so settings load without it.

Defaults were chosen against common practice (see docs/trainer.md). TRL 1.9.2 experimental
PPOConfig (for comparison): kl_coef 0.05, cliprange 0.2, cliprange_value 0.2, vf_coef 0.1,
gamma 1.0, lam 0.95, num_ppo_epochs 4, whiten rewards off, kl_estimator k1, learning_rate 3e-6.
Ziegler et al. 2019 / early TRL: adaptive KL (init 0.2, target 6, horizon 10000).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class PPOConfig(BaseModel):
    """PPO hyper-parameters; invalid values raise `pydantic.ValidationError` (a ValueError) at
    construction and on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    learning_rate: float = Field(1e-5, gt=0, description="AdamW learning rate (TRL: 3e-6 for 1B-class models; "
                                 "small models tolerate more).")
    adam_betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas (JSON list of two floats).")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    ppo_epochs: int = Field(4, ge=1, description="PPO epochs over each batch (TRL num_ppo_epochs: 4).")
    mini_batch_size: int = Field(4, ge=1, description="Sequences per optimizer step (per rank).")
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount; 1.0 is standard for LM rewards given at the "
                         "last token.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda (TRL: 0.95).")
    cliprange: float = Field(0.2, gt=0, description="Clip of the probability ratio in the surrogate objective "
                             "(TRL: 0.2).")
    cliprange_value: float = Field(0.2, gt=0, description="Clip of the value update around the old values "
                                   "(TRL: 0.2).")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss (TRL: 0.1).")
    ent_coef: float = Field(0.0, ge=0, description="Entropy-bonus weight; 0 disables it (common for RLHF).")
    max_grad_norm: float = Field(1.0, ge=0, description="Global gradient-norm clip; 0 disables it.")
    kl_estimator: Literal["k1", "k3"] = Field(
        "k1", description="Per-token KL estimator in the reward: k1 = log p - log q (unbiased, can be negative per "
        "token); k3 = (r - 1) - log r with r = q/p (unbiased, always >= 0, lower variance).")
    adaptive_kl: bool = Field(False, description="Adaptive KL controller (Ziegler et al.: target, horizon) instead "
                              "of a fixed coefficient.")
    kl_coef: float = Field(0.05, ge=0, description="Initial (adaptive) or fixed KL coefficient (TRL: 0.05 fixed; "
                           "adaptive mode traditionally 0.2).")
    target_kl: float = Field(6.0, gt=0, description="Adaptive KL: target KL per sequence, in nats (Ziegler et al.: 6).")
    kl_horizon: int = Field(10_000, gt=0, description="Adaptive KL: horizon in sequences (Ziegler et al.: 10000).")
    whiten_advantages: bool = Field(True, description="Whiten advantages (global statistics under DDP).")
    whiten_rewards: bool = Field(False, description="Whiten per-token rewards before GAE.")
    score_clip: float | None = Field(None, gt=0, description="Clip reward-model scores to +-this (unset: no clip).")
    missing_eos_penalty: float | None = Field(
        None, description="Subtracted from the score of responses that did not finish (truncated at max length; "
        "unset: no penalty).")
    temperature: float | None = Field(
        None, gt=0, description="Temperature the log-probs are computed at; unset: each rollout's own sampling "
        "temperature (the policy service reports log-softmax(logits / temperature)).")
    ratio_logprobs: Literal["behaviour", "recompute"] = Field(
        "behaviour", description="Old log-probs of the PPO ratio: the behaviour policy's (carried by the rollout, "
        "correct for stale rollouts) or recomputed by the current policy at step start. Affects only the ratio; "
        "the KL penalty's are kl_logprobs.")
    kl_logprobs: Literal["behaviour", "recompute"] = Field(
        "behaviour", description="Log pi in the KL penalty KL(pi || pi_ref): the rollout's behaviour log-probs (the "
        "policy that drew the tokens) or the trainer's recomputation at step start (in the trainer's dtype; the "
        "reference always runs in fp32).")
    sampler_correction: Literal["auto", "tis", "none"] = Field(
        "auto", description="Sampler-trainer mismatch correction: `tis` always applies truncated importance "
        "sampling, `none` never, `auto` once the measured mismatch KL exceeds mismatch_kl_threshold.")
    tis_cap: float = Field(2.0, ge=1, description="Cap of the truncated importance weight p_trainer / p_sampler "
                           "(Yao et al. 2025 use 2).")
    mismatch_kl_threshold: float = Field(
        1e-4, ge=0, description="Per-token KL(sampler || trainer) above which `auto` turns the correction on (fp32 "
        "sampler and trainer measure ~2e-11; a bf16 sampler against an fp32 trainer ~1.6e-3 on SmolLM2).")
    dtype: Literal["float32", "bfloat16", "auto"] = Field(
        "float32", description="Precision of the PPO step's forward passes: bfloat16 runs policy and value head "
        "under torch.autocast (fp32 weights, optimizer, loss maths and reference); `auto` = bfloat16 on CUDA with "
        "bf16 and on CPUs with AMX-BF16/AVX512-BF16 (the local loop's choice; docs/policy.md).")
    max_version_lag: int = Field(2, ge=0, description="Drop rollouts more than this many policy versions behind "
                                 "the trainer.")
    staleness_weight_decay: float = Field(
        1.0, gt=0, le=1, description="Weight kept rollouts by decay ** version_lag in the losses (1 = off).")
    value_head_init_std: float = Field(0.0, ge=0, description="Std of the value head's initial weights (0: start "
                                       "from zero values).")
    seed: int = Field(0, description="Seed of minibatch shuffling and the value-head init.")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PPOConfig":
        """From `to_dict` output (e.g. a checkpoint's metadata); keys this version does not know are skipped."""
        return cls.model_validate({k: v for k, v in data.items() if k in cls.model_fields})
