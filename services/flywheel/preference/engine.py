"""Consensus from the store: the global fit (rater weights over all prompts) and per-prompt queries.

Rater weights need every prompt a rater judged, so they come from a fit over the whole store
(`refresh`, run by ExportDataset and periodically in the background when events arrived).
`prompt()` refits one prompt with the current weights held fixed: cheap, and consistent with the
last global fit. A fit that stops at the iteration limit is reported, never raised: a warning, the
counter `flywheel_preference_fit_not_converged_total{scope}`, and `converged=false` in
GetRaterStatistics; its estimates are finite.

Gold (known-answer) items: `set_gold_counts({rater_id: (correct, total)})` gives the next global fit
each rater's record on them as extra evidence on its accuracy (see docs/preference.md).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Mapping

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from flywheel.preference.aggregation import (FitOptions, FitResult, GoldEvidence, Problem, build_problem, consensus,
                                             fit)
from flywheel.preference.store import PreferenceStore
from flywheel.v1 import common_pb2

AGGREGATION_SECONDS = Histogram(
    "flywheel_preference_aggregation_seconds", "Time of one consensus fit.", ("scope",),
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
RATER_WEIGHT = Gauge("flywheel_preference_rater_weight",
                     "Estimated weight of a rater's judgements, 2*accuracy-1 (1 never reversed, ~0 random, "
                     "<0 adversarial); the raters with most evidence, at most FLYWHEEL_PREFERENCE_MAX_RATER_SERIES.",
                     ("rater",))
RATER_WEIGHT_STDERR = Gauge("flywheel_preference_rater_weight_stderr",
                            "Standard error of flywheel_preference_rater_weight (same raters).", ("rater",))
PROMPTS_AGGREGATED = Gauge("flywheel_preference_prompts_aggregated", "Prompts in the last global fit.")
FIT_ITERATIONS = Gauge("flywheel_preference_fit_iterations", "Iterations of the last fit.", ("scope",))
FIT_NOT_CONVERGED = Counter("flywheel_preference_fit_not_converged_total",
                            "Fits that stopped at FLYWHEEL_PREFERENCE_MAX_ITERATIONS without converging.", ("scope",))

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RaterStats:
    weight: float         # 2η - 1
    weight_stderr: float
    accuracy: float       # η
    judgements: float     # weighted non-tie judgements on shared prompts
    gold_correct: float
    gold_total: float


@dataclass
class GlobalFit:
    problem: Problem
    result: FitResult
    store_changes: int
    fitted_at: float


def _timestamp(t: float):
    from google.protobuf.timestamp_pb2 import Timestamp

    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


class ConsensusEngine:
    def __init__(self, store: PreferenceStore, options: FitOptions, max_rater_series: int = 1000) -> None:
        self.store = store
        self.options = options
        self.max_rater_series = max_rater_series
        self._lock = threading.Lock()
        self._last: GlobalFit | None = None
        self.rater_weights: dict[str, float] = {}
        self.rater_stats: dict[str, RaterStats] = {}
        self._gold: dict[str, tuple[float, float]] = {}
        self._gold_changed = False
        self._exported: set[str] = set()

    def set_gold_counts(self, counts: Mapping[str, tuple[float, float]]) -> None:
        """Each rater's (correct, total) on known-answer items, replacing earlier counts; used from the next refresh."""
        checked = {}
        for rater_id, (correct, total) in counts.items():
            correct, total = float(correct), float(total)
            if not (0.0 <= correct <= total < float("inf")):
                raise ValueError(f"gold counts of rater {rater_id!r} must satisfy 0 <= correct <= total, "
                                 f"got ({correct}, {total})")
            checked[rater_id] = (correct, total)
        with self._lock:
            self._gold = checked
            self._gold_changed = True

    @property
    def stale(self) -> bool:
        return self._last is None or self._last.store_changes != self.store.changes or self._gold_changed

    def _problem(self, prompt_id: str | None = None) -> Problem:
        j = self.store.judgements(prompt_id)
        return build_problem(j.prompt_id, j.rater_id, j.winner_id, j.loser_id, j.tie, j.weight)

    def refresh(self) -> GlobalFit:
        """Fit every prompt (and the rater weights) from the store."""
        with self._lock:
            changes = self.store.changes
            problem = self._problem()
            gold = GoldEvidence.for_problem(problem, self._gold)
            self._gold_changed = False
            start = time.perf_counter()
            result = fit(problem, self.options, gold=gold)
            AGGREGATION_SECONDS.labels("global").observe(time.perf_counter() - start)
            _report_convergence("global", result, problem)
            self.rater_weights = dict(zip(problem.rater_ids, result.reliability.tolist()))
            self.rater_stats = {
                rater_id: RaterStats(float(result.reliability[r]), float(result.reliability_stderr[r]),
                                     float((1.0 + result.reliability[r]) / 2.0), float(result.rater_judgements[r]),
                                     float(gold.correct[r]), float(gold.total[r]))
                for r, rater_id in enumerate(problem.rater_ids)}
            self._export_rater_series()
            PROMPTS_AGGREGATED.set(problem.n_prompts)
            self._last = GlobalFit(problem, result, changes, time.time())
            return self._last

    def last_fit(self) -> GlobalFit | None:
        return self._last

    def _export_rater_series(self) -> None:
        """Weight gauges for the raters with most evidence (bounded cardinality); gauges of others are removed."""
        ranked = sorted(self.rater_stats.items(), key=lambda kv: (-kv[1].judgements, kv[0]))
        keep = dict(ranked[: self.max_rater_series])
        for rater in self._exported - keep.keys():
            RATER_WEIGHT.remove(rater)
            RATER_WEIGHT_STDERR.remove(rater)
        for rater, stats in keep.items():
            RATER_WEIGHT.labels(rater).set(stats.weight)
            RATER_WEIGHT_STDERR.labels(rater).set(stats.weight_stderr)
        self._exported = set(keep)

    def prompt(self, prompt_id: str) -> common_pb2.AggregatedPreference | None:
        """Consensus of one prompt with the current rater weights; None when nobody judged it."""
        problem = self._problem(prompt_id)
        if problem.n_prompts == 0:
            return None
        fixed = None
        if self.options.reliability:
            # a rater the last global fit did not see gets the prior's weight, like a rater without evidence
            prior = 2.0 * self.options.reliability_prior_accuracy - 1.0
            fixed = np.array([self.rater_weights.get(r, prior) for r in problem.rater_ids])
        start = time.perf_counter()
        result = fit(problem, self.options, fixed_reliability=fixed)
        AGGREGATION_SECONDS.labels("prompt").observe(time.perf_counter() - start)
        _report_convergence("prompt", result, problem)
        return self.messages(problem, result)[0]

    def messages(self, problem: Problem, result: FitResult, dataset_version: str = "") -> list[common_pb2.AggregatedPreference]:
        """AggregatedPreference per prompt (responses best first, all ordered pairs with margin > 0)."""
        per_prompt = consensus(problem, result)
        responses = self.store.responses([i for c in per_prompt for i in c.response_ids])
        prompt_texts = self.store.prompt_texts([c.prompt_id for c in per_prompt])
        now = _timestamp(time.time())
        out = []
        for c in per_prompt:
            msg = common_pb2.AggregatedPreference(
                prompt_id=c.prompt_id, prompt_text=prompt_texts.get(c.prompt_id, ""), confidence=c.confidence,
                rater_ids=c.rater_ids, num_judgements=c.num_judgements, dataset_version=dataset_version)
            msg.aggregated_at.CopyFrom(now)
            for rid, score, se in zip(c.response_ids, c.scores, c.stderr):
                known = responses.get(rid)
                msg.responses.add(response_id=rid, text=known.text if known else "",
                                  policy_version=known.policy_version if known else "", score=score, stderr=se)
            refs = list(msg.responses)
            for i in range(len(refs)):
                for j in range(i + 1, len(refs)):
                    margin = refs[i].score - refs[j].score
                    if margin <= 1e-12:
                        continue
                    msg.pairs.add(prompt_id=c.prompt_id, prompt_text=msg.prompt_text,
                                  chosen_id=refs[i].response_id, chosen_text=refs[i].text,
                                  rejected_id=refs[j].response_id, rejected_text=refs[j].text, margin=margin)
            out.append(msg)
        return out


def _report_convergence(scope: str, result: FitResult, problem: Problem) -> None:
    FIT_ITERATIONS.labels(scope).set(result.iterations)
    if not result.converged:
        FIT_NOT_CONVERGED.labels(scope).inc()
        log.warning("preference fit (%s, %d prompts, %d raters) did not converge in %d iterations; "
                    "estimates are finite but not final", scope, problem.n_prompts, problem.n_raters,
                    result.iterations)
