"""Prompts for the loop, from the dialogues packaged in PyPI `chatterbot-corpus`.

Each conversation's opening line is a prompt. The split is a stable hash of the text, so the
held-out (eval) prompts never change between runs and are never trained on.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import yaml
from google.protobuf.timestamp_pb2 import Timestamp

from flywheel.v1 import common_pb2


@dataclass(frozen=True)
class CorpusPrompt:
    prompt_id: str
    text: str
    category: str
    split: str  # "train" or "eval"


def corpus_dir(language: str = "english") -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("chatterbot-corpus is not installed")
    return Path(spec.origin).parent / "data" / language


def _split(text: str, eval_fraction: float) -> str:
    bucket = int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "eval" if bucket < eval_fraction else "train"


def load_prompts(language: str = "english", eval_fraction: float = 0.15, min_chars: int = 8) -> list[CorpusPrompt]:
    """Distinct opening lines of every dialogue, sorted by id (deterministic)."""
    seen: dict[str, CorpusPrompt] = {}
    for path in sorted(corpus_dir(language).glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        category = path.stem
        for conversation in data.get("conversations") or []:
            if not conversation or not isinstance(conversation[0], str):
                continue
            text = " ".join(conversation[0].split())
            if len(text) < min_chars or text in seen:
                continue
            prompt_id = "cc-" + hashlib.sha1(text.encode()).hexdigest()[:12]
            seen[text] = CorpusPrompt(prompt_id, text, category, _split(text, eval_fraction))
    return sorted(seen.values(), key=lambda p: p.prompt_id)


def to_proto(prompt: CorpusPrompt, sampling: common_pb2.SamplingParams | None = None) -> common_pb2.Prompt:
    now = Timestamp()
    now.GetCurrentTime()
    message = common_pb2.Prompt(
        prompt_id=prompt.prompt_id,
        text=prompt.text,
        messages=[common_pb2.ChatMessage(role="user", content=prompt.text)],
        metadata={"source": "chatterbot-corpus", "category": prompt.category},
        created_at=now,
        split=prompt.split,
    )
    if sampling is not None:
        message.sampling.CopyFrom(sampling)
    return message
