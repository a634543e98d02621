"""Built-in scorers without weights of their own.

- `VaderScorer`: VADER compound sentiment of the response; deterministic, no weights.
- `RemoteScorer`: another RewardService over gRPC, with a deadline and retries.
- `EnsembleScorer`: a weighted sum of scorers (built-in or plugins); reports every member's
  score as a component.
"""

from __future__ import annotations

import logging
import threading
import time
from importlib import metadata
from typing import Sequence

import grpc

from flywheel.reward.scorers.base import Component, Scorer, ScoreResult, check_lengths
from flywheel.reward.scorers.transformer import TransformerRewardScorer

log = logging.getLogger(__name__)


class VaderScorer(Scorer):
    """VADER compound sentiment of the response, in [-1, 1]; the prompt is ignored.

    VADER's cost grows with the square of the words it analyses (each word looks itself up with
    list.index), and every emoji expands to its description (🙂 -> "slightly smiling face"), so
    20,000 emoji took 136 s. Each response is therefore cut to its first `max_words` analysed words,
    counting an emoji as the words of its description: a bounded cost per item (~0.1 s at 512).
    """

    def __init__(self, max_words: int = 512) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        if max_words < 1:
            raise ValueError("max_words must be >= 1")
        self.max_words = max_words
        self._analyzer = SentimentIntensityAnalyzer()
        self._emoji_words = {e: len(d.split()) for e, d in self._analyzer.emojis.items()}
        try:
            self._version = metadata.version("vaderSentiment")
        except metadata.PackageNotFoundError:  # pragma: no cover
            self._version = "unknown"

    @property
    def name(self) -> str:
        return "vader"

    @property
    def version(self) -> str:
        return self._version

    def bounded(self, text: str) -> str:
        """The prefix of `text` VADER analyses: at most `max_words` words, emoji counted expanded."""
        if len(text) <= self.max_words:  # fewer characters than the budget: few words
            if not any(ch in self._emoji_words for ch in text):
                return text
        words, in_word = 0, False
        for i, ch in enumerate(text):
            expanded = self._emoji_words.get(ch)
            if expanded is not None:
                words += expanded
                in_word = False
            elif ch.isspace():
                in_word = False
            elif not in_word:
                words += 1
                in_word = True
            if words > self.max_words:
                return text[:i]
        return text

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        check_lengths(prompts, responses)
        return [float(self._analyzer.polarity_scores(self.bounded(r))["compound"]) for r in responses]


RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED)


class RemoteScorer(Scorer):
    """Another RewardService over gRPC: a deadline per attempt, bounded retries with backoff.

    Name and version are the remote's (learned from GetModelVersion and every response).
    """

    def __init__(self, target: str, *, timeout_s: float = 10.0, retries: int = 3, backoff_s: float = 0.1,
                 max_backoff_s: float = 2.0, api_key: str = "",
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        from flywheel.runtime.client import blocking_channel
        from flywheel.v1 import reward_pb2_grpc

        if not target:
            raise ValueError("remote scorer needs a target (host:port)")
        self.target = target
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        # Retries are ours (deadline per attempt), not the channel's.
        self._channel = blocking_channel(target, credentials, retries=False)
        self._stub = reward_pb2_grpc.RewardServiceStub(self._channel)
        self._lock = threading.Lock()
        self._name = "remote"
        self._version = ""

    def _call(self, method, request):
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=self.timeout_s, metadata=self._metadata)
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                if code not in RETRYABLE or attempt == self.retries:
                    raise
                log.warning("remote scorer %s: %s (attempt %d/%d), retrying in %.2fs", self.target,
                            code, attempt + 1, self.retries + 1, delay)
                time.sleep(delay)
                delay = min(delay * 2, self.max_backoff_s)
        raise AssertionError("unreachable")  # pragma: no cover

    def refresh_identity(self) -> None:
        """Ask the remote for its model version (otherwise learned from the first response)."""
        from flywheel.v1 import common_pb2

        mv = self._call(self._stub.GetModelVersion, common_pb2.GetModelVersionRequest())
        with self._lock:
            self._version = mv.version or self._version

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str:
        # Never blocks on the network: "unknown" until the remote answered once.
        return self._version or "unknown"

    def score_components(self, prompts: list[str], responses: list[str]) -> ScoreResult:
        from flywheel.v1 import reward_pb2

        check_lengths(prompts, responses)
        if not prompts:
            return ScoreResult([], [Component(self.name, self.version, [])])
        request = reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(id=str(i), prompt=p, response=r)
                                                 for i, (p, r) in enumerate(zip(prompts, responses))])
        response = self._call(self._stub.Score, request)
        if len(response.scores) != len(prompts):
            raise RuntimeError(f"remote scorer {self.target} returned {len(response.scores)} scores "
                               f"for {len(prompts)} items")
        with self._lock:
            self._name = f"remote:{response.scorer}" if response.scorer else "remote"
            self._version = response.scorer_version or self._version
        values = [float(s.score) for s in response.scores]
        return ScoreResult(values, [Component(self._name, self._version, values)])

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return self.score_components(prompts, responses).values

    def close(self) -> None:
        self._channel.close()


class EnsembleScorer(Scorer):
    """Weighted sum of member scorers; every member's values are kept as components."""

    def __init__(self, members: Sequence[tuple[Scorer, float]]) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = [(scorer, float(weight)) for scorer, weight in members]

    @property
    def name(self) -> str:
        return "ensemble"

    @property
    def version(self) -> str:
        return "+".join(f"{w:g}*{s.name}@{s.version}" for s, w in self.members)

    @property
    def checkpoint_uri(self) -> str:
        return ",".join(s.checkpoint_uri for s, _ in self.members if s.checkpoint_uri)

    def score_components(self, prompts: list[str], responses: list[str]) -> ScoreResult:
        check_lengths(prompts, responses)
        total = [0.0] * len(prompts)
        components: list[Component] = []
        for scorer, weight in self.members:
            result = scorer.score_components(prompts, responses)
            for i, v in enumerate(result.values):
                total[i] += weight * v
            components.extend(result.components)
        return ScoreResult(total, components)

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return self.score_components(prompts, responses).values

    def replace_reward_model(self, model: TransformerRewardScorer) -> "EnsembleScorer":
        """A new ensemble with every transformer member replaced by `model` (hot reload)."""
        return EnsembleScorer([(model if isinstance(s, TransformerRewardScorer) else s, w)
                               for s, w in self.members])

    def close(self) -> None:
        for scorer, _ in self.members:
            scorer.close()


def with_reward_model(scorer: Scorer, model: TransformerRewardScorer) -> Scorer | None:
    """The scorer to serve after a new reward model arrived, or None if `scorer` has no reward model."""
    if isinstance(scorer, TransformerRewardScorer):
        return model
    if isinstance(scorer, EnsembleScorer) and any(isinstance(s, TransformerRewardScorer) for s, _ in scorer.members):
        return scorer.replace_reward_model(model)
    return None
