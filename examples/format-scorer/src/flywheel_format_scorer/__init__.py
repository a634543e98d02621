"""A rule-based format/length scorer, packaged as a Flywheel scorer plugin.

Score of a response, in [0, 1]: the mean of the checks that apply -
  * length: 1 inside [min_words, max_words], decaying linearly to 0 at twice the distance;
  * ending: 1 when the response ends a sentence (. ! ? or a closing quote/bracket after one);
  * pattern: 1 when `required_regex` (if set) matches the response.
"""

from __future__ import annotations

import re

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings

from flywheel.reward.scorers import Scorer, check_lengths

__version__ = "0.1.0"

_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s*$")


class FormatScorerSettings(BaseSettings):
    """Read from FLYWHEEL_REWARD_PLUGIN_<FIELD> (Flywheel sets the prefix) or the plugin config file."""

    min_words: int = Field(5, ge=0, description="Shortest response that gets the full length score.")
    max_words: int = Field(60, ge=1, description="Longest response that gets the full length score.")
    required_regex: str = Field("", description="If set, responses must match it (re.search).")
    require_sentence_end: bool = Field(True, description="Check that the response ends a sentence.")

    @model_validator(mode="after")
    def _range(self) -> "FormatScorerSettings":
        if self.min_words > self.max_words:
            raise ValueError("min_words must not exceed max_words")
        return self


class FormatScorer(Scorer):
    settings_class = FormatScorerSettings

    def __init__(self, settings: FormatScorerSettings | None = None) -> None:
        self.settings = settings or FormatScorerSettings()
        self._pattern = re.compile(self.settings.required_regex) if self.settings.required_regex else None

    @property
    def name(self) -> str:
        return "format"

    @property
    def version(self) -> str:
        s = self.settings
        return f"{__version__}:{s.min_words}-{s.max_words}"

    def _length(self, words: int) -> float:
        lo, hi = self.settings.min_words, self.settings.max_words
        if lo <= words <= hi:
            return 1.0
        distance, scale = (lo - words, max(lo, 1)) if words < lo else (words - hi, hi)
        return max(0.0, 1.0 - distance / scale)

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        check_lengths(prompts, responses)
        out = []
        for response in responses:
            checks = [self._length(len(response.split()))]
            if self.settings.require_sentence_end:
                checks.append(1.0 if _SENTENCE_END.search(response) else 0.0)
            if self._pattern is not None:
                checks.append(1.0 if self._pattern.search(response) else 0.0)
            out.append(sum(checks) / len(checks))
        return out
