"""Consensus from the store: the global fit (rater weights over all prompts) and per-prompt queries.

Rater weights need every prompt a rater judged, so they come from a fit over the whole store
(`refresh`, run by ExportDataset and periodically in the background when events arrived).
`prompt()` refits one prompt with the current weights held fixed: cheap, and consistent with the
last global fit.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
from prometheus_client import Gauge, Histogram

from flywheel.preference.aggregation import FitOptions, FitResult, Problem, build_problem, consensus, fit
from flywheel.preference.store import PreferenceStore
from flywheel.v1 import common_pb2

AGGREGATION_SECONDS = Histogram(
    "flywheel_preference_aggregation_seconds", "Time of one consensus fit.", ("scope",),
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
RATER_WEIGHT = Gauge("flywheel_preference_rater_weight",
                     "Estimated weight of a rater's judgements (1 average, ~0 random, <0 adversarial).", ("rater",))
PROMPTS_AGGREGATED = Gauge("flywheel_preference_prompts_aggregated", "Prompts in the last global fit.")


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
    def __init__(self, store: PreferenceStore, options: FitOptions) -> None:
        self.store = store
        self.options = options
        self._lock = threading.Lock()
        self._last: GlobalFit | None = None
        self.rater_weights: dict[str, float] = {}

    @property
    def stale(self) -> bool:
        return self._last is None or self._last.store_changes != self.store.changes

    def _problem(self, prompt_id: str | None = None) -> Problem:
        j = self.store.judgements(prompt_id)
        return build_problem(j.prompt_id, j.rater_id, j.winner_id, j.loser_id, j.tie, j.weight)

    def refresh(self) -> GlobalFit:
        """Fit every prompt (and the rater weights) from the store."""
        with self._lock:
            changes = self.store.changes
            problem = self._problem()
            start = time.perf_counter()
            result = fit(problem, self.options)
            AGGREGATION_SECONDS.labels("global").observe(time.perf_counter() - start)
            self.rater_weights = dict(zip(problem.rater_ids, result.reliability.tolist()))
            for rater, weight in self.rater_weights.items():
                RATER_WEIGHT.labels(rater).set(weight)
            PROMPTS_AGGREGATED.set(problem.n_prompts)
            self._last = GlobalFit(problem, result, changes, time.time())
            return self._last

    def prompt(self, prompt_id: str) -> common_pb2.AggregatedPreference | None:
        """Consensus of one prompt with the current rater weights; None when nobody judged it."""
        problem = self._problem(prompt_id)
        if problem.n_prompts == 0:
            return None
        fixed = None
        if self.options.reliability:
            fixed = np.array([self.rater_weights.get(r, 1.0) for r in problem.rater_ids])
        start = time.perf_counter()
        result = fit(problem, self.options, fixed_reliability=fixed)
        AGGREGATION_SECONDS.labels("prompt").observe(time.perf_counter() - start)
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
