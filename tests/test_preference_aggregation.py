"""Bradley–Terry aggregation on synthetic data with known truth (no Kafka, no gRPC)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flywheel.preference.aggregation import FitOptions, Problem, build_problem, consensus, fit
from flywheel.preference.store import derive
from flywheel.preference.validation import ranks_are_valid
from flywheel.v1 import common_pb2


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Spearman correlation (no ties in continuous data)."""
    ra = np.argsort(np.argsort(a, 1), 1).astype(float)
    rb = np.argsort(np.argsort(b, 1), 1).astype(float)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    return (ra * rb).sum(1) / np.sqrt((ra ** 2).sum(1) * (rb ** 2).sum(1))


def simulate(rng, true: np.ndarray, rankings_per_prompt: int, raters: int, kinds: dict[int, str] | None = None,
             raters_per_prompt: int | None = None) -> Problem:
    """Plackett–Luce rankings (Gumbel noise on the true log-strengths), broken into pairs with weight 2/k."""
    P, K = true.shape
    kinds = kinds or {}
    W, L, R = [], [], []
    for p in range(P):
        chosen = rng.choice(raters, raters_per_prompt or rankings_per_prompt, replace=raters_per_prompt is not None) \
            if raters_per_prompt else rng.integers(0, raters, rankings_per_prompt)
        for r in chosen:
            kind = kinds.get(int(r), "honest")
            if kind == "random":
                noisy = rng.normal(size=K)
            elif kind == "adversarial":
                noisy = -(true[p] + rng.gumbel(size=K))
            else:
                noisy = true[p] + rng.gumbel(size=K)
            order = np.argsort(-noisy)
            for i in range(K):
                for j in range(i + 1, K):
                    W.append(p * K + order[i])
                    L.append(p * K + order[j])
                    R.append(r)
    m = len(W)
    return Problem(P, np.repeat(np.arange(P), K), np.array(W), np.array(L), np.zeros(m, bool),
                   np.full(m, 2.0 / K), np.array(R), raters)


def test_recovers_known_strengths_with_enough_data() -> None:
    rng = np.random.default_rng(1)
    true = rng.normal(0, 1.0, (300, 6))
    result = fit(simulate(rng, true, rankings_per_prompt=200, raters=20), FitOptions(reliability=False))
    assert result.converged
    rho = spearman(result.scores, true)
    assert rho.mean() >= 0.95, rho.mean()
    # the log-strengths themselves, not only their order (centred per prompt)
    centred = true - true.mean(1, keepdims=True)
    assert np.corrcoef(result.scores.ravel(), centred.ravel())[0, 1] > 0.99
    # and with little data the same estimator is visibly worse: the assertion above can fail
    sparse = fit(simulate(rng, true, rankings_per_prompt=2, raters=20), FitOptions(reliability=False))
    assert spearman(sparse.scores, true).mean() < 0.85


def test_more_data_means_smaller_errors_and_higher_confidence() -> None:
    rng = np.random.default_rng(2)
    true = rng.normal(0, 1.0, (100, 4))
    few = fit(simulate(rng, true, 3, 10), FitOptions(reliability=False))
    many = fit(simulate(rng, true, 60, 10), FitOptions(reliability=False))
    assert np.nanmean(many.stderr) < 0.5 * np.nanmean(few.stderr)
    assert many.confidence.mean() > few.confidence.mean() + 0.2
    assert ((0 <= many.confidence) & (many.confidence <= 1)).all()


