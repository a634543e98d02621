"""Sampling parameters: validation and resolution of `flywheel.v1.SamplingParams` against defaults.

Resolution rules (documented in docs/policy.md):
- No SamplingParams message at all -> every field takes the service default.
- A SamplingParams message that is present is taken literally for `temperature` (0 = greedy, as
  common.proto says); `top_k` 0 disables top-k, `top_p` 0 means 1.0 (disabled), `max_new_tokens`
  0 means the service default, `n` 0 means 1 (common.proto), on every path.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace

from flywheel.runtime.errors import InvalidArgument, require
from flywheel.v1 import common_pb2

UINT64_MASK = (1 << 64) - 1


def derived_seed(prompt_id: str, policy_version: str, candidate_index: int) -> int:
    """Seed of a candidate whose prompt carries none: a hash of what its rollout id hashes, so a
    redelivered prompt reproduces the same text under the same rollout id."""
    key = "\x1f".join([prompt_id, policy_version, str(candidate_index)])
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 1  # 63 bits


@dataclass(frozen=True)
class SamplingDefaults:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 64
    n: int = 1
    max_new_tokens_limit: int = 1024
    max_n: int = 64
    max_stop_sequences: int = 8
    max_input_bytes: int = 65_536  # checked before tokenizing: bounds the tokenizer's work per prompt

    @classmethod
    def from_settings(cls, settings) -> "SamplingDefaults":  # PolicySettings, untyped to avoid a cycle
        return cls(
            temperature=settings.policy_default_temperature, top_k=settings.policy_default_top_k,
            top_p=settings.policy_default_top_p, max_new_tokens=settings.policy_default_max_new_tokens,
            n=settings.policy_default_n, max_new_tokens_limit=settings.policy_max_new_tokens_limit,
            max_n=settings.policy_max_n, max_stop_sequences=settings.policy_max_stop_sequences,
            max_input_bytes=settings.policy_max_input_bytes,
        )


@dataclass(frozen=True)
class SamplingConfig:
    """Fully resolved sampling parameters of one request (all prompts' candidates share them)."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = disabled
    top_p: float = 1.0  # 1 = disabled
    max_new_tokens: int = 64
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None
    n: int = 1

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def candidate_seed(self, candidate_index: int) -> int | None:
        """Seed of candidate i: request seed + i (mod 2^64), so candidates differ but replay exactly."""
        if self.seed is None:
            return None
        return (self.seed + candidate_index) & UINT64_MASK

    def with_n(self, n: int) -> "SamplingConfig":
        return replace(self, n=n)

    def to_proto(self) -> common_pb2.SamplingParams:
        params = common_pb2.SamplingParams(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            max_new_tokens=self.max_new_tokens, stop=list(self.stop), n=self.n,
        )
        if self.seed is not None:
            params.seed = self.seed
        return params

    def validate(self, limits: SamplingDefaults, prefix: str = "sampling") -> "SamplingConfig":
        require(math.isfinite(self.temperature) and self.temperature >= 0, f"{prefix}.temperature",
                f"must be a finite number >= 0, got {self.temperature}")
        require(self.top_k >= 0, f"{prefix}.top_k", f"must be >= 0, got {self.top_k}")
        require(math.isfinite(self.top_p) and 0 < self.top_p <= 1, f"{prefix}.top_p",
                f"must be in (0, 1], got {self.top_p}")
        require(1 <= self.max_new_tokens <= limits.max_new_tokens_limit, f"{prefix}.max_new_tokens",
                f"must be in [1, {limits.max_new_tokens_limit}], got {self.max_new_tokens}")
        require(1 <= self.n <= limits.max_n, f"{prefix}.n", f"must be in [1, {limits.max_n}], got {self.n}")
        require(len(self.stop) <= limits.max_stop_sequences, f"{prefix}.stop",
                f"at most {limits.max_stop_sequences} stop sequences, got {len(self.stop)}")
        require(all(s for s in self.stop), f"{prefix}.stop", "stop sequences must be non-empty")
        if self.seed is not None:
            require(0 <= self.seed <= UINT64_MASK, f"{prefix}.seed", "must fit in an unsigned 64-bit integer")
        return self


def resolve(params: common_pb2.SamplingParams | None, defaults: SamplingDefaults,
            prefix: str = "sampling") -> SamplingConfig:
    """Resolve a (possibly absent) SamplingParams message to a validated SamplingConfig.

    Raises InvalidArgument naming the offending field.
    """
    if params is None:
        return SamplingConfig(temperature=defaults.temperature, top_k=defaults.top_k, top_p=defaults.top_p,
                              max_new_tokens=defaults.max_new_tokens, n=defaults.n).validate(defaults, prefix)
    # Range checks on the raw values first: "0 means default" must not hide a negative value.
    require(params.temperature >= 0 and math.isfinite(params.temperature), f"{prefix}.temperature",
            f"must be a finite number >= 0, got {params.temperature}")
    require(0 <= params.top_p <= 1, f"{prefix}.top_p", f"must be in (0, 1] (0 = disabled), got {params.top_p}")
    require(params.top_k >= 0, f"{prefix}.top_k", f"must be >= 0, got {params.top_k}")
    require(params.max_new_tokens >= 0, f"{prefix}.max_new_tokens", f"must be >= 0, got {params.max_new_tokens}")
    require(params.n >= 0, f"{prefix}.n", f"must be >= 0 (0 means 1), got {params.n}")
    config = SamplingConfig(
        temperature=float(params.temperature),
        top_k=int(params.top_k),
        top_p=float(params.top_p) if params.top_p > 0 else 1.0,
        max_new_tokens=int(params.max_new_tokens) or defaults.max_new_tokens,
        stop=tuple(params.stop),
        seed=int(params.seed) if params.HasField("seed") else None,
        n=int(params.n) or 1,
    )
    return config.validate(defaults, prefix)


__all__ = ["InvalidArgument", "SamplingConfig", "SamplingDefaults", "resolve"]
