"""PPO losses and the masked statistics they use (pure functions on tensors).

Staleness weights are absolute: `masked_mean(x, mask, weight)` divides by the number of unmasked
elements, not by their total weight, so a minibatch made only of stale rollouts (weight < 1)
moves the policy less (docs/trainer.md). Statistics accumulate in float64.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _dist_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def masked_mean(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of x over mask; with `weight` (e.g. staleness weights per row) each element counts
    weight times, over the same denominator (the unmasked count): weights are absolute, so a
    minibatch of down-weighted rows contributes proportionally less, not the same after renormalising."""
    numerator = x * mask if weight is None else x * mask * weight
    return numerator.sum() / mask.sum().clamp_min(1e-8)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, global_stats: bool = False) -> tuple[
        torch.Tensor, torch.Tensor]:
    """(mean, variance) of x over mask; with global_stats under DDP, over every rank's elements."""
    xd, md = x.detach().to(torch.float64), mask.to(torch.float64)  # float32 sums of x^2 cancel badly
    stats = torch.stack([(xd * md).sum(), (xd * xd * md).sum(), md.sum()])
    if global_stats and _dist_active():
        dist.all_reduce(stats)
    total, total_sq, n = stats[0], stats[1], stats[2].clamp_min(1.0)
    mean = total / n
    var = (total_sq / n - mean * mean).clamp_min(0.0)
    if unbiased:
        if n <= 1:
            raise ValueError("masked_var needs at least two unmasked elements for the unbiased estimate")
        var = var * n / (n - 1)
    return mean.to(x.dtype), var.to(x.dtype)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  global_stats: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked elements (unbiased var, as in TRL).

    shift_mean=False keeps the mean (used for rewards). Masked positions are zeroed.
    """
    mean, var = masked_var(x, mask, unbiased=True, global_stats=global_stats)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float, weight: torch.Tensor | None = None,
                is_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate: mean over tokens of max(-A * ratio, -A * clip(ratio, 1 +- eps)).

    `is_weight` (no gradient) multiplies each token's surrogate: the truncated importance weight
    that corrects for a sampler whose probabilities differ from the trainer's.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    losses = -advantages * ratio
    losses_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    surrogate = torch.max(losses, losses_clipped)
    if is_weight is not None:
        surrogate = surrogate * is_weight
    loss = masked_mean(surrogate, mask, weight)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((losses_clipped > losses).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio * log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * mean of max((V - R)^2, (clip(V, V_old +- eps) - R)^2)."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    losses = (values - returns) ** 2
    losses_clipped = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(losses, losses_clipped), mask, weight)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((losses_clipped > losses).float(), mask)}
    return loss, stats


def sampler_mismatch_kl(trainer_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:
    """Per-token KL(sampler || trainer) from the sampler's own tokens (k3 estimator, >= 0, unbiased).

    Both log-probs are of the same policy version: the rollout's behaviour log-probs and the
    trainer's recomputation. Anything above ~1e-6 is numerics (precision, kernels), not learning.
    """
    log_ratio = (trainer_logprobs - sampler_logprobs).double()  # log(p_trainer / p_sampler)
    return masked_mean(torch.expm1(log_ratio) - log_ratio, mask.double()).float()


def truncated_is_weights(trainer_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """min(p_trainer / p_sampler, cap) per token, without gradient (truncated importance sampling).

    The tokens were drawn by the sampler but PPO's ratio is taken against the trainer's own
    log-probs, so each token's surrogate is reweighted by how much likelier the trainer finds it;
    capping bounds the variance (Yao et al. 2025, "Your efficient RL framework secretly brings you
    off-policy RL training"; Ionides 2008).
    """
    return torch.exp(trainer_logprobs - sampler_logprobs).clamp(max=cap).detach()
