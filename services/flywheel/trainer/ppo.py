"""PPO for language models: the policy + value head model and `PPOTrainer` (config: `ppo_config`).

The maths lives in `kl` (estimators, KL controllers), `advantages` (token rewards, GAE) and
`losses` (masked statistics, clipped losses, sampler-mismatch KL and truncated importance weights);
they are re-exported here. One PPO step over a batch of scored rollouts (see `batch.RolloutBatch`):

1. Reference log-probs once per batch under `torch.inference_mode` (frozen reference model).
2. Values (and current log-probs, for diagnostics) once per batch, also without autograd.
3. Per-token reward: `-kl_coef * KL_t` (k1 or k3 estimator of KL(pi_behaviour || pi_ref)) on every
   response token, plus the reward-model score (minus `missing_eos_penalty` if the response was
   truncated) on the last token.
4. GAE(gamma, lambda) as one matrix product (no Python loop over tokens); advantages whitened.
5. `ppo_epochs` passes over shuffled minibatches: one forward per minibatch gives the taken-token
   log-probs, entropy and values; clipped surrogate against the *behaviour* log-probs the rollout
   carries (off-policy ratio), clipped value loss, optional entropy bonus, gradient clipping.
6. The KL controller (adaptive or fixed) is updated with the batch's observed KL.

Sampler-trainer mismatch: the policy service may sample in another precision (bf16) than the
trainer computes in (fp32), so its behaviour log-probs differ from the trainer's for the same
weights. Every step measures KL(sampler || trainer) over the rows of the current policy version
(`mismatch_kl`). When it exceeds `mismatch_kl_threshold` (or `sampler_correction="tis"`), the
ratio is taken against the trainer's own recomputation and each token's surrogate is weighted by
min(p_trainer / p_sampler, tis_cap) (truncated importance sampling); detection is sticky.

Trainer precision (`dtype`): bfloat16 runs the forward passes of the policy and value head under
`torch.autocast`; master weights, gradients, the optimizer and the loss maths (logsumexp, KL, GAE,
whitening) stay fp32, and the frozen reference runs in fp32, so the KL penalty (behaviour log-probs
against the reference's, `kl_logprobs`) carries no autocast noise: with an fp32 sampler it is
exactly the fp32 KL. The trainer's own bf16 log-probs then differ from an fp32 sampler's, which the
mismatch KL measures and TIS corrects, as for a bf16 sampler. (Taking log pi for the KL from the
trainer's recomputation instead would be wrong for stale rollouts: for tokens drawn by an older
policy, log pi_now - log pi_ref estimates no KL and goes negative, which the adaptive controller
would read as room to loosen the penalty.)

Under DDP (`torch.distributed` initialised, model wrapped in DistributedDataParallel) each rank
trains on its shard of the batch: whitening uses global statistics (all-reduce) and gradients are
averaged by DDP, so every rank ends with identical parameters.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from flywheel.precision import autocast, resolve_dtype
from flywheel.trainer.advantages import compute_gae, token_rewards  # noqa: F401 - re-exported
from flywheel.trainer.batch import RolloutBatch
from flywheel.trainer.kl import (  # noqa: F401 - re-exported
    AdaptiveKLController,
    FixedKLController,
    kl_controller_for,
    kl_per_token,
)
from flywheel.trainer.losses import (  # noqa: F401 - re-exported
    _dist_active,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    sampler_mismatch_kl,
    truncated_is_weights,
    value_loss,
)
from flywheel.trainer.ppo_config import PPOConfig

# --------------------------------------------------------------------------------------------
# Model: causal LM + value head, one forward for taken-token log-probs, entropy and values
# --------------------------------------------------------------------------------------------


def gather_response_hidden(hidden: torch.Tensor, prompt_lengths: torch.Tensor, response_width: int) -> torch.Tensor:
    """Hidden states that predict each response token: position prompt_len - 1 + t, t < response_width."""
    offsets = torch.arange(response_width, device=hidden.device)
    positions = (prompt_lengths[:, None] - 1 + offsets[None, :]).clamp(max=hidden.shape[1] - 1)
    return hidden.gather(1, positions[:, :, None].expand(-1, -1, hidden.shape[-1]))


def logprobs_from_hidden(lm_head: nn.Module, hidden: torch.Tensor, tokens: torch.Tensor, temperature: torch.Tensor,
                         with_entropy: bool, entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Taken-token log-probs of log_softmax(logits / T) (and the entropy), without materialising
    the full [B, R, V] log-softmax: log p(token) = logit[token] - logsumexp(logits)."""
    logits = lm_head(hidden).float()
    if not bool((temperature == 1).all()):
        logits = logits / temperature[:, None, None]
    lse = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, tokens[:, :, None]).squeeze(-1) - lse
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logprobs, entropy


