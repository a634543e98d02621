"""Bradley–Terry consensus over all prompts at once, with ties and rater reliability.

Model (per prompt, responses i with log-strengths s_i):

* Davidson's extension of Bradley–Terry for ties: with d = s_i - s_j and Z = e^{d/2} + e^{-d/2} + ν,
  P(i ≻ j) = e^{d/2}/Z, P(j ≻ i) = e^{-d/2}/Z, P(tie) = ν/Z. ν is one global parameter, estimated
  when ties were observed and 0 otherwise (then this is exactly Bradley–Terry).
* Rankings are broken into all their pairs with weight 2/k (k-1 comparisons per ranking, the
  information of a Plackett–Luce ranking); see `store.derive`.
* Rater reliability (crowd-BT, Chen et al., WSDM 2013): rater r reports the true outcome of a
  comparison with probability η_r (its accuracy) and the reversed one otherwise; ties are never
  reversed. η ≈ 1 careful, 0.5 random, < 0.5 adversarial; reported as the weight w_r = 2η_r - 1
  in [-1, 1]. Beta prior on η_r (`reliability_prior_strength` pseudo-judgements at
  `reliability_prior_accuracy`), plus optional known-answer (gold) counts as Binomial evidence.
  Fitted as a fixed point: for the current accuracies the scores are solved by Newton steps with a
  backtracking line search on the log posterior (monotone); then each accuracy's exact maximum
  against leave-one-rater-out scores (a rater cannot vouch for itself) gives the map
  η ← G(η), iterated with secant (quasi-Newton) acceleration that steers away from saddles
  (`_Accelerator`). Bounded by construction: η stays inside (0, 1), so nothing can diverge.
* Regularisation: independent Gamma(λ+1, λ) priors on the strengths π_i = e^{s_i}, i.e. the
  penalty λ Σ (e^{s_i} - s_i). It keeps sparse/separable prompts finite, needs no gauge fixing,
  and its MAP is exactly the fixed point of choix's `ilsr_pairwise(alpha = λ / n_responses)`
  (Caron & Doucet 2012 show the Gamma prior is conjugate to BT's latent-variable form).

Everything is vectorised over prompts: responses are laid out in a (P, K) grid (K = most responses
of any prompt, padding masked), gradients and Hessians are built with `np.bincount` over all
judgements, and each Newton step solves the P small K×K systems at once (`_solve_definite`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

_MAX_STEP = 3.0          # largest change of one log-strength in one Newton step
_MAX_HALVINGS = 40       # backtracking line search: step sizes 1, 1/2, ... 2^-40
_ETA_FLOOR = 1e-9        # accuracies stay inside (0, 1): the Beta prior keeps them there, this guards rounding


@dataclass(frozen=True)
class FitOptions:
    prior_strength: float = 0.5
    reliability: bool = True
    # Beta prior on each rater's accuracy η (probability a judgement is not reversed): `reliability_prior_strength`
    # pseudo-judgements, `reliability_prior_accuracy` of them correct. Its mode is the prior accuracy.
    reliability_prior_strength: float = 4.0
    reliability_prior_accuracy: float = 0.95
    max_iterations: int = 500
    tolerance: float = 1e-6
    ties: bool = True  # estimate Davidson's ν when ties are present; False: ties count half a win each way

    def __post_init__(self) -> None:
        _check("prior_strength", self.prior_strength, 0.0, 1e6, low_open=True)
        _check("reliability_prior_strength", self.reliability_prior_strength, 0.0, 1e9, low_open=True)
        _check("reliability_prior_accuracy", self.reliability_prior_accuracy, 0.5, 1.0, low_open=True, high_open=True)
        _check("max_iterations", self.max_iterations, 1, MAX_ITERATIONS)
        _check("tolerance", self.tolerance, 0.0, 1.0, low_open=True, high_open=True)


MAX_ITERATIONS = 10_000


def _check(name: str, value: float, low: float, high: float, *, low_open: bool = False,
           high_open: bool = False) -> None:
    above = low < value if low_open else low <= value
    below = value < high if high_open else value <= high
    ok = math.isfinite(value) and above and below
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"FitOptions.{name} must be in {lo}{low}, {high}{hi}, got {value!r}")


@dataclass(frozen=True)
class GoldEvidence:
    """Known-answer (gold) items per rater, aligned with `Problem.rater_ids`: `correct` of `total` answered right.

    Gold items have a clear answer, so a right answer means the judgement was not reversed: the counts
    enter the Beta posterior of the rater's accuracy like `total` extra judgements, `correct` of them honest.
    """

    correct: np.ndarray
    total: np.ndarray

    @staticmethod
    def for_problem(problem: "Problem", counts: Mapping[str, tuple[float, float]]) -> "GoldEvidence":
        """Align {rater_id: (correct, total)} with a problem's raters (raters without gold get 0 of 0)."""
        correct = np.zeros(problem.n_raters)
        total = np.zeros(problem.n_raters)
        for r, rater_id in enumerate(problem.rater_ids):
            if rater_id in counts:
                correct[r], total[r] = counts[rater_id]
        return GoldEvidence(correct, total)

    def validated(self, n_raters: int) -> tuple[np.ndarray, np.ndarray]:
        c = np.asarray(self.correct, dtype=np.float64)
        n = np.asarray(self.total, dtype=np.float64)
        if c.shape != (n_raters,) or n.shape != (n_raters,):
            raise ValueError(f"GoldEvidence needs one count per rater ({n_raters}), got {c.shape} and {n.shape}")
        if not (np.isfinite(c).all() and np.isfinite(n).all() and (c >= 0).all() and (c <= n).all()):
            raise ValueError("GoldEvidence counts must be finite with 0 <= correct <= total")
        return c, n


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
    reliability: np.ndarray  # (R,) rater weights w_r = 2η_r - 1 in [-1, 1]: 1 never reversed, 0 random, <0 adversarial
    tie_parameter: float     # Davidson's ν
    iterations: int          # Newton steps of the scores (each followed, once settled, by an accuracy update)
    converged: bool
    reliability_stderr: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (R,) 0 where not estimated
    rater_judgements: np.ndarray = field(default_factory=lambda: np.zeros(0))    # (R,) weighted non-tie judgements
    objective: float = 0.0   # log posterior of the scores at the estimate, given the accuracies (up to a constant)


