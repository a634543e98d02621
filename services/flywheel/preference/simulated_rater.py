"""Simulated raters for the demo loop and tests: rank candidates by a hidden ground truth.

The hidden truth of a response is its VADER compound sentiment score (in [-1, 1]): the loop's
"humans" prefer positive answers. Each rater perturbs the truth with Gaussian noise; kinds:

* ``honest``      ranks by truth + noise,
* ``adversarial`` ranks by the negated truth + noise (systematically wrong),
* ``random``      ranks uniformly at random (a low-quality rater).

`SimulatedRater.rate(prompt_id, prompt_text, candidates) -> Ranking` is the pure part.
`RaterClient` submits with the rater's bearer token over gRPC. `LeasingRaterRunner` works like a
rating team: each rater leases its next task from the service and answers it (the loop uses this).
`SimulatedRaterRunner` instead consumes flywheel.rollouts.v1, groups candidates by prompt and has a
few raters of a pool rank each prompt (no assignment; for replaying traffic).
Event ids are deterministic (rater, prompt, candidate ids), so redelivered rollouts and retried
submits are acknowledged as duplicates rather than counted twice.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Sequence

import grpc

from flywheel.runtime.client import channel_options
from flywheel.v1 import common_pb2, preference_pb2, preference_pb2_grpc

log = logging.getLogger(__name__)

KINDS = ("honest", "adversarial", "random")


@lru_cache(maxsize=1)
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def ground_truth(text: str) -> float:
    """The hidden quality of a response: VADER compound sentiment in [-1, 1]."""
    return float(_analyzer().polarity_scores(text)["compound"])


def _ref(candidate: common_pb2.ResponseRef | common_pb2.Rollout) -> common_pb2.ResponseRef:
    if isinstance(candidate, common_pb2.Rollout):
        return common_pb2.ResponseRef(response_id=candidate.rollout_id, text=candidate.response_text,
                                      policy_version=candidate.policy_version)
    return candidate


def competition_ranks(scores: Sequence[float], tie_threshold: float = 0.0) -> list[int]:
    """1 = best; scores within `tie_threshold` of the previous (sorted) score share its rank."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    ranks = [0] * len(scores)
    for pos, i in enumerate(order):
        if pos > 0 and scores[order[pos - 1]] - scores[i] <= tie_threshold:
            ranks[i] = ranks[order[pos - 1]]
        else:
            ranks[i] = pos + 1
    return ranks


