"""Per-token rewards and generalised advantage estimation (vectorised, right-padded batches)."""

from __future__ import annotations

import torch


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> tuple[
        torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * kl on every response token, + score on the last one.

    Returns (rewards, non_score_rewards); both zero beyond each sequence's end.
    """
    non_score = -kl_coef * kl * mask
    lengths = mask.sum(1).long()
    last = (lengths - 1).clamp_min(0)
    rewards = non_score.clone()
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last] += scores * (lengths > 0).to(scores.dtype)
    return rewards, non_score


def _discount_matrix(length: int, factor: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # M[k, t] = factor ** (k - t) for k >= t, else 0: (x @ M)[t] = sum_{k >= t} factor^(k-t) x[k].
    idx = torch.arange(length, device=device)
    exponent = (idx[:, None] - idx[None, :]).to(dtype)
    lower = exponent >= 0
    return torch.where(lower, torch.pow(torch.tensor(factor, dtype=dtype, device=device), exponent.clamp_min(0)),
                       torch.zeros((), dtype=dtype, device=device))


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[
        torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation for right-padded sequences, vectorised.

    delta_t = r_t + gamma * V_{t+1} - V_t (V beyond the last token is 0);
    A_t = sum_k (gamma * lam)^k delta_{t+k}. Returns (advantages, returns = A + V), masked.
    """
    values = values * mask
    rewards = rewards * mask
    next_values = torch.zeros_like(values)
    next_values[:, :-1] = values[:, 1:]
    deltas = (rewards + gamma * next_values - values) * mask
    length = rewards.shape[1]
    advantages = deltas @ _discount_matrix(length, gamma * lam, deltas.dtype, deltas.device)
    advantages = advantages * mask
    returns = (advantages + values) * mask
    return advantages, returns