def test_reliability_weighting_beats_unweighted_when_a_third_of_raters_are_random() -> None:
    gains = []
    for seed in range(3):
        rng = np.random.default_rng(100 + seed)
        raters = 30
        random_raters = rng.permutation(raters)[: raters // 3]
        true = rng.normal(0, 1.5, (600, 4))
        problem = simulate(rng, true, 0, raters, kinds={int(r): "random" for r in random_raters}, raters_per_prompt=3)
        plain = fit(problem, FitOptions(reliability=False))
        weighted = fit(problem, FitOptions(reliability=True))
        assert weighted.converged
        honest = np.setdiff1d(np.arange(raters), random_raters)
        assert weighted.reliability[random_raters].mean() < 0.4
        assert weighted.reliability[honest].min() > 0.5
        gains.append(spearman(weighted.scores, true).mean() - spearman(plain.scores, true).mean())
    # measured: +0.08 .. +0.12 mean Spearman per seed
    assert min(gains) > 0.04, gains
    assert np.mean(gains) > 0.06, gains


def test_adversarial_raters_get_negative_weight() -> None:
    rng = np.random.default_rng(7)
    raters = 12
    true = rng.normal(0, 1.5, (400, 4))
    problem = simulate(rng, true, 0, raters, kinds={0: "adversarial", 1: "adversarial"}, raters_per_prompt=4)
    result = fit(problem, FitOptions())
    assert (result.reliability[:2] < 0).all(), result.reliability
    assert (result.reliability[2:] > 0.5).all()
    assert spearman(result.scores, true).mean() > spearman(fit(problem, FitOptions(reliability=False)).scores,
                                                             true).mean()


def test_matches_choix_ilsr_pairwise_per_prompt_with_uneven_prompt_sizes() -> None:
    choix = pytest.importorskip("choix")
    rng = np.random.default_rng(3)
    lam = 0.5
    sizes = rng.integers(2, 7, 60)
    item_prompt = np.repeat(np.arange(len(sizes)), sizes)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    W, L = [], []
    per_prompt: list[list[tuple[int, int]]] = [[] for _ in sizes]
    for p, k in enumerate(sizes):
        strengths = rng.normal(0, 1, k)
        for _ in range(int(rng.integers(1, 15))):
            i, j = rng.choice(k, 2, replace=False)
            win = rng.random() < 1 / (1 + math.exp(strengths[j] - strengths[i]))
            a, b = (i, j) if win else (j, i)
            W.append(offsets[p] + a)
            L.append(offsets[p] + b)
            per_prompt[p].append((int(a), int(b)))
    m = len(W)
    problem = Problem(len(sizes), item_prompt, np.array(W), np.array(L), np.zeros(m, bool), np.ones(m),
                      np.zeros(m, int), 1)
    ours = fit(problem, FitOptions(prior_strength=lam, reliability=False, tolerance=1e-10))
    for p, k in enumerate(sizes):
        ref = choix.ilsr_pairwise(int(k), per_prompt[p], alpha=lam / k, tol=1e-12)
        # items never compared still exist in choix; ours only knows compared items
        seen = sorted({i for pair in per_prompt[p] for i in pair})
        if len(seen) < k:
            continue
        local = {int(problem.item_local[offsets[p] + i]): i for i in range(k)}
        mine = np.array([ours.scores[p, loc] for loc, _ in sorted(local.items(), key=lambda t: t[1])])
        np.testing.assert_allclose(mine, ref, atol=1e-6)


def test_ties_estimate_davidson_parameter_and_pull_scores_together() -> None:
    rng = np.random.default_rng(4)
    P, K, nu_true = 400, 3, 0.8
    true = rng.normal(0, 1, (P, K))
    W, L, T = [], [], []
    for p in range(P):
        for _ in range(40):
            i, j = rng.choice(K, 2, replace=False)
            d = true[p, i] - true[p, j]
            z = math.exp(d / 2) + math.exp(-d / 2) + nu_true
            u = rng.random() * z
            tie = u < nu_true
            a, b = (i, j) if (tie or u < nu_true + math.exp(d / 2)) else (j, i)
            W.append(p * K + a)
            L.append(p * K + b)
            T.append(tie)
    m = len(W)
    problem = Problem(P, np.repeat(np.arange(P), K), np.array(W), np.array(L), np.array(T), np.ones(m),
                      np.zeros(m, int), 1)
    result = fit(problem, FitOptions(reliability=False))
    assert abs(result.tie_parameter - nu_true) < 0.15, result.tie_parameter
    assert spearman(result.scores, true).mean() > 0.8
    # a pair only ever tied ends up with equal scores
    only_ties = build_problem(["q"] * 4, ["r"] * 4, ["a", "b", "a", "b"], ["b", "a", "b", "a"], [1, 1, 1, 1],
                              [1.0] * 4)
    tied = fit(only_ties, FitOptions(reliability=False))
    assert abs(tied.scores[0, 0] - tied.scores[0, 1]) < 1e-9


def test_sparse_separable_prompts_stay_finite() -> None:
    # one comparison, always won by the same response: the MLE would be infinite
    problem = build_problem(["p"], ["r"], ["a"], ["b"], [0], [1.0])
    result = fit(problem, FitOptions())
    assert np.isfinite(result.scores).all() and result.scores[0, 0] > result.scores[0, 1]
    [c] = consensus(problem, result)
    assert c.response_ids == ["a", "b"] and c.num_judgements == 1 and c.rater_ids == ["r"]


def test_rankings_are_broken_into_weighted_pairs_with_ties() -> None:
    ranking = common_pb2.Ranking(event_id="e", rater_id="r", prompt_id="p", ranks=[2, 1, 2, 4],
                                 responses=[common_pb2.ResponseRef(response_id=x) for x in "abcd"])
    d = derive(common_pb2.PreferenceEvent(ranking=ranking))
    pairs = {(w, lo, t) for _, _, _, _, w, lo, t, _ in d.judgements}
    assert pairs == {("b", "a", 0), ("a", "c", 1), ("a", "d", 0), ("b", "c", 0), ("b", "d", 0), ("c", "d", 0)}
    assert {wt for *_, wt in d.judgements} == {0.5}  # 2/k: a ranking counts as k-1 comparisons
    cmp = common_pb2.Comparison(event_id="c", rater_id="r", prompt_id="p", choice=common_pb2.CHOICE_B, strength=0.25,
                                response_a=common_pb2.ResponseRef(response_id="x"),
                                response_b=common_pb2.ResponseRef(response_id="y"))
    [(_, _, _, _, winner, loser, tie, weight)] = derive(common_pb2.PreferenceEvent(comparison=cmp)).judgements
    assert (winner, loser, tie, weight) == ("y", "x", 0, 0.25)


@pytest.mark.parametrize("ranks,ok", [([1, 2, 3], True), ([3, 1, 2], True), ([1, 1, 2], True), ([1, 1, 3], True),
                                      ([2, 2, 2], False), ([1, 1, 1], True), ([1, 3, 3], False), ([0, 1, 2], False),
                                      ([1, 2, 4], False), ([1, 2, 2, 4], True)])
def test_rank_validity(ranks, ok) -> None:
    assert ranks_are_valid(ranks) is ok