class SimulatedRater:
    def __init__(self, rater_id: str, *, kind: str = "honest", noise: float = 0.1, tie_threshold: float = 0.0,
                 seed: int | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        self.rater_id = rater_id
        self.kind = kind
        self.noise = noise
        self.tie_threshold = tie_threshold
        self._rng = random.Random(seed if seed is not None else rater_id)

    def event_id(self, prompt_id: str, response_ids: Sequence[str]) -> str:
        key = "\0".join([self.rater_id, prompt_id, *sorted(response_ids)])
        return "sim-" + hashlib.sha256(key.encode()).hexdigest()[:32]

    def scores(self, texts: Sequence[str]) -> list[float]:
        if self.kind == "random":
            return [self._rng.random() for _ in texts]
        sign = -1.0 if self.kind == "adversarial" else 1.0
        return [sign * ground_truth(t) + self._rng.gauss(0.0, self.noise) for t in texts]

    def rate(self, prompt_id: str, prompt_text: str,
             candidates: Sequence[common_pb2.ResponseRef | common_pb2.Rollout]) -> common_pb2.Ranking:
        """A Ranking of `candidates` (>= 2) as this rater judges them."""
        refs = [_ref(c) for c in candidates]
        if len(refs) < 2:
            raise ValueError("need at least two candidates to rank")
        ranks = competition_ranks(self.scores([r.text for r in refs]), self.tie_threshold if self.kind != "random"
                                  else 0.0)
        ranking = common_pb2.Ranking(event_id=self.event_id(prompt_id, [r.response_id for r in refs]),
                                     rater_id=self.rater_id, prompt_id=prompt_id, prompt_text=prompt_text,
                                     responses=refs, ranks=ranks,
                                     lead_time_ms=int(1000 * (2 + len(refs) * self._rng.uniform(1, 4))))
        now = time.time_ns()
        ranking.submitted_at.FromNanoseconds(now)
        ranking.created_at.FromNanoseconds(now - ranking.lead_time_ms * 1_000_000)
        return ranking


def make_pool(n: int, *, adversarial_fraction: float = 0.0, random_fraction: float = 0.0, noise: float = 0.1,
              tie_threshold: float = 0.0, prefix: str = "sim-rater", seed: int = 0) -> list[SimulatedRater]:
    """n raters: round(n * fraction) adversarial and random ones, the rest honest."""
    if adversarial_fraction < 0 or random_fraction < 0 or adversarial_fraction + random_fraction > 1:
        raise ValueError("fractions must be >= 0 and add up to at most 1")
    n_adv = round(n * adversarial_fraction)
    n_rand = round(n * random_fraction)
    if n_adv + n_rand > n:
        raise ValueError("fractions add up to more than the pool")
    kinds = ["adversarial"] * n_adv + ["random"] * n_rand + ["honest"] * (n - n_adv - n_rand)
    random.Random(seed).shuffle(kinds)
    return [SimulatedRater(f"{prefix}-{i:02d}", kind=k, noise=noise, tie_threshold=tie_threshold, seed=seed * 1000 + i)
            for i, k in enumerate(kinds)]


class RaterClient:
    """Submits as one rater (its bearer token in the `authorization` metadata); blocking gRPC."""

    def __init__(self, target: str, token: str, *, root_certificates: bytes | None = None,
                 timeout_s: float = 30.0) -> None:
        if root_certificates is not None:
            self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates),
                                                options=channel_options())
        else:
            self._channel = grpc.insecure_channel(target, options=channel_options())
        self._stub = preference_pb2_grpc.PreferenceServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._timeout = timeout_s

    def submit(self, ranking: common_pb2.Ranking) -> preference_pb2.SubmitAck:
        return self._stub.SubmitRanking(ranking, metadata=self._metadata, timeout=self._timeout)

    def lease(self) -> preference_pb2.Task:
        """The next task for this rater (empty lease_id: nothing to do now)."""
        return self._stub.LeaseTask(preference_pb2.LeaseTaskRequest(kind=preference_pb2.TASK_KIND_RANK),
                                    metadata=self._metadata, timeout=self._timeout)

    def close(self) -> None:
        self._channel.close()


