"""The sequence-classification reward model and its checkpoints.

`TransformerRewardScorer`: `AutoModelForSequenceClassification` with one label, loaded from a
local directory or checkpoint URI (default: the packaged MiniLM with a fresh head, "reward-0000").
Scoring runs in the precision `dtype` names (float32 | bfloat16 | auto, `flywheel.precision`): the
weights stay fp32 and bf16 is `torch.autocast` (bf16 matmuls, fp32 softmax/layer norm), which on
MiniLM is both faster and closer to fp32 than bf16 weights (docs/policy.md, Precision).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from flywheel import checkpoints
from flywheel.precision import autocast, resolve_dtype
from flywheel.reward.scorers.base import Scorer, check_lengths
from flywheel.reward.scorers.chunking import plan_chunks
from flywheel.runtime.process import machine_threads
from flywheel.versions import BASE_REWARD_VERSION

METADATA_FILE = "flywheel.json"

# -- checkpoints --------------------------------------------------------------------------------

def read_checkpoint_metadata(path: Path) -> dict:
    meta_file = path / METADATA_FILE
    if meta_file.exists():
        return json.loads(meta_file.read_text())
    return {}


def default_torch_threads() -> int:
    # The CPUs this process may really use (affinity, container quota), at most 4: MiniLM's
    # forward passes stop scaling beyond that.
    return min(machine_threads(), 4)


# -- implementations ----------------------------------------------------------------------------

class TransformerRewardScorer(Scorer):
    """A sequence-classification reward model with one output (the reward).

    The pair is encoded as the tokenizer's text pair (prompt, response), truncated longest-first to
    `max_length`, padded to the longest pair of each forward pass. Forward passes run under
    `torch.inference_mode`. A call is tokenized once, sorted by token length and split into
    length-homogeneous chunks (`plan_chunks`): padding a short pair to a long one costs real
    compute on a CPU, and so does every extra forward pass; the split minimises the sum.
    """

    def __init__(self, model_path: str | os.PathLike[str] | None = None, *, max_length: int = 256,
                 max_batch_size: int = 64, version: str | None = None,
                 cache_dir: Path | None = None, forward_overhead_tokens: int = 32, dtype: str = "float32") -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from flywheel.models import minilm_dir

        self._uri = str(model_path) if model_path is not None else ""
        from flywheel.runtime.config import default_home

        path = (checkpoints.resolve(model_path, cache_dir or default_home() / "reward-models")
                if model_path is not None else minilm_dir())
        meta = read_checkpoint_metadata(path)
        self._version = version or meta.get("version") or BASE_REWARD_VERSION
        self._model_name = meta.get("model_name") or path.name
        self.path = path
        self.max_length = max_length
        self.max_batch_size = max_batch_size
        self.forward_overhead_tokens = forward_overhead_tokens
        self.dtype = resolve_dtype(dtype)  # what `score` computes in; `forward` (training) stays fp32
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        # A backbone without a classification head gets a fresh one (num_labels=1: regression head).
        self.model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        self.model.eval()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self._torch = torch

    @property
    def name(self) -> str:
        return "transformer"

    @property
    def version(self) -> str:
        return self._version

    @property
    def checkpoint_uri(self) -> str:
        return self._uri or self.path.as_uri()

    @property
    def model_name(self) -> str:
        return self._model_name

    def encode(self, prompts: Sequence[str], responses: Sequence[str]):
        return self.tokenizer(list(prompts), list(responses), padding="longest", truncation="longest_first",
                              max_length=self.max_length, return_tensors="pt")

    def forward(self, prompts: Sequence[str], responses: Sequence[str]):
        """Rewards as a float tensor with gradients as the caller's grad mode says (used by training)."""
        enc = self.encode(prompts, responses)
        return self.model(**enc).logits[:, 0]

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        check_lengths(prompts, responses)
        n = len(prompts)
        if n == 0:
            return []
        # Tokenize once without padding; each chunk is padded to its own longest pair below.
        enc = self.tokenizer(list(prompts), list(responses), truncation="longest_first", max_length=self.max_length)
        lengths = [len(ids) for ids in enc["input_ids"]]
        order = sorted(range(n), key=lambda i: lengths[i])
        out = [0.0] * n
        with self._torch.inference_mode(), autocast(self.dtype):
            for start, end in plan_chunks([lengths[i] for i in order], self.max_batch_size,
                                          self.forward_overhead_tokens):
                idx = order[start:end]
                values = self.model(**self._pad(enc, idx)).logits[:, 0].float().tolist()
                for i, v in zip(idx, values):
                    out[i] = float(v)
        return out

    def _pad(self, enc, idx: Sequence[int]) -> dict:
        """Right-padded tensors of the encoded pairs `idx` (attention mask 0 on padding)."""
        torch = self._torch
        width = max(len(enc["input_ids"][i]) for i in idx)
        features = {}
        for key in enc.keys():
            fill = self.tokenizer.pad_token_id if key == "input_ids" else 0
            features[key] = torch.tensor([enc[key][i] + [fill] * (width - len(enc[key][i])) for i in idx])
        return features
