"""Synthetic rater pools with a hidden truth: the scenarios the reliability estimator is tested and benchmarked on.

Every response has a true log-strength (N(0, spread²)); a rater of kind k judges a pair (i, j) by
Davidson's model at `DISCRIMINATION[k] * (s_i - s_j)`: good raters judge by the truth, noisy-but-honest
ones by a flattened truth, random ones flip coins, adversarial ones by the reversed truth. The
estimator's own model (a reversal probability per rater) is deliberately not the generating one.

Overlap patterns: `raters_per_prompt=None` (everyone judges every prompt) or k raters drawn per
prompt; `pairs` "all" (every pair of the prompt), "chain" (adjacent pairs of a random order: the
sparsest connected design), or an int (that many random pairs per rater).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from flywheel.preference.aggregation import FitOptions, Problem, _probabilities, _Model

DISCRIMINATION = {"good": 1.0, "noisy": 0.3, "random": 0.0, "adversarial": -1.0}


@dataclass
class Scenario:
    problem: Problem
    truth: np.ndarray       # (P, K) true log-strengths, in the problem's grid layout
    kinds: list[str]        # kind of each rater (index = rater index of the problem)


def generate(rng: np.random.Generator, n_prompts: int, responses: int, kinds: Sequence[str], *,
             raters_per_prompt: int | None = None, pairs: str | int = "all", spread: float = 1.5,
             tie_parameter: float = 0.0) -> Scenario:
    P, K, R = n_prompts, responses, len(kinds)
    truth = rng.normal(0.0, spread, (P, K))
    disc = np.array([DISCRIMINATION[k] for k in kinds])
    all_pairs = [(i, j) for i in range(K) for j in range(i + 1, K)]
    first, second, rater, prompt = [], [], [], []
    for p in range(P):
        who = range(R) if raters_per_prompt is None else rng.choice(R, min(raters_per_prompt, R), replace=False)
        for r in who:
            if pairs == "all":
                chosen = all_pairs
            elif pairs == "chain":
                order = rng.permutation(K)
                chosen = list(zip(order[:-1], order[1:]))
            else:
                picked = rng.choice(len(all_pairs), min(int(pairs), len(all_pairs)), replace=False)
                chosen = [all_pairs[i] for i in picked]
            for i, j in chosen:
                first.append(p * K + i)
                second.append(p * K + j)
                rater.append(r)
                prompt.append(p)
    first, second, rater = np.array(first), np.array(second), np.array(rater)
    x = disc[rater] * (truth.ravel()[first] - truth.ravel()[second])
    pw, pl, pt = _probabilities(x, tie_parameter)
    u = rng.random(len(x))
    tie = u < pt
    first_wins = (u >= pt) & (u < pt + pw)
    winner = np.where(tie | first_wins, first, second)
    loser = np.where(tie | first_wins, second, first)
    problem = Problem(P, np.repeat(np.arange(P), K), winner, loser, tie, np.ones(len(x)), rater, R)
    return Scenario(problem, truth, list(kinds))


def oracle_weights(scenario: Scenario, options: FitOptions = FitOptions()) -> np.ndarray:
    """Each rater's weight (2η - 1) fitted against the true scores: what the estimator would find knowing the truth."""
    problem = scenario.problem
    model = _Model(problem, np.ones(len(problem.winner), bool), options)
    S = scenario.truth.ravel()
    n0, eta0 = options.reliability_prior_strength, options.reliability_prior_accuracy
    alpha, beta = np.full(problem.n_raters, n0 * eta0), np.full(problem.n_raters, n0 * (1 - eta0))
    model.shared = np.flatnonzero(model.a + model.b > 0)  # the truth speaks on every prompt, shared or not
    eta, _ = model.accuracies(S[model.fw] - S[model.fl], 0.0, np.full(problem.n_raters, eta0), alpha, beta)
    return 2.0 * eta - 1.0


def kendall_tau(scores: np.ndarray, truth: np.ndarray) -> float:
    """Mean over prompts of Kendall's τ between estimated and true scores (pairs tied in the estimate count 0).

    Estimates within 1e-9 count as tied: exact ties (a cycle of judgements) come out of the fit with
    rounding noise, whose sign is arbitrary.
    """
    K = truth.shape[1]
    total, n = 0.0, 0
    for i in range(K):
        for j in range(i + 1, K):
            d = scores[:, i] - scores[:, j]
            estimated = np.where(np.abs(d) > 1e-9, np.sign(d), 0.0)
            total += float((estimated * np.sign(truth[:, i] - truth[:, j])).sum())
            n += 1
    return total / (n * truth.shape[0]) if n else math.nan