def submit_with_retry(client: RaterClient, ranking: common_pb2.Ranking, retry_for_s: float,
                      stop: threading.Event) -> preference_pb2.SubmitAck:
    """Submit, retrying what is transient: the service starting or overloaded, and rollouts it has not
    consumed yet (a runner may read a rollout before the service did). Event ids are deterministic,
    so a retry of something that did get through is acknowledged as a duplicate."""
    delay, deadline = 0.2, time.monotonic() + retry_for_s
    while True:
        try:
            return client.submit(ranking)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            transient = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 grpc.StatusCode.DEADLINE_EXCEEDED) or (
                code == grpc.StatusCode.INVALID_ARGUMENT and "unknown response id" in (exc.details() or ""))
            if not transient or time.monotonic() + delay > deadline or stop.is_set():
                raise
            log.info("submit of %s failed (%s); retrying in %.1fs", ranking.event_id, code, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


@dataclass
class _Group:
    prompt_text: str
    expected: int
    first_seen: float
    rollouts: dict[str, common_pb2.Rollout] = field(default_factory=dict)


class SimulatedRaterRunner:
    """Consumes rollouts, groups them by prompt, and has `raters_per_prompt` raters rank each group.

    A group is rated when it holds the number of candidates the prompt asked for (`sampling.n`) or,
    with at least two candidates, after `max_wait_s`. Offsets are committed only when no group is
    pending, after every submission was acknowledged (at-least-once; duplicates are harmless).
    """

    def __init__(self, consumer, raters: Sequence[tuple[SimulatedRater, RaterClient]], *, raters_per_prompt: int = 3,
                 max_wait_s: float = 5.0, seed: int = 0,
                 accept: Callable[[common_pb2.Rollout], bool] | None = None, retry_for_s: float = 60.0) -> None:
        """`accept(rollout)` selects the rollouts to rate (default: all; e.g. only the train split)."""
        self.accept = accept
        self.retry_for_s = retry_for_s
        self.consumer = consumer  # a flywheel.bus TypedConsumer of ROLLOUTS
        self.raters = list(raters)
        self.raters_per_prompt = min(raters_per_prompt, len(self.raters))
        self.max_wait_s = max_wait_s
        self._seed = seed
        self._groups: dict[str, _Group] = {}
        self._stop = threading.Event()
        self.submitted = 0
        self.duplicates = 0
        self.prompts_rated = 0

    def _rate(self, prompt_id: str, group: _Group) -> None:
        candidates = sorted(group.rollouts.values(), key=lambda r: r.candidate_index)
        # the same prompt always goes to the same raters: a redelivered prompt yields the same event ids
        chooser = random.Random(f"{self._seed}:{prompt_id}")
        for rater, client in chooser.sample(self.raters, self.raters_per_prompt):
            ack = self._submit(client, rater.rate(prompt_id, group.prompt_text, candidates))
            self.submitted += 1
            self.duplicates += int(ack.duplicate)
        self.prompts_rated += 1

    def _submit(self, client: RaterClient, ranking: common_pb2.Ranking) -> preference_pb2.SubmitAck:
        return submit_with_retry(client, ranking, self.retry_for_s, self._stop)

    def run_once(self, timeout_ms: int = 500) -> None:
        for d in self.consumer.poll(timeout_ms=timeout_ms):
            r = d.value
            if self.accept is not None and not self.accept(r):
                continue
            group = self._groups.setdefault(r.prompt_id, _Group(r.raw_prompt or r.prompt_text, max(r.sampling.n, 1),
                                                                time.monotonic()))
            group.rollouts[r.rollout_id] = r
        now = time.monotonic()
        for prompt_id, group in list(self._groups.items()):
            complete = len(group.rollouts) >= group.expected
            if complete or now - group.first_seen >= self.max_wait_s:
                if len(group.rollouts) >= 2:
                    self._rate(prompt_id, group)
                del self._groups[prompt_id]
        if not self._groups:
            self.consumer.commit()

    def run(self, *, max_prompts: int | None = None, timeout_s: float | None = None) -> int:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._stop.is_set():
            if max_prompts is not None and self.prompts_rated >= max_prompts:
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            self.run_once()
        return self.prompts_rated

    def stop(self) -> None:
        self._stop.set()


class LeasingRaterRunner:
    """Simulated raters that work like people do: lease a task, rank it, submit with the lease id.

    The service decides who answers what (overlap, informative order); a group counts as rated once
    `raters_per_prompt` rankings of it were acknowledged. Event ids are deterministic, so a retried
    submission is acknowledged as a duplicate.
    """

    def __init__(self, raters: Sequence[tuple[SimulatedRater, RaterClient]], *, raters_per_prompt: int = 3,
                 idle_wait_s: float = 0.2, retry_for_s: float = 60.0) -> None:
        self.raters = list(raters)
        self.raters_per_prompt = min(raters_per_prompt, len(self.raters))
        self.idle_wait_s = idle_wait_s
        self.retry_for_s = retry_for_s
        self._stop = threading.Event()
        self._answers: dict[tuple[str, str], int] = {}
        self.submitted = 0
        self.duplicates = 0
        self.prompts_rated = 0

    def run_once(self) -> int:
        """One lease (and answer) per rater; returns how many tasks were answered."""
        answered = 0
        for rater, client in self.raters:
            if self._stop.is_set():
                break
            try:
                task = client.lease()
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    continue  # starting or restarting: try again next round
                raise
            if not task.lease_id or len(task.candidates) < 2:
                continue
            ranking = rater.rate(task.prompt_id, task.prompt_text, list(task.candidates))
            ranking.lease_id = task.lease_id
            ack = submit_with_retry(client, ranking, self.retry_for_s, self._stop)
            self.submitted += 1
            self.duplicates += int(ack.duplicate)
            key = (task.prompt_id, task.policy_version)
            self._answers[key] = self._answers.get(key, 0) + 1
            if self._answers[key] == self.raters_per_prompt:
                self.prompts_rated += 1
            answered += 1
        return answered

    def run(self, *, max_prompts: int | None = None, timeout_s: float | None = None) -> int:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._stop.is_set():
            if max_prompts is not None and self.prompts_rated >= max_prompts:
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            if not self.run_once():
                self._stop.wait(self.idle_wait_s)
        return self.prompts_rated

    def stop(self) -> None:
        self._stop.set()
