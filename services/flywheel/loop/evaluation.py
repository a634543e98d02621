"""Held-out evaluation of policy versions against the hidden ground truth (VADER compound).

The simulated raters prefer responses with a higher VADER compound score; the loop never shows
that score to the trainer (PPO sees only the learned reward model). Measuring it on held-out
prompts tells whether the whole loop - raters -> Bradley–Terry -> reward model -> PPO - learns.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

from flywheel.v1 import common_pb2, policy_pb2, policy_pb2_grpc


@lru_cache(maxsize=1)
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def ground_truth(texts: Sequence[str]) -> list[float]:
    """VADER compound score in [-1, 1] of each text."""
    analyzer = _analyzer()
    return [float(analyzer.polarity_scores(t)["compound"]) for t in texts]


@dataclass
class EvalResult:
    policy_version: str
    scores: list[float]
    responses: list[str] = field(repr=False, default_factory=list)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.scores) if self.scores else float("nan")

    @property
    def stderr(self) -> float:
        if len(self.scores) < 2:
            return float("nan")
        return statistics.stdev(self.scores) / math.sqrt(len(self.scores))


def improvement_z(before: EvalResult, after: EvalResult) -> float:
    """Welch z-statistic of after.mean - before.mean."""
    se = math.sqrt(before.stderr ** 2 + after.stderr ** 2)
    return (after.mean - before.mean) / se if se > 0 else float("inf")


def paired_improvement_z(before: EvalResult, after: EvalResult) -> float:
    """z-statistic of the mean per-prompt improvement (same held-out prompts, same seed, in order)."""
    if len(before.scores) != len(after.scores) or len(before.scores) < 2:
        raise ValueError("paired comparison needs the same prompts in the same order")
    diffs = [a - b for a, b in zip(after.scores, before.scores)]
    sd = statistics.stdev(diffs)
    mean = statistics.fmean(diffs)
    return mean / (sd / math.sqrt(len(diffs))) if sd > 0 else (float("inf") if mean > 0 else 0.0)


def evaluate_policy(stub: policy_pb2_grpc.PolicyServiceStub, prompts: Sequence[common_pb2.Prompt],
                    sampling: common_pb2.SamplingParams, *, batch_size: int = 16,
                    timeout_s: float = 600.0) -> EvalResult:
    """Sample one response per held-out prompt (fixed seed) and score it with the ground truth."""
    responses: list[str] = []
    version = ""
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        reply = stub.Generate(policy_pb2.GenerateRequest(prompts=chunk, sampling=sampling), timeout=timeout_s)
        versions = {r.policy_version for r in reply.rollouts}
        if len(versions) > 1:
            # A reload happened mid-evaluation: start over so one result is one version.
            return evaluate_policy(stub, prompts, sampling, batch_size=batch_size, timeout_s=timeout_s)
        version = reply.policy_version or next(iter(versions), version)
        responses.extend(r.response_text for r in reply.rollouts)
    return EvalResult(version, ground_truth(responses), responses)
