"""Helpers for tests and demos of code that talks to reward models: tiny, randomly initialised
checkpoints in the real on-disk format (BERT classifier + the MiniLM tokenizer + flywheel.json).

They load in well under a second, so tests of batching, reload and the Kafka worker do not pay
for real weights; tests of model quality use the real MiniLM instead.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from flywheel.reward.scorers import Scorer


def tiny_reward_checkpoint(path: str | Path, *, version: str = "reward-0001", seed: int = 0,
                           hidden_size: int = 32, layers: int = 2) -> Path:
    """Write a tiny random BertForSequenceClassification (num_labels=1) checkpoint to `path`."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from flywheel.models import minilm_dir

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=hidden_size * 2, max_position_embeddings=512,
                        num_labels=1)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    with torch.no_grad():  # a visible spread of rewards rather than ~0 for everything
        model.classifier.weight.normal_(0.0, 1.0)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    (path / "flywheel.json").write_text(json.dumps({"kind": "reward", "version": version,
                                                    "model_name": "tiny-bert-reward"}))
    return path



class GatedScorer(Scorer):
    """Scores len(response), but each forward pass first waits for `gate`: tests use it to hold a
    batch in flight (queue overflow, deadlines, swaps) without depending on timing."""

    def __init__(self, version: str = "1") -> None:
        self.gate = threading.Event()
        self.entered: list[int] = []  # batch sizes of forward passes started (waiting or done)
        self.calls: list[int] = []
        self._version = version

    @property
    def name(self) -> str:
        return "gated"

    @property
    def version(self) -> str:
        return self._version

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        self.entered.append(len(prompts))
        self.gate.wait(30)
        self.calls.append(len(prompts))
        return [float(len(r)) for r in responses]
