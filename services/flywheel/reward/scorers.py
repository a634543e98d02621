"""Scorers: the plug-in interface of the reward service and its implementations.

A scorer maps a batch of (prompt, response) texts to one float each. Callers always send text:
every scorer keeps its own tokenizer, so the policy's token ids never leak into reward models.

- `TransformerRewardScorer`: `AutoModelForSequenceClassification` with one label, loaded from a
  local directory or checkpoint URI (default: the packaged MiniLM with a fresh head, "reward-0000").
- `VaderScorer`: VADER compound sentiment of the response; deterministic, no weights.
- `RemoteScorer`: another RewardService over gRPC, with a deadline and retries.
- `EnsembleScorer`: a weighted sum of scorers; reports every member's score as a component.

`build_scorer(settings)` picks one from `RewardSettings`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Sequence
from urllib.parse import urlparse

import grpc

if TYPE_CHECKING:  # pragma: no cover
    from flywheel.reward.settings import RewardSettings

log = logging.getLogger(__name__)

BASE_VERSION = "reward-0000"
METADATA_FILE = "flywheel.json"


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


def _check_lengths(prompts: Sequence[str], responses: Sequence[str]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")


# -- checkpoints --------------------------------------------------------------------------------

def resolve_checkpoint(uri: str | os.PathLike[str], cache_dir: Path | None = None) -> Path:
    """A local directory for a checkpoint path or URI. Remote fsspec URIs are copied once into
    `cache_dir` (keyed by the URI) and reused."""
    text = str(uri)
    parsed = urlparse(text)
    if parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme == "file" else text).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint directory {path} does not exist")
        return path
    import hashlib

    import fsspec

    from flywheel.runtime.config import default_home

    cache_dir = Path(cache_dir or default_home() / "reward-models")
    target = cache_dir / hashlib.sha256(text.encode()).hexdigest()[:16]
    if (target / METADATA_FILE).exists() or (target / "config.json").exists():
        return target
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    fs, _, paths = fsspec.get_fs_token_paths(text)
    fs.get(paths[0].rstrip("/") + "/", str(tmp), recursive=True)
    tmp.rename(target)
    return target


def read_checkpoint_metadata(path: Path) -> dict:
    meta_file = path / METADATA_FILE
    if meta_file.exists():
        return json.loads(meta_file.read_text())
    return {}


def default_torch_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 4))


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
                 max_batch_size: int = 64, torch_threads: int | None = None, version: str | None = None,
                 cache_dir: Path | None = None, forward_overhead_tokens: int = 32) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from flywheel.models import minilm_dir

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self._uri = str(model_path) if model_path is not None else ""
        path = resolve_checkpoint(model_path, cache_dir) if model_path is not None else minilm_dir()
        meta = read_checkpoint_metadata(path)
        self._version = version or meta.get("version") or BASE_VERSION
        self._model_name = meta.get("model_name") or path.name
        self.path = path
        self.max_length = max_length
        self.max_batch_size = max_batch_size
        self.forward_overhead_tokens = forward_overhead_tokens
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
        _check_lengths(prompts, responses)
        n = len(prompts)
        if n == 0:
            return []
        # Tokenize once without padding; each chunk is padded to its own longest pair below.
        enc = self.tokenizer(list(prompts), list(responses), truncation="longest_first", max_length=self.max_length)
        lengths = [len(ids) for ids in enc["input_ids"]]
        order = sorted(range(n), key=lambda i: lengths[i])
        out = [0.0] * n
        with self._torch.inference_mode():
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


def plan_chunks(sorted_lengths: Sequence[int], max_batch_size: int, overhead_tokens: int) -> list[tuple[int, int]]:
    """Split items sorted by token length into chunks [start, end) of at most `max_batch_size`.

    Cost model of one forward pass: `overhead_tokens + items * longest` token positions (the fixed
    per-pass cost - kernel launches, Python, small matmuls - expressed in tokens, plus the padded
    batch). Exact minimum-cost split by dynamic programming over the sorted order (n <= a few
    hundred, n * max_batch_size steps). Equal lengths give one chunk per `max_batch_size` items;
    one very long pair among short ones gets a pass of its own instead of padding everyone.
    """
    n = len(sorted_lengths)
    best = [0.0] + [float("inf")] * n  # best[j]: cheapest plan for the first j items
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        longest = sorted_lengths[end - 1]  # sorted ascending: the chunk's last item is its longest
        for start in range(max(0, end - max_batch_size), end):
            cost = best[start] + overhead_tokens + (end - start) * longest
            if cost < best[end]:
                best[end], cut[end] = cost, start
    chunks = []
    end = n
    while end > 0:
        chunks.append((cut[end], end))
        end = cut[end]
    return chunks[::-1]


class VaderScorer(Scorer):
    """VADER compound sentiment of the response, in [-1, 1]; the prompt is ignored."""

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()
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

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        _check_lengths(prompts, responses)
        return [float(self._analyzer.polarity_scores(r)["compound"]) for r in responses]


RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED)


class RemoteScorer(Scorer):
    """Another RewardService over gRPC: a deadline per attempt, bounded retries with backoff.

    Name and version are the remote's (learned from GetModelVersion and every response).
    """

    def __init__(self, target: str, *, timeout_s: float = 10.0, retries: int = 3, backoff_s: float = 0.1,
                 max_backoff_s: float = 2.0, credentials: grpc.ChannelCredentials | None = None) -> None:
        from flywheel.runtime.client import blocking_channel
        from flywheel.v1 import reward_pb2_grpc

        if not target:
            raise ValueError("remote scorer needs a target (host:port)")
        self.target = target
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
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
                return method(request, timeout=self.timeout_s)
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

        _check_lengths(prompts, responses)
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
        _check_lengths(prompts, responses)
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


# -- selection by settings ----------------------------------------------------------------------

def parse_ensemble(spec: str) -> list[tuple[str, float]]:
    """'transformer=0.8,vader=0.2' -> [('transformer', 0.8), ('vader', 0.2)]."""
    members = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        kind, _, weight = part.partition("=")
        kind = kind.strip()
        if kind not in ("transformer", "vader", "remote"):
            raise ValueError(f"unknown ensemble member {kind!r} (transformer, vader, remote)")
        members.append((kind, float(weight) if weight.strip() else 1.0))
    if not members:
        raise ValueError("reward_ensemble is empty")
    return members


def transformer_from_settings(settings: "RewardSettings", model_uri: str | None = None) -> TransformerRewardScorer:
    uri = model_uri if model_uri is not None else settings.reward_model_uri
    cache = Path(settings.reward_model_cache_dir) if settings.reward_model_cache_dir else settings.home / "reward-models"
    return TransformerRewardScorer(uri, max_length=settings.reward_max_length,
                                   max_batch_size=settings.reward_max_batch_size,
                                   forward_overhead_tokens=settings.reward_forward_overhead_tokens,
                                   torch_threads=settings.reward_torch_threads or default_torch_threads(),
                                   cache_dir=cache)


def _single(kind: str, settings: "RewardSettings") -> Scorer:
    if kind == "transformer":
        return transformer_from_settings(settings)
    if kind == "vader":
        return VaderScorer()
    if kind == "remote":
        from flywheel.runtime.tls import TlsFiles

        return RemoteScorer(settings.reward_remote_target, timeout_s=settings.reward_remote_timeout_s,
                            retries=settings.reward_remote_retries,
                            credentials=TlsFiles.from_settings(settings).grpc_channel_credentials())
    raise ValueError(f"unknown scorer {kind!r} (transformer, vader, remote, ensemble)")


def build_scorer(settings: "RewardSettings") -> Scorer:
    kind = settings.reward_scorer.strip().lower()
    if kind == "ensemble":
        return EnsembleScorer([(_single(k, settings), w) for k, w in parse_ensemble(settings.reward_ensemble)])
    return _single(kind, settings)