def _terms(pw: np.ndarray, pl: np.ndarray, A: np.ndarray, B: np.ndarray, m: np.ndarray):
    """Davidson terms in x = s_first - s_second: d loglik/dx and -d² loglik/dx² of each judgement.

    pw, pl: P(first wins), P(second wins); A, B: weight on "first wins", "second wins"; m: A + B + weight on "tie".
    """
    diff = pw - pl
    gd = 0.5 * ((A - B) - m * diff)
    h = 0.25 * m * ((pw + pl) - diff * diff)
    return gd, h


def _probabilities(x: np.ndarray, nu: float):
    """Davidson's P(first wins), P(second wins), P(tie) at score difference x (P(tie) 0.0 when ν = 0)."""
    ep = np.exp(0.5 * np.clip(x, -60.0, 60.0))
    em = 1.0 / ep
    Z = ep + em + nu if nu else ep + em
    return ep / Z, em / Z, nu / Z if nu else 0.0


class _Model:
    """The kept judgements in the (P, K) grid layout: objective, responsibilities and Newton steps.

    Each judgement carries masses a ("first wins"), b ("second wins"), t ("tie"). Rater r reports the
    true outcome with probability η_r and the reversed one otherwise (ties are never reversed), so
    P(first wins | r) = η_r p_w + (1 - η_r) p_l with Davidson's p_w, p_l at s_first - s_second.
    """

    def __init__(self, problem: Problem, keep: np.ndarray, options: FitOptions) -> None:
        P, K = problem.n_prompts, problem.K
        self.P, self.K, self.R = P, K, problem.n_raters
        self.valid = problem.valid()
        self.validf = self.valid.ravel()
        loc, pr = problem.item_local, problem.item_prompt
        winner, loser = problem.winner[keep], problem.loser[keep]
        prompt = pr[winner]
        lw, ll = loc[winner], loc[loser]
        self.fw, self.fl = prompt * K + lw, prompt * K + ll   # flat (P*K) index of first / second response
        pair = np.minimum(lw, ll) * K + np.maximum(lw, ll)  # unordered pair of responses, in a K×K grid
        self.pair_of_prompt = prompt * K * K + pair
        tie, w = problem.tie[keep], problem.weight[keep]
        self.rater = problem.rater[keep]
        if options.ties:
            self.a, self.b, self.t = np.where(tie, 0.0, w), np.zeros_like(w), np.where(tie, w, 0.0)
        else:  # a tie counts as half a win for each side
            self.a, self.b, self.t = np.where(tie, 0.5 * w, w), np.where(tie, 0.5 * w, 0.0), np.zeros_like(w)
        self.has_ties = bool(self.t.any())
        self.lam = float(options.prior_strength)
        # (prompt, rater) cells, for the leave-one-rater-out scores
        cell_key, self.cell = np.unique(prompt * self.R + self.rater, return_inverse=True)
        self.cell = self.cell.ravel()
        self.pair_of_cell = self.cell * K * K + pair
        self.cell_prompt = cell_key // self.R
        self.lw, self.ll = lw, ll
        # Evidence on a rater's accuracy: its non-tie judgements (a tie reads the same reversed) on prompts
        # someone else judged too (elsewhere the held-out scores are the prior's, and say nothing).
        self.shared = np.flatnonzero((np.bincount(self.cell_prompt, minlength=P) >= 2)[prompt] & (self.a + self.b > 0))
        mass = (self.a + self.b)[self.shared]
        self.rater_mass = np.bincount(self.rater[self.shared], mass, self.R).astype(np.float64)
        self.two_sided = bool(self.b.any())  # b > 0 only for ties counted as half wins (ties=False)
        self._cached: tuple | None = None
        self._mixed: tuple | None = None
        self._evidence: tuple | None = None
        self.mass = self.a + self.b + self.t  # the EM surrogate's masses split this, whatever the accuracies
        self.cw, self.cl = self.cell * K + lw, self.cell * K + ll  # flat (cell, response) index of each judgement

    def probabilities(self, S: np.ndarray, nu: float):
        """Davidson probabilities of every judgement at scores S (the last evaluation is reused)."""
        if self._cached is not None and self._cached[0] is S and self._cached[1] == nu:
            return self._cached[2]
        probabilities = _probabilities(S[self.fw] - S[self.fl], nu)
        self._cached = (S, nu, probabilities)
        return probabilities

    def mixture(self, S: np.ndarray, nu: float, eta_j: np.ndarray | None):
        """P(judgement not reversed | its outcome) for the a and b masses, and the outcome likelihoods
        (the last evaluation is reused; the b terms are None when no judgement has b mass).

        eta_j None: nobody reverses (reliability off), the plain Davidson model.
        """
        cached = self._mixed
        if cached is not None and cached[0] is S and cached[1] == nu and cached[2] is eta_j:
            return cached[3]
        pw, pl, _ = self.probabilities(S, nu)
        if eta_j is None:
            mixed = (1.0, 1.0, pw, pl)
        else:
            fa = pl + eta_j * (pw - pl)
            fb = pw + eta_j * (pl - pw) if self.two_sided else None
            mixed = (eta_j * pw / fa, eta_j * pl / fb if self.two_sided else None, fa, fb)
        self._mixed = (S, nu, eta_j, mixed)
        return mixed

    def split(self, S: np.ndarray, nu: float, eta_j: np.ndarray | None):
        """EM surrogate masses ("first wins", "second wins" after the expected reversals) and lost information."""
        if eta_j is None:
            return self.a, self.b, None
        ra, rb, _, _ = self.mixture(S, nu, eta_j)
        A = self.a * ra
        B = self.a - A
        missing = A * (1.0 - ra)
        if self.two_sided:
            A, B = A + self.b * (1.0 - rb), B + self.b * rb
            missing = missing + self.b * rb * (1.0 - rb)
        return A, B, missing

    def objective(self, S: np.ndarray, nu: float, eta_j: np.ndarray | None) -> float:
        """Log likelihood (reversals summed out) + log Gamma prior of the strengths."""
        _, _, fa, fb = self.mixture(S, nu, eta_j)
        # elementwise sums, not `@`: a BLAS dot product can be slowed badly by threads on a busy machine
        ll = float((self.a * np.log(fa)).sum())
        if self.two_sided:
            ll += float((self.b * np.log(fb)).sum())
        if self.has_ties:
            ll += float((self.t * np.log(self.probabilities(S, nu)[2])).sum())
        prior = -self.lam * float(np.where(self.validf, np.exp(np.minimum(S, 700.0)) - S, 0.0).sum())
        return ll + prior

    def hessian(self, S: np.ndarray, curvature: np.ndarray, floor: bool = False) -> np.ndarray:
        """(P, K, K) Hessian of the log posterior in S, given -d²/dx² of each judgement's log likelihood
        (`floor`: each pair's summed curvature floored at 0, so the Hessian is negative definite)."""
        K = self.K
        H = _likelihood_hessian(self.pair_of_prompt, self.P, K, curvature)
        diag = np.where(self.validf, -self.lam * np.exp(np.minimum(S, 700.0)), -1.0).reshape(self.P, K)  # padding: -1
        H[:, np.arange(K), np.arange(K)] += diag
        if floor:  # only prompts with a pair of negative curvature can be indefinite; floor those that are
            off_diagonal = 1.0 - np.eye(K)
            negative = np.flatnonzero(H.ravel() < 0)  # the diagonal, and off the diagonal pairs of negative curvature
            negative = negative[(negative % (K * K)) // K != negative % K]
            suspect = np.unique(negative // (K * K))
            indefinite = suspect[np.linalg.eigvalsh(H[suspect]).max(1) >= 0] if len(suspect) else suspect
            if len(indefinite):
                W = np.maximum(H[indefinite], 0.0) * off_diagonal
                W[:, np.arange(K), np.arange(K)] = diag[indefinite] - W.sum(2)
                H[indefinite] = W
        return H

    def newton_direction(self, S: np.ndarray, A: np.ndarray, B: np.ndarray, missing, nu: float) -> np.ndarray:
        """Newton step of the log posterior in the scores for fixed accuracies.

        A, B: the judgements split into honest/reversed by their responsibilities (the EM surrogate,
        whose gradient is the objective's). Curvature: the surrogate's minus the information lost to
        not knowing which judgements were reversed (`missing`, a·ρ(1-ρ) per judgement): the exact
        Hessian, so convergence is quadratic. Where a prompt's Hessian is not negative definite, each
        of its pairs' summed curvature is floored at 0 (the prior adds -λ e^s on the diagonal): an
        ascent direction always. (Flooring per judgement, as before, made convergence linear.)
        """
        PK = self.P * self.K
        pw, pl, _ = self.probabilities(S, nu)
        gd, h = _terms(pw, pl, A, B, self.mass)
        g = np.bincount(self.fw, gd, PK) - np.bincount(self.fl, gd, PK)
        g += np.where(self.validf, self.lam * (1.0 - np.exp(np.minimum(S, 700.0))), 0.0)
        H = self.hessian(S, h if missing is None else h - missing, floor=missing is not None)
        step = _solve_definite(H, -g.reshape(self.P, self.K)).ravel()
        return np.clip(step, -_MAX_STEP, _MAX_STEP) * self.validf

    def held_out_differences(self, S: np.ndarray, A: np.ndarray, B: np.ndarray, nu: float) -> np.ndarray:
        """s_first - s_second of every judgement as the *other* raters of its prompt put it.

        For every (prompt, rater) cell, one Newton step from the current scores with that rater's
        gradient and Hessian removed, all cells in one batched solve. A rater's accuracy is judged
        against these, so it cannot vouch for itself: with a few raters per prompt the joint scores
        follow each rater's own judgements, and even a random rater would look accurate.
        """
        P, K, C = self.P, self.K, len(self.cell_prompt)
        d = S[self.fw] - S[self.fl]
        pw, pl, _ = self.probabilities(S, nu)
        gd, h = _terms(pw, pl, A, B, self.mass)
        g_all = np.bincount(self.fw, gd, P * K) - np.bincount(self.fl, gd, P * K)
        g_all += np.where(self.validf, self.lam * (1.0 - np.exp(np.minimum(S, 700.0))), 0.0)
        cw, cl = self.cw, self.cl
        g_r = np.bincount(cw, gd, C * K) - np.bincount(cl, gd, C * K)
        # the other raters' curvature on each pair: the prompt's minus the cell's
        W = np.bincount(self.pair_of_prompt, h, P * K * K).reshape(P, K, K)[self.cell_prompt] \
            - np.bincount(self.pair_of_cell, h, C * K * K).reshape(C, K, K)
        h_loo = W + W.transpose(0, 2, 1)
        prior = np.where(self.validf, -self.lam * np.exp(np.minimum(S, 700.0)), -1.0).reshape(P, K)  # padding: -1
        h_loo[:, np.arange(K), np.arange(K)] = prior[self.cell_prompt] - _row_sums(h_loo)
        g_loo = g_all.reshape(P, K)[self.cell_prompt] - g_r.reshape(C, K)
        shift = _solve_definite(h_loo, -g_loo)
        shift = np.clip(shift, -_MAX_STEP, _MAX_STEP).ravel()
        return d + shift[cw] - shift[cl]

    def accuracies(self, d_held_out: np.ndarray, nu: float, eta: np.ndarray, alpha: np.ndarray, beta: np.ndarray,
                   max_steps: int = 60):
        """Each rater's MAP accuracy against the held-out scores, and its observed information there
        (`max_steps=0`: only the information at `eta`).

        The log posterior Σ a log(η p_w + (1-η) p_l) + b log(η p_l + (1-η) p_w) + α log η + β log(1-η)
        is concave in η with α, β > 0, so a safeguarded Newton iteration (bisection fallback inside
        the bracket it keeps) finds the unique maximum in (0, 1).
        """
        idx, R = self.shared, self.R
        if self._evidence is None or self._evidence[0] is not idx:  # (oracle_weights sets its own `shared`)
            every = len(idx) == len(self.a)
            self._evidence = (idx, every, *((v if every else v[idx]) for v in (self.a, self.b, self.rater)))
        _, every, a, b, rater = self._evidence
        pw, pl, _ = _probabilities(d_held_out if every else d_held_out[idx], nu)
        diff = pw - pl
        two_sided = self.two_sided
        lo, hi = np.full(R, _ETA_FLOOR), np.full(R, 1.0 - _ETA_FLOOR)
        x = np.clip(eta, lo, hi)
        for steps in range(max_steps + 1):
            xj = x[rater]
            ua = diff / (pl + xj * diff)  # d/dη log(η p_w + (1-η) p_l)
            aua = a * ua
            # (float: np.bincount of no judgements at all is an integer array)
            g = np.bincount(rater, aua, R).astype(np.float64)
            info = np.bincount(rater, aua * ua, R).astype(np.float64)
            if two_sided:
                ub = diff / (pw - xj * diff)
                g -= np.bincount(rater, b * ub, R)
                info += np.bincount(rater, b * ub * ub, R)
            g += alpha / x - beta / (1.0 - x)
            info += alpha / x ** 2 + beta / (1.0 - x) ** 2
            step = g / info
            if steps == max_steps or float(np.abs(step).max()) < 1e-12:
                break
            lo, hi = np.where(g > 0, x, lo), np.where(g > 0, hi, x)
            new = x + step
            x = np.where((new >= lo) & (new <= hi), new, 0.5 * (lo + hi))
        return x, info


def _solve_definite(M: np.ndarray, g: np.ndarray) -> np.ndarray:
    """x with M x = g for a batch of small definite matrices M (n, K, K) (Hessians here: negative definite).

    For small K, Gaussian elimination without pivoting (stable for definite matrices) unrolled over
    the entries, each step one operation on all n matrices: 3x faster than LAPACK's per-matrix calls.
    """
    n, K = g.shape
    if K > 6 or K == 0:
        return np.linalg.solve(M, g[..., None])[..., 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        A = {(i, j): M[:, i, j].copy() for i in range(K) for j in range(i, K)}  # the upper triangle (symmetric)
        b = [g[:, i].copy() for i in range(K)]
        for k in range(K):
            inverse = 1.0 / A[k, k]
            for i in range(k + 1, K):
                f = A[k, i] * inverse
                for j in range(i, K):
                    A[i, j] = A[i, j] - f * A[k, j]
                b[i] = b[i] - f * b[k]
        x: list[np.ndarray] = [b[0]] * K
        for k in reversed(range(K)):
            acc = b[k]
            for j in range(k + 1, K):
                acc = acc - A[k, j] * x[j]
            x[k] = acc / A[k, k]
    solution = np.stack(x, 1)
    if not np.isfinite(solution).all():  # a vanishing pivot (not definite after all): LAPACK, with pivoting
        return np.linalg.solve(M, g[..., None])[..., 0]
    return solution


def _likelihood_hessian(group_pair: np.ndarray, groups: int, K: int, curvature: np.ndarray) -> np.ndarray:
    """(groups, K, K) Hessian of Σ log-likelihood over judgements, each a function of s_i - s_j.

    A judgement of (i, j) with curvature c adds +c at (i, j) and (j, i) and -c at (i, i) and (j, j):
    sum c per unordered pair (one bincount), then the diagonal is minus the row sums.
    """
    W = np.bincount(group_pair, curvature, groups * K * K).reshape(groups, K, K)
    W = W + W.transpose(0, 2, 1)
    W[:, np.arange(K), np.arange(K)] = -_row_sums(W)
    return W


def _row_sums(W: np.ndarray) -> np.ndarray:
    """W.sum(2) for a batch of small matrices: column by column is several times faster than a reduction."""
    K = W.shape[2]
    if K > 8 or K == 0:
        return W.sum(2)
    total = W[:, :, 0].copy()
    for j in range(1, K):
        total += W[:, :, j]
    return total


def _ascend(objective, x, direction, current: float):
    """Backtracking line search: the longest of x + 2^-k direction that does not lower the objective."""
    slack = 1e-12 * (1.0 + abs(current))  # rounding: near the optimum exact steps change it by ~1 ulp
    for k in range(_MAX_HALVINGS + 1):
        trial = x + direction * 0.5 ** k
        value = objective(trial)
        if math.isfinite(value) and value >= current - slack:
            return trial, value
    return x, current


class _Accelerator:
    """Secant acceleration of the accuracies' fixed-point iteration η ← G(η), steering clear of saddles.

    Plain steps η + f (f = G(η) - η) contract slowly where raters are alike (≈ 0.83 per step for three
    identical raters: how their accuracies differ is weakly determined). The secants of the last few
    steps give a model M of the Jacobian of f on the subspace they span (multisecant quasi-Newton,
    like Anderson acceleration). Its eigenvalues say how the plain iteration behaves there: Re μ < 0
    attracts, and there the step is Newton's, -M⁻¹f; Re μ > 0 is a fixed point the plain iteration
    leaves (a saddle: e.g. one honest and one reversed rater taken for two random ones), and there
    the step goes away from it instead (sign of μ flipped), and such a point is never reported as
    converged. Outside the subspace, plain steps. Safeguards: a trust region (a secant step moves no
    accuracy by more than `radius`, doubled while the residual falls, halved when it does not: with
    two raters judged only against each other the model extrapolated to 0 and 1 and cycled); when
    the residual more than doubles the history is dropped; plain steps that turn back on the
    previous one (raters contradicting each other: a 2-cycle) are damped.
    """

    MEMORY = 5        # secants kept
    SADDLE = 0.01     # Re μ above this: a direction the plain iteration leaves (below: a slow attracting one)
    SLOWEST = 0.05    # nearly flat directions (|μ| below this) move at most f / SLOWEST: the model may be off

    def __init__(self) -> None:
        self.dx: list[np.ndarray] = []  # secants: differences of successive accuracies
        self.df: list[np.ndarray] = []  # and of their residuals
        self.ds: list[np.ndarray] = []  # and of the scores fitted to them
        self.last: tuple[np.ndarray, np.ndarray, float, np.ndarray] | None = None
        self.damping = 1.0
        self.plain = np.zeros(0)
        self.radius = 0.1  # trust region of the secant steps (largest change of an accuracy)

    def step(self, eta: np.ndarray, f: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """The next accuracies from `eta` with residual `f`, a prediction of how the scores fitted to
        them (`scores` for `eta`) change, and the distance from `eta` to the fixed point (infinite at a saddle)."""
        residual = float(np.abs(f).max()) if len(f) else 0.0
        rate = 1.0
        if self.last is not None:
            last_eta, last_f, last_residual, last_scores = self.last
            rate = residual / last_residual if last_residual > 0 else 0.0
            self.radius = min(0.5, 2.0 * self.radius) if rate < 1.0 else max(1e-3, 0.5 * self.radius)
            if residual > 2.0 * last_residual:
                self.dx, self.df, self.ds = [], [], []
            else:
                self.dx = [*self.dx, eta - last_eta][-self.MEMORY:]
                self.df = [*self.df, f - last_f][-self.MEMORY:]
                self.ds = [*self.ds, scores - last_scores][-self.MEMORY:]
        self.last = (eta, f, residual, scores)
        if self.dx:
            modelled = self._secant_step(f)
            if modelled is not None:
                step, combination, saddle = modelled
                length = float(np.abs(step).max())
                distance = math.inf if saddle else max(length, residual)
                if length > self.radius:  # far outside where the secants were taken: the model is not to be trusted
                    step, combination = step * (self.radius / length), combination * (self.radius / length)
                # the scores move like the accuracies' secants they came with (first order)
                scores_step = np.stack(self.ds, 1) @ combination
                return np.clip(eta + step, _ETA_FLOOR, 1.0 - _ETA_FLOOR), scores_step, distance
        # no history (or a degenerate one): a plain step, damped while it keeps turning back
        turned_back = len(self.plain) == len(f) and \
            float(f @ self.plain) < -0.5 * float(np.linalg.norm(f) * np.linalg.norm(self.plain))
        self.damping = max(0.05, 0.5 * self.damping) if turned_back else min(1.0, 1.5 * self.damping)
        self.plain = f
        # how far the fixed point still is: the geometric series of the observed contraction rate
        distance = residual / (1.0 - rate) if rate < 0.999 else 1e3 * residual
        return np.clip(eta + self.damping * f, _ETA_FLOOR, 1.0 - _ETA_FLOOR), np.zeros_like(scores), distance

    def _secant_step(self, f: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool] | None:
        """The step, the combination of the secants it takes, and whether the model has a saddle direction."""
        DX, DF = np.stack(self.dx, 1), np.stack(self.df, 1)
        length = np.linalg.norm(DX, axis=0)
        if not (length > 0).all():
            return None
        DX, DF = DX / length, DF / length  # unit secants: the cutoff below is a bound on their condition
        U, sig, Vt = np.linalg.svd(DX, full_matrices=False)
        rank = sig > 1e-8 * sig[0]
        if not rank.any():
            return None
        Q = U[:, rank]                                   # orthonormal basis of the secants' span
        M = Q.T @ DF @ (Vt[rank].T / sig[rank])          # f's Jacobian there: M (DX) = DF, projected
        try:
            mu, V = np.linalg.eig(M)
            fq = Q.T @ f
            saddle = mu.real > self.SADDLE
            # attracting directions: Newton; repelling ones: away; nearly flat ones: at most 1/SLOWEST times f
            mu = np.where(saddle, -mu, mu)
            mu = np.where(mu.real > -self.SLOWEST, -self.SLOWEST, mu)
            coefficients = np.linalg.solve(V, fq.astype(complex)) / mu
            inside = -(V @ coefficients).real
        except np.linalg.LinAlgError:
            return None
        step = Q @ inside + self.damping * (f - Q @ fq)
        combination = Vt[rank].T @ (inside / sig[rank]) / length  # Q @ inside = DX @ combination
        if not (np.isfinite(step).all() and np.isfinite(combination).all()):
            return None
        return step, combination, bool(saddle.any())


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    erf = np.frompyfunc(math.erf, 1, 1)
    return 0.5 * (1.0 + erf(np.asarray(z, dtype=np.float64) / math.sqrt(2.0)).astype(np.float64))


def fit(problem: Problem, options: FitOptions = FitOptions(), *, fixed_reliability: np.ndarray | None = None,
        gold: GoldEvidence | None = None) -> FitResult:
    """MAP scores (and, unless `fixed_reliability` is given, rater accuracies) for every prompt at once.

    Each iteration is one Newton step of the scores for the current accuracies (the EM surrogate's
    gradient, the observed curvature, a backtracking line search on the log posterior itself, so it
    never decreases; the same for log ν when there are ties). Once the scores have settled for the
    current accuracies, every rater's accuracy target G(η) is the exact maximum of its own log
    posterior against leave-one-rater-out scores (a concave 1-D problem; Beta prior and gold counts
    included), and `_Accelerator` picks the next accuracies (and predicts the scores' move).
    Converged when the scores' last step is below `tolerance` and so is the accuracies' distance to
    their fixed point (the secant model's step, never at a saddle); otherwise `converged=False`
    after `max_iterations` (score steps), with finite estimates either way. Judgements whose weight
    is not a positive finite number are ignored.
    """
    P, K, R = problem.n_prompts, problem.K, problem.n_raters
    estimate = options.reliability and fixed_reliability is None
    n0, eta0 = options.reliability_prior_strength, options.reliability_prior_accuracy
    correct, total = gold.validated(R) if gold is not None else (np.zeros(R), np.zeros(R))
    alpha, beta_ = n0 * eta0 + correct, n0 * (1.0 - eta0) + total - correct  # Beta posterior exponents
    if fixed_reliability is not None:
        fixed = np.asarray(fixed_reliability, dtype=np.float64)
        if fixed.shape != (R,) or not np.isfinite(fixed).all():
            raise ValueError(f"fixed_reliability needs {R} finite weights")
        eta = np.clip((1.0 + fixed) / 2.0, 0.0, 1.0)
    elif estimate:
        eta = alpha / (alpha + beta_)  # the prior's mode (with gold): where a rater without shared judgements stays
    else:
        eta = np.ones(R)
    keep = np.isfinite(problem.weight) & (problem.weight > 0) & (problem.winner != problem.loser)
    if P == 0 or not keep.any():
        empty = np.zeros((P, K))
        return FitResult(empty, empty, np.zeros(P), 2.0 * eta - 1.0, 0.0, 0, True, np.zeros(R), np.zeros(R), 0.0)

    model = _Model(problem, keep, options)
    a, b, rater = model.a, model.b, model.rater
    has_ties = model.has_ties
    tie_frac = float(model.t.sum() / (model.a + model.b + model.t).sum()) if has_ties else 0.0
    log_nu = math.log(max(2 * tie_frac / max(1 - tie_frac, 1e-6), 1e-3)) if has_ties else -math.inf

    def nu_of(log_nu: float) -> float:
        return math.exp(log_nu) if has_ties else 0.0

    plain = not estimate and bool((eta == 1.0).all())  # nobody reverses: plain Davidson, no mixture to evaluate

    def per_judgement(eta: np.ndarray) -> np.ndarray | None:
        return None if plain else eta[rater]

    S = np.zeros(P * K)
    eta_j = per_judgement(eta)
    objective = model.objective(S, nu_of(log_nu), eta_j)
    previous_delta = math.inf
    # Scores are solved (nearly) to their maximum for the current accuracies before the accuracies move:
    # first to 2e-2 (the Newton steps from zero have settled), then to 10% of the accuracies' last
    # residual, finally to `tolerance`. G evaluated at inexact scores only slows the secant steps down.
    settle = max(options.tolerance, 2e-2) if estimate else options.tolerance
    accelerator = _Accelerator()
    held_out = None  # the last leave-one-rater-out differences: (S, ν, accuracies, differences)
    converged = False
    iterations = 0
    for iterations in range(1, options.max_iterations + 1):
        S_old, log_nu_old = S, log_nu
        nu = nu_of(log_nu)
        A, B, missing = model.split(S, nu, eta_j)
        S, objective = _ascend(lambda s: model.objective(s, nu, eta_j), S,
                               model.newton_direction(S, A, B, missing, nu), objective)
        if has_ties:  # Newton step on log ν (its own line search), bounded to [e^-12, e^6]
            _, _, pt = model.probabilities(S, nu)
            m = model.mass
            g_nu = float((model.t - m * pt).sum())
            h_nu = float(-(m * pt * (1.0 - pt)).sum())
            target = log_nu - g_nu / h_nu if h_nu < 0 else log_nu
            target = min(max(target, log_nu - 2.0, -12.0), log_nu + 2.0, 6.0)
            log_nu, objective = _ascend(lambda v: model.objective(S, math.exp(v), eta_j), log_nu,
                                        target - log_nu, objective)
            nu = nu_of(log_nu)
        delta = max(float(np.abs(S - S_old).max()), abs(log_nu - log_nu_old) if has_ties else 0.0)
        # A small step is not convergence when the iteration contracts slowly: bound the distance
        # still to go by the geometric series of the observed contraction rate.
        rate = delta / previous_delta if previous_delta > 0 else 0.0
        remaining = delta * (rate / (1.0 - rate) if rate < 0.999 else 1e3)
        previous_delta = delta
        # Before the accuracies' fixed point is near, a Newton step's own size says enough: the error
        # after a step of δ is ~δ² (measured ≈ 0.5 δ²); at the end the step itself must be below tolerance.
        if settle <= options.tolerance:
            settled = delta < settle and remaining < settle
        else:  # Newton-like (fast) convergence: the step's square bounds the error after it
            settled = delta * delta < settle and (rate < 0.5 or remaining < settle)
        if not settled:
            continue
        if not estimate:
            converged = True
            break
        # The accuracies' map G: each rater's exact maximum against leave-one-rater-out scores.
        A, B, _ = model.split(S, nu, eta_j)
        held_out = (S, nu, eta_j, model.held_out_differences(S, A, B, nu))
        target, _ = model.accuracies(held_out[3], nu, eta, alpha, beta_)
        inner = np.append(S, log_nu) if has_ties else S
        following, predicted, distance = accelerator.step(eta, target - eta, inner)
        if distance < options.tolerance and settle <= options.tolerance:
            converged = True
            break
        settle = max(options.tolerance, 0.1 * float(np.abs(target - eta).max()))
        eta = following
        eta_j = per_judgement(eta)
        predicted = np.clip(predicted, -_MAX_STEP, _MAX_STEP)
        if has_ties:
            S, log_nu = S + predicted[:-1] * model.validf, min(max(log_nu + predicted[-1], -12.0), 6.0)
        else:
            S = S + predicted * model.validf
        nu = nu_of(log_nu)
        objective = model.objective(S, nu, eta_j)  # the line searches of the next iteration start here
        previous_delta = math.inf  # the scores' convergence is judged afresh for the new accuracies

    nu = nu_of(log_nu)
    # Laplace approximation at the mode with the observed (not the EM surrogate's) curvature: not
    # knowing which judgements were reversed removes information, a·ρ(1-ρ) per judgement.
    A, B, missing = model.split(S, nu, eta_j)
    pw, pl, _ = model.probabilities(S, nu)
    _, h = _terms(pw, pl, a, b, model.mass)
    H = model.hessian(S, h if missing is None else np.clip(h - missing, 0.0, None))
    if estimate:  # the information of each accuracy at its final value, against the final held-out scores
        if held_out is None or held_out[0] is not S or held_out[1] != nu or held_out[2] is not eta_j:
            A, B, _ = model.split(S, nu, eta_j)
            held_out = (S, nu, eta_j, model.held_out_differences(S, A, B, nu))
        _, weight_info = model.accuracies(held_out[3], nu, eta, alpha, beta_, max_steps=0)
    weight_stderr = 2.0 / np.sqrt(weight_info) if estimate else np.zeros(R)
    cov = np.linalg.inv(-H)
    valid = model.valid
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
    return FitResult(centred, stderr, confidence, 2.0 * eta - 1.0, nu, iterations, converged,
                     weight_stderr, model.rater_mass, objective)


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
