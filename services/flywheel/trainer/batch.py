"""From scored rollouts to padded tensors, plus the off-policy bookkeeping (staleness, dedup).

Sequences are right-padded `prompt + response` rows; the response of row i starts at
`prompt_lengths[i]`. Response-aligned tensors (`response_ids`, `behaviour_logprobs`,
`response_mask`) are [B, R] with R the longest response of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from flywheel.v1 import common_pb2
from flywheel.versions import version_number

FINISHED = (common_pb2.FINISH_REASON_EOS_TOKEN, common_pb2.FINISH_REASON_STOP_SEQUENCE)


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor          # [B, T] long, right-padded prompt + response
    attention_mask: torch.Tensor     # [B, T] long
    prompt_lengths: torch.Tensor     # [B] long
    response_ids: torch.Tensor       # [B, R] long (pad 0 beyond each response)
    response_mask: torch.Tensor      # [B, R] float, 1 on response tokens
    behaviour_logprobs: torch.Tensor  # [B, R] float
    scores: torch.Tensor             # [B] float
    finished: torch.Tensor           # [B] bool: ended with EOS / a stop sequence
    temperature: torch.Tensor        # [B] float, the sampling temperature (0 -> 1)
    weight: torch.Tensor             # [B] float, staleness weight
    rollout_ids: list[str]
    policy_versions: list[str]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, rows: Sequence[int]) -> "RolloutBatch":
        idx = torch.tensor(list(rows), dtype=torch.long)
        return RolloutBatch(
            input_ids=self.input_ids[idx], attention_mask=self.attention_mask[idx],
            prompt_lengths=self.prompt_lengths[idx], response_ids=self.response_ids[idx],
            response_mask=self.response_mask[idx], behaviour_logprobs=self.behaviour_logprobs[idx],
            scores=self.scores[idx], finished=self.finished[idx], temperature=self.temperature[idx],
            weight=self.weight[idx], rollout_ids=[self.rollout_ids[i] for i in rows],
            policy_versions=[self.policy_versions[i] for i in rows])

    def to(self, device: torch.device | str) -> "RolloutBatch":
        """The same batch with every tensor on `device` (no copy when already there)."""
        moved = {name: getattr(self, name).to(device) for name in (
            "input_ids", "attention_mask", "prompt_lengths", "response_ids", "response_mask", "behaviour_logprobs",
            "scores", "finished", "temperature", "weight")}
        return RolloutBatch(**moved, rollout_ids=self.rollout_ids, policy_versions=self.policy_versions)

    def shard(self, rank: int, world_size: int) -> "RolloutBatch":
        """Rows rank, rank + world, ...: the DDP shard of this rank."""
        return self.select(range(rank, len(self), world_size))


def collate(rollouts: Sequence[common_pb2.ScoredRollout], *, pad_token_id: int = 0,
            weights: Sequence[float] | None = None) -> RolloutBatch:
    """Pad scored rollouts into a `RolloutBatch` (vectorised tensor construction, no per-token loops)."""
    if not rollouts:
        raise ValueError("empty batch")
    prompts = [list(s.rollout.prompt_token_ids) for s in rollouts]
    responses = [list(s.rollout.response_token_ids) for s in rollouts]
    logprobs = [list(s.rollout.token_logprobs) for s in rollouts]
    for s, resp, lp in zip(rollouts, responses, logprobs):
        if len(resp) != len(lp):
            raise ValueError(f"rollout {s.rollout.rollout_id}: {len(resp)} response tokens but {len(lp)} logprobs")
        if not s.rollout.prompt_token_ids:
            raise ValueError(f"rollout {s.rollout.rollout_id}: empty prompt")
    b = len(rollouts)
    p_len = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    r_len = torch.tensor([len(r) for r in responses], dtype=torch.long)
    width = max(1, int(r_len.max()))
    total = int((p_len + r_len).max())
    input_ids = torch.full((b, total), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((b, total), dtype=torch.long)
    response_ids = torch.zeros((b, width), dtype=torch.long)
    behaviour = torch.zeros((b, width), dtype=torch.float32)
    for i, (p, r, lp) in enumerate(zip(prompts, responses, logprobs)):
        seq = torch.tensor(p + r, dtype=torch.long)
        input_ids[i, : len(seq)] = seq
        attention_mask[i, : len(seq)] = 1
        if r:
            response_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            behaviour[i, : len(r)] = torch.tensor(lp, dtype=torch.float32)
    response_mask = (torch.arange(width)[None, :] < r_len[:, None]).float()
    temps = torch.tensor([s.rollout.sampling.temperature or 1.0 for s in rollouts], dtype=torch.float32)
    return RolloutBatch(
        input_ids=input_ids, attention_mask=attention_mask, prompt_lengths=p_len, response_ids=response_ids,
        response_mask=response_mask, behaviour_logprobs=behaviour,
        scores=torch.tensor([s.reward for s in rollouts], dtype=torch.float32),
        finished=torch.tensor([s.rollout.finish_reason in FINISHED for s in rollouts], dtype=torch.bool),
        temperature=temps,
        weight=torch.tensor(list(weights) if weights is not None else [1.0] * b, dtype=torch.float32),
        rollout_ids=[s.rollout.rollout_id for s in rollouts],
        policy_versions=[s.rollout.policy_version for s in rollouts])


@dataclass
class Admission:
    accepted: bool
    reason: str = ""  # "eval", "stale", "duplicate", "invalid", "empty"
    lag: int = 0
    weight: float = 1.0


class RolloutFilter:
    """Decides which scored rollouts go into training: skips eval, invalid and duplicate rollouts,
    drops those more than `max_version_lag` versions behind, and down-weights the rest by
    `decay ** lag`. Remembers trained (policy_version, rollout_id) pairs so a redelivered rollout is
    never trained twice; the memory is part of the trainer state (checkpointed).
    """

    def __init__(self, max_version_lag: int, weight_decay: float = 1.0) -> None:
        self.max_version_lag = max_version_lag
        self.weight_decay = weight_decay
        self._trained: dict[str, set[str]] = {}

    def admit(self, scored: common_pb2.ScoredRollout, current_version: int,
              pending: set[tuple[str, str]] | None = None) -> Admission:
        r = scored.rollout
        if r.split == "eval":
            return Admission(False, "eval")
        if not r.response_token_ids:
            return Admission(False, "empty")
        if len(r.response_token_ids) != len(r.token_logprobs) or not r.prompt_token_ids:
            return Admission(False, "invalid")
        try:
            lag = current_version - version_number(r.policy_version)
        except ValueError:
            return Admission(False, "invalid")
        key = (r.policy_version, r.rollout_id)
        if r.rollout_id in self._trained.get(r.policy_version, ()) or (pending is not None and key in pending):
            return Admission(False, "duplicate", lag)
        if lag > self.max_version_lag:
            return Admission(False, "stale", lag)
        return Admission(True, "", max(lag, 0), self.weight_decay ** max(lag, 0))

    def mark_trained(self, scored: Iterable[common_pb2.ScoredRollout]) -> None:
        for s in scored:
            self._trained.setdefault(s.rollout.policy_version, set()).add(s.rollout.rollout_id)

    def prune(self, current_version: int) -> None:
        """Forget versions that are beyond the lag window: their rollouts are dropped as stale anyway."""
        for version in list(self._trained):
            try:
                if current_version - version_number(version) > self.max_version_lag:
                    del self._trained[version]
            except ValueError:
                del self._trained[version]

    def trained_count(self) -> int:
        return sum(len(v) for v in self._trained.values())

    def state_dict(self) -> dict[str, list[str]]:
        return {version: sorted(ids) for version, ids in self._trained.items()}

    def load_state_dict(self, state: dict[str, list[str]]) -> None:
        self._trained = {version: set(ids) for version, ids in state.items()}