class PolicyWithValueHead(nn.Module):
    """A Hugging Face causal LM with a scalar value head on its last hidden state.

    `forward` runs the backbone once and applies the LM head only at response positions, so the
    prompt's vocabulary projections are never computed. DDP wraps this module as a whole.
    """

    def __init__(self, lm: nn.Module, value_head_init_std: float = 0.0) -> None:
        super().__init__()
        self.lm = lm
        hidden_size = lm.config.hidden_size if hasattr(lm.config, "hidden_size") else lm.config.n_embd
        self.value_head = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.value_head.weight, std=value_head_init_std) if value_head_init_std > 0 else \
            nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @property
    def config(self):  # noqa: ANN201 - the LM's config
        return self.lm.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lengths: torch.Tensor,
                response_ids: torch.Tensor, temperature: torch.Tensor, with_entropy: bool = True,
                with_values: bool = True, entropy_grad: bool = False) -> tuple[
                    torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        return response_forward(self.lm, input_ids, attention_mask, prompt_lengths, response_ids, temperature,
                                with_entropy=with_entropy, value_head=self.value_head if with_values else None,
                                entropy_grad=entropy_grad)


def response_forward(lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     prompt_lengths: torch.Tensor, response_ids: torch.Tensor, temperature: torch.Tensor,
                     with_entropy: bool = False, value_head: nn.Module | None = None,
                     entropy_grad: bool = False) -> tuple[
                         torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(taken-token log-probs, entropy, values) over the response positions of a right-padded batch."""
    backbone = lm.base_model
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = gather_response_hidden(out.last_hidden_state, prompt_lengths, response_ids.shape[1])
    logprobs, entropy = logprobs_from_hidden(lm.get_output_embeddings(), hidden, response_ids, temperature,
                                             with_entropy, entropy_grad)
    values = value_head(hidden).squeeze(-1).float() if value_head is not None else None
    return logprobs, entropy, values


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


@dataclass
class StepStats:
    """What one PPO step reports (means over the batch unless noted)."""

    step: int
    num_sequences: int
    num_tokens: int
    mean_score: float
    mean_reward: float
    """score + non-score (KL) reward, summed over tokens, averaged over sequences."""
    kl: float
    """Mean per-sequence KL(pi_behaviour || pi_ref) (k1, summed over tokens)."""
    kl_estimator_value: float
    """Mean per-sequence KL with the configured estimator."""
    kl_coef: float
    policy_loss: float
    value_loss: float
    entropy: float
    clipfrac: float
    vf_clipfrac: float
    approx_kl: float
    ratio: float
    advantage_mean: float
    return_mean: float
    value_mean: float
    grad_norm: float
    behaviour_logprob_gap: float
    """Mean |log pi_current - log pi_behaviour| at step start (staleness / numerics diagnostic)."""
    mean_response_length: float
    eos_fraction: float
    step_seconds: float
    episodes_per_second: float
    mismatch_kl: float = 0.0
    """Per-token KL(sampler || trainer) over the batch's rows of the current policy version."""
    tis_active: float = 0.0
    """1 when truncated importance sampling corrected this step."""
    tis_weight_mean: float = 1.0
    """Mean truncated importance weight over response tokens (1 when inactive)."""
    tis_capped_fraction: float = 0.0
    """Fraction of tokens whose importance weight hit tis_cap."""
    extra: dict[str, float] = field(default_factory=dict)

    def as_metrics(self) -> dict[str, float]:
        out = {k: float(v) for k, v in asdict(self).items() if k != "extra"}
        out.update(self.extra)
        return out


def disable_dropout(model: nn.Module) -> None:
    """Dropout off: PPO's ratio and KL compare log-probs across passes, which dropout would perturb."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def make_optimizer(model: nn.Module, config: PPOConfig) -> torch.optim.Optimizer:
    """AdamW; the fused (single-kernel) implementation where the device supports it."""
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(lr=config.learning_rate, betas=config.adam_betas, eps=config.adam_eps,
                  weight_decay=config.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, foreach=True, **kwargs)


class PPOTrainer:
    """PPO over scored rollouts. `step(batch)` runs one full PPO update and returns `StepStats`.

    `policy` is a `PolicyWithValueHead` (optionally wrapped in DistributedDataParallel);
    `ref_model` a frozen causal LM (the base model). The caller owns batching from Kafka.
    """

    def __init__(self, config: PPOConfig, policy: nn.Module, ref_model: nn.Module, *,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
        self.config = config
        self.policy = policy
        self.ref_model = ref_model.eval()
        disable_dropout(policy)
        disable_dropout(ref_model)
        device = next(_unwrap(policy).parameters()).device
        self.ref_model.to(device)
        self.compute_dtype = resolve_dtype(config.dtype, str(device))
        for p in self.ref_model.parameters():
            p.requires_grad_(False)
        self.optimizer = optimizer or make_optimizer(policy, config)
        self.kl_ctl = kl_controller_for(config)
        self.global_step = 0
        self.mismatch_detected = False  # sticky: the sampler's precision does not change at run time
        self._rng = random.Random(config.seed)

    @property
    def module(self) -> PolicyWithValueHead:
        return _unwrap(self.policy)  # type: ignore[return-value]

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"global_step": self.global_step, "kl_ctl": self.kl_ctl.state_dict(),
                "rng": self._rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_step = int(state["global_step"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        if "rng" in state:
            rng = state["rng"]
            self._rng.setstate((rng[0], tuple(rng[1]), rng[2]))

    # -- the step ---------------------------------------------------------------------------
    def _temperature(self, batch: RolloutBatch) -> torch.Tensor:
        if self.config.temperature is not None:
            return torch.full_like(batch.temperature, float(self.config.temperature))
        return batch.temperature

    def step(self, batch: RolloutBatch, current_version: str | None = None) -> StepStats:
        """One PPO update on `batch` (this rank's shard under DDP).

        `current_version` names the policy version the trainer's weights are; the sampler mismatch
        is measured on the rows sampled by that version (all rows when None).
        """
        cfg = self.config
        start = time.perf_counter()
        device = next(self.module.parameters()).device
        batch = batch.to(device)
        mask = batch.response_mask
        weight = batch.weight[:, None].expand_as(mask)
        temperature = self._temperature(batch)
        n = batch.input_ids.shape[0]

        self.policy.eval()
        with torch.inference_mode():
            # The reference always in fp32: the KL penalty compares it with the behaviour log-probs of the
            # policy that drew the tokens (right for stale rollouts too), so it must not add the
            # trainer's autocast noise. One forward without gradients per step.
            ref_logprobs, _, _ = response_forward(self.ref_model, batch.input_ids, batch.attention_mask,
                                                  batch.prompt_lengths, batch.response_ids, temperature)
        with torch.inference_mode(), autocast(self.compute_dtype, device):
            cur_logprobs, _, old_values = self.module(batch.input_ids, batch.attention_mask, batch.prompt_lengths,
                                                      batch.response_ids, temperature, with_entropy=False)
        ref_logprobs = ref_logprobs.clone()
        old_values = old_values.clone() * mask
        recomputed = cur_logprobs.clone() * mask
        behaviour = batch.behaviour_logprobs * mask
        same = torch.tensor([current_version is None or v == current_version for v in batch.policy_versions],
                            dtype=mask.dtype, device=device)
        mismatch_kl = self._global_masked_mean(sampler_mismatch_kl(recomputed, behaviour, mask * same[:, None]),
                                               mask * same[:, None])
        if cfg.sampler_correction == "auto" and mismatch_kl > cfg.mismatch_kl_threshold:
            self.mismatch_detected = True
        tis = cfg.sampler_correction == "tis" or (cfg.sampler_correction == "auto" and self.mismatch_detected)
        is_weight = truncated_is_weights(recomputed, behaviour, cfg.tis_cap) * mask if tis else None
        # the ratio's old log-probs; with TIS the trainer's own (the weights carry the sampler's)
        old_logprobs = recomputed if tis or cfg.ratio_logprobs == "recompute" else behaviour
        policy_logprobs = behaviour if cfg.kl_logprobs == "behaviour" else recomputed

        scores = batch.scores.clone()
        if cfg.score_clip is not None:
            scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (~batch.finished).to(scores.dtype)

        kl_k1 = kl_per_token(policy_logprobs, ref_logprobs, "k1") * mask
        kl_est = kl_per_token(policy_logprobs, ref_logprobs, cfg.kl_estimator) * mask
        kl_coef = self.kl_ctl.value
        rewards, non_score = token_rewards(scores, kl_est, mask, kl_coef)
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = compute_gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask, shift_mean=True)

        self.policy.train()
        totals: dict[str, float] = {}
        counts = 0
        grad_norms: list[float] = []
        mb = max(1, min(cfg.mini_batch_size, n))
        for _epoch in range(cfg.ppo_epochs):
            order = list(range(n))
            self._rng.shuffle(order)
            for begin in range(0, n, mb):
                idx = torch.tensor(order[begin:begin + mb], dtype=torch.long, device=device)
                loss, parts = self.minibatch_loss(batch, idx, temperature, old_logprobs, advantages, returns,
                                                  old_values, weight, is_weight)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.max_grad_norm and cfg.max_grad_norm > 0:
                    norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
                    grad_norms.append(float(norm))
                self.optimizer.step()
                for key, value in parts.items():
                    totals[key] = totals.get(key, 0.0) + float(value)
                counts += 1
        self.policy.eval()

        seq_kl = kl_k1.sum(1)
        seq_kl_est = kl_est.sum(1)
        mean_kl = self._global_mean(seq_kl)
        self.kl_ctl.update(mean_kl, self._global_count(n))
        self.global_step += 1
        elapsed = time.perf_counter() - start
        avg = {k: v / max(counts, 1) for k, v in totals.items()}
        lengths = mask.sum(1)
        return StepStats(
            step=self.global_step,
            num_sequences=n,
            num_tokens=int(lengths.sum()),
            mean_score=self._global_mean(batch.scores),
            mean_reward=self._global_mean(scores + non_score.sum(1)),
            kl=mean_kl,
            kl_estimator_value=self._global_mean(seq_kl_est),
            kl_coef=kl_coef,
            policy_loss=avg.get("policy_loss", 0.0),
            value_loss=avg.get("value_loss", 0.0),
            entropy=avg.get("entropy", 0.0),
            clipfrac=avg.get("clipfrac", 0.0),
            vf_clipfrac=avg.get("vf_clipfrac", 0.0),
            approx_kl=avg.get("approx_kl", 0.0),
            ratio=avg.get("ratio", 1.0),
            advantage_mean=float(masked_mean(advantages, mask)),
            return_mean=float(masked_mean(returns, mask)),
            value_mean=float(masked_mean(old_values, mask)),
            grad_norm=sum(grad_norms) / len(grad_norms) if grad_norms else 0.0,
            behaviour_logprob_gap=float(masked_mean((cur_logprobs - batch.behaviour_logprobs).abs(), mask)),
            mean_response_length=float(lengths.float().mean()),
            eos_fraction=float(batch.finished.float().mean()),
            step_seconds=elapsed,
            episodes_per_second=n / elapsed if elapsed > 0 else math.inf,
            mismatch_kl=mismatch_kl,
            tis_active=float(tis),
            tis_weight_mean=float(masked_mean(is_weight, mask)) if is_weight is not None else 1.0,
            tis_capped_fraction=float(masked_mean((is_weight >= cfg.tis_cap).float(), mask))
            if is_weight is not None else 0.0,
        )

    def minibatch_loss(self, batch: RolloutBatch, idx: torch.Tensor, temperature: torch.Tensor,
                       old_logprobs: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor,
                       old_values: torch.Tensor, weight: torch.Tensor,
                       is_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one minibatch (rows `idx` of the batch): one forward of policy + value head."""
        cfg = self.config
        mask = batch.response_mask[idx]
        width = int(mask.sum(1).max().item()) if mask.numel() else 0
        width = max(width, 1)
        seq_len = int((batch.prompt_lengths[idx] + mask.sum(1).long()).max().item())
        mask = mask[:, :width]
        with autocast(self.compute_dtype, mask.device):  # the forward only; backward follows its dtypes
            logprobs, entropy, values = self.policy(
                batch.input_ids[idx, :seq_len], batch.attention_mask[idx, :seq_len], batch.prompt_lengths[idx],
                batch.response_ids[idx, :width], temperature[idx], with_entropy=True, entropy_grad=cfg.ent_coef > 0)
        w = weight[idx, :width]
        pg_loss, pg_stats = policy_loss(logprobs, old_logprobs[idx, :width], advantages[idx, :width], mask,
                                        cfg.cliprange, w,
                                        is_weight[idx, :width] if is_weight is not None else None)
        vf_loss, vf_stats = value_loss(values, old_values[idx, :width], returns[idx, :width], mask,
                                       cfg.cliprange_value, w)
        ent = masked_mean(entropy, mask, w)
        loss = pg_loss + cfg.vf_coef * vf_loss - cfg.ent_coef * ent
        parts = {"policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(), "entropy": ent.detach(),
                 "loss": loss.detach(), **pg_stats, **vf_stats}
        return loss, parts

    # -- DDP-aware reductions -----------------------------------------------------------------
    def _global_masked_mean(self, local_mean: torch.Tensor, mask: torch.Tensor) -> float:
        """A masked mean over every rank's elements, from this rank's mean and mask."""
        count = mask.sum().double()
        t = torch.stack([local_mean.double() * count, count])
        if _dist_active():
            dist.all_reduce(t)
        return float(t[0] / t[1].clamp_min(1.0))

    def _global_mean(self, x: torch.Tensor) -> float:
        t = torch.stack([x.detach().double().sum(), torch.tensor(float(x.numel()), dtype=torch.float64,
                                                                 device=x.device)])
        if _dist_active():
            dist.all_reduce(t)  # on x's device: works for gloo (CPU) and NCCL (GPU)
        return float(t[0] / t[1].clamp_min(1.0))

    def _global_count(self, n: int) -> int:
        if not _dist_active():
            return n
        t = torch.tensor([n], dtype=torch.long, device=next(self.module.parameters()).device)
        dist.all_reduce(t)
        return int(t.item())
