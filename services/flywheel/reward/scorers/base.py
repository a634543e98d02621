"""The scorer interface: what the reward service serves and what a plugin implements.

A scorer maps a batch of (prompt, response) texts to one float each. Callers always send text:
every scorer keeps its own tokenizer, so the policy's token ids never leak into reward models.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

@dataclass(frozen=True)
class Component:
    """One scorer's values for a batch (an ensemble has several)."""

    scorer: str
    version: str
    values: list[float]


@dataclass(frozen=True)
class ScoreResult:
    values: list[float]
    components: list[Component]


class Scorer(ABC):
    """Scores (prompt, response) pairs. Implementations must be safe to call from one thread at a time
    (the batcher serialises calls) and must return one float per pair, in order."""

    @property
    @abstractmethod
    def name(self) -> str: ...

    @property
    @abstractmethod
    def version(self) -> str: ...

    @abstractmethod
    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """Batched scoring; `len(prompts) == len(responses)`."""

    def score_components(self, prompts: list[str], responses: list[str]) -> ScoreResult:
        """Scores plus each component's values (a single scorer is its own only component)."""
        values = self.score(prompts, responses)
        return ScoreResult(values, [Component(self.name, self.version, values)])

    @property
    def checkpoint_uri(self) -> str:
        return ""

    @property
    def model_name(self) -> str:
        return self.name

    def close(self) -> None:
        """Release resources (channels, models)."""



def check_lengths(prompts: Sequence[str], responses: Sequence[str]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
