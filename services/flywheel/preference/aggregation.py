"""Bradley–Terry consensus over all prompts at once, with ties and rater reliability.

Model (per prompt, responses i with log-strengths s_i):

* Davidson's extension of Bradley–Terry for ties: with d = s_i - s_j and Z = e^{d/2} + e^{-d/2} + ν,
  P(i ≻ j) = e^{d/2}/Z, P(j ≻ i) = e^{-d/2}/Z, P(tie) = ν/Z. ν is one global parameter, estimated
  when ties were observed and 0 otherwise (then this is exactly Bradley–Terry).
* Rankings are broken into all their pairs with weight 2/k (k-1 comparisons per ranking, the
  information of a Plackett–Luce ranking); see `store.derive`.
* Rater reliability as a weight on each rater's evidence: rater r judges with P(i ≻ j) computed at
  β_r (s_i - s_j). β_r ≈ 1 is an average rater, β_r ≈ 0 a random one (its judgements carry no
  weight), β_r < 0 an adversarial one (its judgements count reversed) -- the discrimination
  parameter of item response theory, a continuous relative of crowd-BT's flip probability
  (Chen et al., WSDM 2013). Fitted by block-coordinate ascent: Newton steps on the scores for the
  current weights, then a damped Newton step on every β_r (N(1, 1/τ) prior) against
  leave-one-rater-out scores, so no rater can vouch for itself; weights are normalised so the
  median rater has weight 1.
* Regularisation: independent Gamma(λ+1, λ) priors on the strengths π_i = e^{s_i}, i.e. the
  penalty λ Σ (e^{s_i} - s_i). It keeps sparse/separable prompts finite, needs no gauge fixing,
  and its MAP is exactly the fixed point of choix's `ilsr_pairwise(alpha = λ / n_responses)`
  (Caron & Doucet 2012 show the Gamma prior is conjugate to BT's latent-variable form).

Everything is vectorised over prompts: responses are laid out in a (P, K) grid (K = most responses
of any prompt, padding masked), gradients and Hessians are built with `np.bincount` over all
judgements, and each Newton step solves the P small K×K systems with one batched `np.linalg.solve`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

_MAX_STEP = 3.0


@dataclass(frozen=True)
class FitOptions:
    prior_strength: float = 0.5
    reliability: bool = True
    reliability_prior_strength: float = 4.0  # τ: precision of the N(1, 1/τ) prior on each rater weight
    max_iterations: int = 500
    tolerance: float = 1e-6
    ties: bool = True  # estimate Davidson's ν when ties are present; False: ties count half a win each way


@dataclass
class Problem:
    """Judgements in index form. Items are (prompt, response) pairs; `winner`/`loser` index items."""

    n_prompts: int
    item_prompt: np.ndarray  # (N,) prompt index of each item
    winner: np.ndarray       # (M,) item index (first response for ties)
    loser: np.ndarray        # (M,)
    tie: np.ndarray          # (M,) bool
    weight: np.ndarray       # (M,) float
    rater: np.ndarray        # (M,) rater index
    n_raters: int
    # labels (optional, filled by `build_problem`)
    prompt_ids: list[str] = field(default_factory=list)
    item_ids: list[str] = field(default_factory=list)
    rater_ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.item_prompt = np.asarray(self.item_prompt, dtype=np.int64)
        n_items = len(self.item_prompt)
        counts = np.bincount(self.item_prompt, minlength=self.n_prompts)
        self.items_per_prompt = counts
        self.K = int(counts.max()) if n_items else 0
        order = np.argsort(self.item_prompt, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        local = np.empty(n_items, dtype=np.int64)
        local[order] = np.arange(n_items) - starts[self.item_prompt[order]]
        self.item_local = local
        self.winner = np.asarray(self.winner, dtype=np.int64)
        self.loser = np.asarray(self.loser, dtype=np.int64)
        self.tie = np.asarray(self.tie, dtype=bool)
        self.weight = np.asarray(self.weight, dtype=np.float64)
        self.rater = np.asarray(self.rater, dtype=np.int64)

    @property
    def n_items(self) -> int:
        return len(self.item_prompt)

    def valid(self) -> np.ndarray:
        """(P, K) mask of real (non-padding) items."""
        return np.arange(self.K)[None, :] < self.items_per_prompt[:, None]

    def item_at(self) -> np.ndarray:
        """(P, K) item index in each grid cell, -1 for padding."""
        grid = np.full((self.n_prompts, self.K), -1, dtype=np.int64)
        grid[self.item_prompt, self.item_local] = np.arange(self.n_items)
        return grid


def build_problem(prompt_ids: Sequence[str], rater_ids: Sequence[str], winner_ids: Sequence[str],
                  loser_ids: Sequence[str], tie: Sequence[int | bool], weight: Sequence[float]) -> Problem:
    """Index form of judgements given as strings (responses are keyed by (prompt, response) id)."""
    prompt_index: dict[str, int] = {}
    item_index: dict[tuple[int, str], int] = {}
    rater_index: dict[str, int] = {}
    item_prompt: list[int] = []
    item_ids: list[str] = []
    m = len(prompt_ids)
    winner = np.empty(m, dtype=np.int64)
    loser = np.empty(m, dtype=np.int64)
    rater = np.empty(m, dtype=np.int64)
    for n, (p, r, a, b) in enumerate(zip(prompt_ids, rater_ids, winner_ids, loser_ids)):
        pi = prompt_index.setdefault(p, len(prompt_index))
        rater[n] = rater_index.setdefault(r, len(rater_index))
        for key, out in (((pi, a), winner), ((pi, b), loser)):
            idx = item_index.get(key)
            if idx is None:
                idx = item_index[key] = len(item_prompt)
                item_prompt.append(pi)
                item_ids.append(key[1])
            out[n] = idx
    return Problem(
        n_prompts=len(prompt_index), item_prompt=np.asarray(item_prompt, dtype=np.int64), winner=winner,
        loser=loser, tie=np.asarray(tie, dtype=bool), weight=np.asarray(weight, dtype=np.float64), rater=rater,
        n_raters=len(rater_index), prompt_ids=list(prompt_index), item_ids=item_ids, rater_ids=list(rater_index))


@dataclass
class FitResult:
    scores: np.ndarray       # (P, K) log-strengths centred per prompt; NaN for padding
    stderr: np.ndarray       # (P, K) standard error of the centred scores (Laplace approximation)
    confidence: np.ndarray   # (P,) in [0, 1]: mean over adjacent responses of 2 Φ(Δ/σ_Δ) - 1
    reliability: np.ndarray  # (R,) rater weights β_r (median 1; ≈0 random, <0 adversarial; 1 when not estimated)
    tie_parameter: float     # Davidson's ν
    iterations: int
    converged: bool


def _terms(x: np.ndarray, A: np.ndarray, B: np.ndarray, T: np.ndarray, nu: float):
    """Davidson terms at x = β (s_first - s_second): d loglik/dx, -d² loglik/dx², P(tie), total weight.

    A, B, T: weight on "first wins", "second wins", "tie" of each judgement.
    """
    x = np.clip(x, -60.0, 60.0)
    ep, em = np.exp(0.5 * x), np.exp(-0.5 * x)
    Z = ep + em + nu
    pw, pl, pt = ep / Z, em / Z, nu / Z
    m = A + B + T
    gd = 0.5 * (A - B) - 0.5 * m * (pw - pl)
    h = 0.25 * m * ((pw + pl) - (pw - pl) ** 2)
    return gd, h, pt, m


def _update_rater_weights(S, eta, H, A, B, T, nu, tau, n_r, fw, fl, lw, ll, rater, combo, combo_prompt,
                          P, K, R, lam, validf, diag, damping):
    """One Newton step for every rater's weight β_r, judged against the other raters (leave-one-rater-out).

    Fitting β_r on scores that rater r itself shaped lets a rater vouch for itself (with few raters
    per prompt the scores follow whichever rater has the largest weight, which then looks even more
    consistent). So each rater's judgements are compared with the scores the *other* raters imply:
    for every (prompt, rater) cell, one Newton step from the current optimum with that rater's
    gradient and Hessian removed, solved for all cells in one batched call. β_r is then a
    one-parameter logistic regression on those held-out score differences, with a N(1, 1/τ) prior,
    and the weights are rescaled so the median rater has weight 1 (scores are on a typical rater's scale).
    """
    C = len(combo_prompt)
    beta = eta[rater]
    d = S[fw] - S[fl]
    gd, h, _, _ = _terms(beta * d, A, B, T, nu)
    bg, bh = beta * gd, beta * beta * h
    g_all = np.bincount(fw, bg, P * K) - np.bincount(fl, bg, P * K)
    es = np.exp(S)
    g_all += np.where(validf, lam * (1.0 - es), 0.0)
    cw, cl = combo * K + lw, combo * K + ll
    g_r = np.bincount(cw, bg, C * K) - np.bincount(cl, bg, C * K)
    cb = combo * K * K
    h_r = np.bincount(cb + lw * K + lw, -bh, C * K * K) + np.bincount(cb + ll * K + ll, -bh, C * K * K) \
        + np.bincount(cb + lw * K + ll, bh, C * K * K) + np.bincount(cb + ll * K + lw, bh, C * K * K)
    h_loo = H[combo_prompt] - h_r.reshape(C, K, K)
    g_loo = g_all.reshape(P, K)[combo_prompt] - g_r.reshape(C, K)
    shift = np.linalg.solve(-h_loo, g_loo[..., None])[..., 0].ravel()
    d_loo = d + shift[cw] - shift[cl]
    gd, h, _, _ = _terms(beta * d_loo, A, B, T, nu)
    # Only prompts that someone else judged too say anything about a rater; elsewhere the held-out
    # scores are just the prior, and the prior alone decides (β_r stays near 1 without overlap).
    shared = (np.bincount(combo_prompt, minlength=P) >= 2)[combo_prompt][combo]
    g_b = np.bincount(rater, np.where(shared, d_loo * gd, 0.0), R) - tau * (eta - 1.0)
    h_b = -np.bincount(rater, np.where(shared, d_loo * d_loo * h, 0.0), R) - tau
    new = eta - damping * np.clip(g_b / h_b, -1.0, 1.0)
    # Gauge: only β·s is identified. The median rater has weight 1 (robust to a minority of random or
    # adversarial raters, however many judgements they submit).
    scale = float(np.median(new[n_r > 0]))
    if scale > 1e-3:
        new = new / scale
    return new, float(np.abs(new - eta).max())


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    erf = np.frompyfunc(math.erf, 1, 1)
    return 0.5 * (1.0 + erf(np.asarray(z, dtype=np.float64) / math.sqrt(2.0)).astype(np.float64))


def fit(problem: Problem, options: FitOptions = FitOptions(), *,
        fixed_reliability: np.ndarray | None = None) -> FitResult:
    """MAP scores (and, unless `fixed_reliability` is given, rater weights) for every prompt at once."""
    P, K, R = problem.n_prompts, problem.K, problem.n_raters
    if P == 0 or len(problem.winner) == 0:
        empty = np.zeros((P, K))
        return FitResult(empty, empty, np.zeros(P), np.ones(R), 0.0, 0, True)
    valid = problem.valid()
    validf = valid.ravel()
    loc, pr = problem.item_local, problem.item_prompt
    w_prompt = pr[problem.winner]
    lw, ll = loc[problem.winner], loc[problem.loser]
    fw = w_prompt * K + lw               # flat (P*K) index of the first response
    fl = w_prompt * K + ll
    base = w_prompt * K * K
    h_ww, h_ll, h_wl, h_lw = base + lw * K + lw, base + ll * K + ll, base + lw * K + ll, base + ll * K + lw
    diag = (np.arange(P * K) // K) * K * K + (np.arange(P * K) % K) * (K + 1)
    tie = problem.tie
    strict = ~tie
    w = problem.weight
    rater = problem.rater
    lam = float(options.prior_strength)
    estimate_eta = options.reliability and fixed_reliability is None
    if fixed_reliability is not None:
        eta = np.asarray(fixed_reliability, dtype=np.float64).copy()
    else:
        eta = np.ones(R)
    tau = float(options.reliability_prior_strength)
    has_ties = bool(tie.any()) and options.ties
    if options.ties:
        A, B, T = np.where(strict, w, 0.0), np.zeros_like(w), np.where(tie, w, 0.0)
    else:  # a tie counts as half a win for each side
        A, B, T = np.where(strict, w, 0.5 * w), np.where(strict, 0.0, 0.5 * w), np.zeros_like(w)
    n_r = np.bincount(rater, w, R)
    combo_key, combo = np.unique(w_prompt * R + rater, return_inverse=True)  # (prompt, rater) cells
    combo_prompt = combo_key // R
    tie_frac = float(T.sum() / w.sum()) if has_ties else 0.0
    log_nu = math.log(max(2 * tie_frac / max(1 - tie_frac, 1e-6), 1e-3)) if has_ties else -math.inf

    S = np.zeros(P * K)
    eta_delta = math.inf
    damping = 0.5
    converged = False
    iterations = 0
    H = np.zeros((P, K, K))
    for iterations in range(1, options.max_iterations + 1):
        nu = math.exp(log_nu) if has_ties else 0.0
        beta = eta[rater]
        d = S[fw] - S[fl]
        gd, h, pt, m = _terms(beta * d, A, B, T, nu)
        g = np.bincount(fw, beta * gd, P * K) - np.bincount(fl, beta * gd, P * K)
        bh = beta * beta * h
        hh = np.bincount(h_ww, -bh, P * K * K) + np.bincount(h_ll, -bh, P * K * K) \
            + np.bincount(h_wl, bh, P * K * K) + np.bincount(h_lw, bh, P * K * K)
        es = np.exp(S)
        g += np.where(validf, lam * (1.0 - es), 0.0)
        hh[diag] += np.where(validf, -lam * es, -1.0)
        if lam == 0.0:
            hh[diag] -= 1e-9  # the likelihood alone is shift-invariant; scores are centred below
        H = hh.reshape(P, K, K)
        step = np.linalg.solve(-H, g.reshape(P, K, 1))[..., 0].ravel()
        step = np.clip(step, -_MAX_STEP, _MAX_STEP) * validf
        S = S + step
        if lam == 0.0:
            Sg = S.reshape(P, K)
            S = (Sg - (Sg * valid).sum(1, keepdims=True) / valid.sum(1, keepdims=True)).ravel() * validf
        delta = float(np.abs(step).max())
        d = S[fw] - S[fl]
        if has_ties:
            _, _, pt, m = _terms(beta * d, A, B, T, nu)
            g_nu = float((T - m * pt).sum())
            h_nu = float(-(m * pt * (1.0 - pt)).sum())
            new = log_nu - g_nu / h_nu if h_nu < 0 else log_nu
            new = min(max(new, log_nu - 2.0, -12.0), log_nu + 2.0, 6.0)
            delta = max(delta, abs(new - log_nu))
            log_nu = new
            nu = math.exp(log_nu)
        if estimate_eta and delta < 1e-3:
            # Block-coordinate: update the rater weights only once the scores have (nearly) converged
            # for the current weights; alternating full steps oscillates when raters overlap heavily.
            eta, d_eta = _update_rater_weights(S, eta, H, A, B, T, nu, tau, n_r, fw, fl, lw, ll, rater, combo,
                                               combo_prompt, P, K, R, lam, validf, diag, damping)
            if d_eta > eta_delta:  # not contracting: damp harder (the coupled fixed point can cycle)
                damping = max(0.05, damping * 0.6)
            eta_delta = d_eta
            delta = max(delta, d_eta)
        elif estimate_eta:
            delta = max(delta, eta_delta)
        if delta < options.tolerance:
            converged = True
            break

    # Laplace approximation at the mode: Cov = (-H)^-1, then centre per prompt.
    cov = np.linalg.inv(-H)
    vmask = valid[:, :, None] & valid[:, None, :]
    cov = np.where(vmask, cov, 0.0)
    n_valid = valid.sum(1).astype(np.float64)
    row = cov.sum(2)
    tot = row.sum(1)
    ccov = cov - row[:, :, None] / n_valid[:, None, None] - row[:, None, :] / n_valid[:, None, None] \
        + tot[:, None, None] / n_valid[:, None, None] ** 2
    ccov = np.where(vmask, ccov, 0.0)
    Sg = S.reshape(P, K)
    centred = np.where(valid, Sg - (Sg * valid).sum(1, keepdims=True) / n_valid[:, None], np.nan)
    stderr = np.where(valid, np.sqrt(np.clip(np.einsum("pkk->pk", ccov), 0.0, None)), np.nan)
    confidence = _confidence(centred, ccov, valid)
    return FitResult(centred, stderr, confidence, eta,
                     math.exp(log_nu) if has_ties else 0.0, iterations, converged)


def _confidence(scores: np.ndarray, cov: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Mean over adjacent responses (in consensus order) of 2Φ(Δ/σ_Δ) - 1: 0 = coin flips, 1 = certain."""
    P, K = scores.shape
    if K < 2:
        return np.zeros(P)
    order = np.argsort(np.where(valid, -scores, np.inf), axis=1)
    hi, lo = order[:, :-1], order[:, 1:]
    rows = np.arange(P)[:, None]
    pair_valid = valid[rows, lo]
    diff = scores[rows, hi] - scores[rows, lo]
    var = cov[rows, hi, hi] + cov[rows, lo, lo] - 2.0 * cov[rows, hi, lo]
    z = np.where(pair_valid, np.nan_to_num(diff) / np.sqrt(np.clip(var, 1e-12, None)), 0.0)
    conf = 2.0 * _normal_cdf(z) - 1.0
    n_pairs = pair_valid.sum(1)
    return np.where(n_pairs > 0, (conf * pair_valid).sum(1) / np.maximum(n_pairs, 1), 0.0)


@dataclass
class PromptConsensus:
    prompt_id: str
    response_ids: list[str]  # best first
    scores: list[float]
    stderr: list[float]
    confidence: float
    rater_ids: list[str]
    num_judgements: int


def consensus(problem: Problem, result: FitResult) -> list[PromptConsensus]:
    """Per-prompt consensus (responses sorted best first) from a fit over `problem`."""
    grid = problem.item_at()
    judgements_per_prompt = np.bincount(problem.item_prompt[problem.winner], minlength=problem.n_prompts)
    raters_of: list[set[int]] = [set() for _ in range(problem.n_prompts)]
    for p, r in zip(problem.item_prompt[problem.winner].tolist(), problem.rater.tolist()):
        raters_of[p].add(r)
    out = []
    for p in range(problem.n_prompts):
        n = int(problem.items_per_prompt[p])
        sc = result.scores[p, :n]
        order = np.argsort(-sc, kind="stable")
        items = grid[p, :n][order]
        out.append(PromptConsensus(
            prompt_id=problem.prompt_ids[p] if problem.prompt_ids else str(p),
            response_ids=[problem.item_ids[i] if problem.item_ids else str(i) for i in items.tolist()],
            scores=sc[order].tolist(), stderr=result.stderr[p, :n][order].tolist(),
            confidence=float(result.confidence[p]),
            rater_ids=sorted(problem.rater_ids[r] if problem.rater_ids else str(r) for r in raters_of[p]),
            num_judgements=int(judgements_per_prompt[p])))
    return out
