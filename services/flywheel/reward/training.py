"""Reward-model training from pairwise preferences.

Input: the preference service's export of `PreferencePair` rows (JSONL or Parquet files, a
directory of them, or the aggregated-preferences topic): prompt_id, prompt_text, chosen_id,
chosen_text, rejected_id, rejected_text, margin.

Loss per pair (Bradley–Terry with an optional margin, as in Llama 2's reward model):
    -log σ(r_chosen − r_rejected − margin)
plus, optionally, reward centering `c · mean((r_chosen + r_rejected)²)` which keeps rewards
near zero (the scale PPO sees). The held-out split is by prompt id, so no prompt is in both.
The result is a versioned checkpoint directory (safetensors + tokenizer + flywheel.json) and,
optionally, a ModelVersion (kind REWARD) on flywheel.model-versions.v1.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from flywheel.v1 import common_pb2
from flywheel.versions import BASE_REWARD_VERSION, REWARD, version_name, version_order

log = logging.getLogger(__name__)

PAIR_FIELDS = ("prompt_id", "prompt_text", "chosen_id", "chosen_text", "rejected_id", "rejected_text", "margin")


@dataclass
class RewardTrainingConfig:
    """What to train on, from what, for how long, and where the checkpoint goes."""

    # A JSONL/Parquet file or a directory of them (the preference service's export).
    data: str | Path | None = None
    # Already loaded pairs (PreferencePair messages or dicts); used instead of `data` when given.
    pairs: Sequence[common_pb2.PreferencePair | dict] | None = None
    # Checkpoints are written to <output_dir>/<version>.
    output_dir: str | Path = field(default_factory=lambda: _default_output_dir())
    # Start from this checkpoint (a previous reward model); None: the MiniLM backbone, fresh head.
    base_model: str | Path | None = None
    parent_version: str = ""
    # None: next free reward-NNNN in output_dir.
    version: str | None = None
    epochs: int = 1
    # When set (> 0), the number of optimiser steps regardless of epochs.
    max_steps: int | None = None
    batch_size: int = 16
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    max_length: int = 128
    # Subtract the pair's margin inside the sigmoid (larger consensus gaps demand larger reward gaps).
    use_margin: bool = True
    margin_scale: float = 1.0
    # Coefficient of the reward-centering term (0 disables it; TRL suggests 0.01).
    center_rewards_coefficient: float = 0.0
    # After training, fold an affine map into the output layer so that rewards of the training
    # responses have mean 0 and std 1 (Ziegler et al. 2019, Stiennon et al. 2020). Pairwise order and
    # accuracy are unchanged; what changes is that every reward-model version speaks the same scale,
    # so the PPO trainer's KL coefficient keeps its meaning when a retrained model is swapped in.
    normalize_rewards: bool = True
    normalization_samples: int = 1024  # distinct (prompt, response) texts used for mean and std
    eval_fraction: float = 0.2
    # An explicit held-out set (pairs or a file); when given, no split of the training data is made.
    eval_pairs: Sequence[common_pb2.PreferencePair | dict] | None = None
    eval_data: str | Path | None = None
    seed: int = 0
    # Precision of the forward passes: float32 | bfloat16 | auto (`flywheel.precision`). Weights,
    # gradients and AdamW stay fp32; bf16 is autocast. Measured 2026-12-01 on 2 AMX cores, 1,001
    # pairs, 2 epochs: 164.5 s fp32 vs 130.3 s bf16, the same held-out accuracy (0.695) and loss.
    dtype: str = "float32"
    progress: bool = True
    # Publish the ModelVersion to the model-versions topic when bootstrap servers are given.
    publish: bool = False
    bootstrap_servers: str | None = None
    model_versions_topic: str | None = None
    # Kafka security (ServiceSettings.kafka_client_config()) for the publishing producer.
    kafka_config: dict[str, object] = field(default_factory=dict)


@dataclass
class RewardTrainingResult:
    model_version: common_pb2.ModelVersion
    metrics: dict[str, float]
    checkpoint_path: Path

    @property
    def version(self) -> str:
        return self.model_version.version


def _default_output_dir() -> Path:
    from flywheel.runtime.config import default_home

    return default_home() / "checkpoints" / "reward"


# -- data ---------------------------------------------------------------------------------------

def _row_to_pair(row: dict | common_pb2.PreferencePair, where: str) -> common_pb2.PreferencePair:
    if isinstance(row, common_pb2.PreferencePair):
        pair = row
    else:
        missing = [f for f in ("chosen_text", "rejected_text") if row.get(f) is None]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        pair = common_pb2.PreferencePair(
            prompt_id=str(row.get("prompt_id") or ""), prompt_text=str(row.get("prompt_text") or ""),
            chosen_id=str(row.get("chosen_id") or ""), chosen_text=str(row["chosen_text"]),
            rejected_id=str(row.get("rejected_id") or ""), rejected_text=str(row["rejected_text"]),
            margin=float(row.get("margin") or 0.0))
    if not pair.prompt_id:
        pair.prompt_id = hashlib.sha256(pair.prompt_text.encode()).hexdigest()[:16]
    if pair.margin < 0 or math.isnan(pair.margin):
        raise ValueError(f"{where}: margin must be >= 0, got {pair.margin}")
    return pair


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".json", ".parquet") and p.is_file())
        if not files:
            raise FileNotFoundError(f"no .jsonl or .parquet files under {path}")
        return files
    if not path.exists():
        raise FileNotFoundError(path)
    return [path]


def load_pairs(source: str | Path) -> list[common_pb2.PreferencePair]:
    """PreferencePair rows from JSONL or Parquet files (or a directory of them): a local path, a
    `file://` URI (what the preference service's export reports), or any fsspec URI (one file)."""
    from urllib.parse import unquote, urlparse

    text = str(source)
    parsed = urlparse(text)
    if parsed.scheme == "file":
        text = unquote(parsed.path)
    elif parsed.scheme and len(parsed.scheme) > 1:  # remote: read through fsspec (not a drive letter)
        return _load_remote(text)
    pairs: list[common_pb2.PreferencePair] = []
    for file in _files(Path(text)):
        with file.open("rb") as fh:
            pairs.extend(_parse(fh, file.suffix, str(file)))
    return pairs


def _parse(fh, suffix: str, where: str) -> list[common_pb2.PreferencePair]:
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return [_row_to_pair(row, f"{where}[{i}]") for i, row in enumerate(pq.read_table(fh).to_pylist())]
    pairs = []
    for i, line in enumerate(fh, 1):
        if line.strip():
            pairs.append(_row_to_pair(json.loads(line), f"{where}:{i}"))
    return pairs


def _load_remote(uri: str) -> list[common_pb2.PreferencePair]:
    import fsspec

    suffix = ".parquet" if uri.endswith(".parquet") else ".jsonl"
    with fsspec.open(uri, "rb") as fh:
        return _parse(fh, suffix, uri)


def load_pairs_from_topic(bootstrap_servers: str | Sequence[str], topic_name: str | None = None,
                          timeout_s: float = 10.0, **kafka_config: object) -> list[common_pb2.PreferencePair]:
    """Every pair of the aggregated-preferences topic, newest AggregatedPreference per prompt wins."""
    from flywheel.bus import topics
    from flywheel.bus.snapshot import read_topic

    latest: dict[str, common_pb2.AggregatedPreference] = {}
    for _, _, agg in read_topic(bootstrap_servers, topics.AGGREGATED_PREFERENCES, topic_name=topic_name,
                                timeout_s=timeout_s, **kafka_config):
        latest[agg.prompt_id] = agg  # type: ignore[attr-defined]
    name = topic_name or topics.AGGREGATED_PREFERENCES.name
    return [_row_to_pair(p, f"{name}:{a.prompt_id}") for a in latest.values() for p in a.pairs]


def split_by_prompt(pairs: Sequence[common_pb2.PreferencePair], eval_fraction: float,
                    seed: int = 0) -> tuple[list[common_pb2.PreferencePair], list[common_pb2.PreferencePair]]:
    """Deterministic train/eval split by a hash of (seed, prompt_id): no prompt is in both."""
    if not 0 <= eval_fraction < 1:
        raise ValueError("eval_fraction must be in [0, 1)")
    train, held_out = [], []
    for pair in pairs:
        h = int(hashlib.sha256(f"{seed}:{pair.prompt_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (held_out if h < eval_fraction else train).append(pair)
    if eval_fraction > 0 and not held_out and len(train) > 1:
        held_out.append(train.pop())
    return train, held_out


# -- versions -----------------------------------------------------------------------------------

def next_version(output_dir: Path) -> str:
    numbers = [version_order(p.name) for p in output_dir.glob(f"{REWARD}-*") if p.is_dir()]
    return version_name(REWARD, max(numbers, default=0) + 1)


# -- training -----------------------------------------------------------------------------------

def evaluate(scorer, pairs: Sequence[common_pb2.PreferencePair], *, batch_size: int = 32,
             use_margin: bool = True, margin_scale: float = 1.0) -> dict[str, float]:
    """Pairwise accuracy (r_chosen > r_rejected), mean loss and mean reward gap on `pairs`."""
    import torch
    import torch.nn.functional as F

    if not pairs:
        return {}
    correct = 0.0
    loss_sum = 0.0
    gap_sum = 0.0
    chosen_sum = 0.0
    was_training = scorer.model.training
    scorer.model.eval()
    with torch.inference_mode():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            r_c, r_r = _rewards(scorer, chunk)
            margin = torch.tensor([p.margin * margin_scale if use_margin else 0.0 for p in chunk])
            gap = r_c - r_r
            correct += float((gap > 0).sum()) + 0.5 * float((gap == 0).sum())
            loss_sum += float(-F.logsigmoid(gap - margin).sum())
            gap_sum += float(gap.sum())
            chosen_sum += float(r_c.sum())
    scorer.model.train(was_training)
    n = len(pairs)
    return {"accuracy": correct / n, "loss": loss_sum / n, "reward_gap": gap_sum / n, "reward_chosen": chosen_sum / n}


def _rewards(scorer, pairs: Sequence[common_pb2.PreferencePair]):
    """Chosen and rejected rewards of a batch in one forward pass, in the scorer's precision (bf16 is
    autocast over fp32 weights, so the same call trains and evaluates)."""
    from flywheel.precision import autocast

    prompts = [p.prompt_text for p in pairs]
    with autocast(scorer.dtype):
        rewards = scorer.forward(prompts + prompts, [p.chosen_text for p in pairs] + [p.rejected_text for p in pairs])
    return rewards[: len(pairs)].float(), rewards[len(pairs):].float()


def _output_layer(model):
    """The final single-output Linear layer of a sequence-classification model (BERT-like
    `classifier`, decoder-style `score`, RoBERTa-style `classifier.out_proj`), or None."""
    import torch

    for name in ("classifier", "score"):
        layer = getattr(model, name, None)
        layer = getattr(layer, "out_proj", layer)
        if isinstance(layer, torch.nn.Linear) and layer.out_features == 1:
            return layer
    return None


def normalize_output(scorer, pairs: Sequence[common_pb2.PreferencePair], max_samples: int,
                     seed: int = 0) -> dict[str, float]:
    """Rescale the output layer so rewards of the pairs' distinct responses have mean 0, std 1.

    Returns the statistics before the change (reward_norm_mean, reward_norm_std), or {} when the
    model has no recognisable output layer (then it is left as it is)."""
    import torch

    layer = _output_layer(scorer.model)
    if layer is None:
        log.warning("reward model has no single-output classifier layer; rewards left unnormalised")
        return {}
    texts = sorted({(p.prompt_text, t) for p in pairs for t in (p.chosen_text, p.rejected_text)})
    random.Random(seed).shuffle(texts)
    texts = texts[:max_samples]
    if len(texts) < 2:
        return {}
    rewards = torch.tensor(scorer.score([p for p, _ in texts], [r for _, r in texts]))
    mean, std = float(rewards.mean()), float(rewards.std())
    std = max(std, 1e-6)
    with torch.no_grad():  # r' = (r - mean) / std, folded into the weights: no scorer change needed
        layer.weight.div_(std)
        if layer.bias is not None:  # without one, only the scale is fixed (the checkpoint keeps its keys)
            layer.bias.sub_(mean).div_(std)
    return {"reward_norm_mean": mean, "reward_norm_std": std, "reward_norm_samples": float(len(texts))}


def train_reward_model(config: RewardTrainingConfig) -> RewardTrainingResult:
    """Train, evaluate on the held-out split, write a versioned checkpoint, optionally publish it.

    Reproducible for a given `config.seed`, without touching process-wide state: the head init and
    dropout draw from a forked copy of torch's global generator, seeded here and restored after. The
    thread count is the process's (`flywheel reward train` sets it at start-up).
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return _train_reward_model(config)


def _train_reward_model(config: RewardTrainingConfig) -> RewardTrainingResult:
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from flywheel.reward.scorers import METADATA_FILE, TransformerRewardScorer

    if config.pairs is not None:
        pairs = [_row_to_pair(p, f"pairs[{i}]") for i, p in enumerate(config.pairs)]
    elif config.data is not None:
        pairs = load_pairs(config.data)
    else:
        raise ValueError("RewardTrainingConfig needs `data` (a JSONL/Parquet export) or `pairs`")
    if not pairs:
        raise ValueError("no preference pairs to train on")
    if config.eval_pairs is not None:
        train, held_out = pairs, [_row_to_pair(p, f"eval_pairs[{i}]") for i, p in enumerate(config.eval_pairs)]
    elif config.eval_data is not None:
        train, held_out = pairs, load_pairs(config.eval_data)
    else:
        train, held_out = split_by_prompt(pairs, config.eval_fraction, config.seed)
    if not train:
        raise ValueError("the training split is empty (too few prompts for eval_fraction)")

    # Training, evaluation (`_rewards`) and normalisation (`score`) all run in the scorer's precision.
    scorer = TransformerRewardScorer(config.base_model, max_length=config.max_length, dtype=config.dtype)
    parent = config.parent_version or scorer.version or BASE_REWARD_VERSION
    model = scorer.model

    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None and config.max_steps > 0:
        total_steps = config.max_steps  # as in transformers' Trainer: max_steps overrides epochs
    decay = [p for n, p in model.named_parameters() if not any(k in n for k in ("bias", "LayerNorm", "layer_norm"))]
    no_decay = [p for n, p in model.named_parameters() if any(k in n for k in ("bias", "LayerNorm", "layer_norm"))]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.learning_rate)
    schedule = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps), total_steps)

    initial = evaluate(scorer, held_out, use_margin=config.use_margin, margin_scale=config.margin_scale)
    rng = random.Random(config.seed)
    model.train()
    step = 0
    running = 0.0
    start = time.monotonic()
    bar = tqdm(total=total_steps, desc="reward-model", unit="step", disable=not config.progress)
    try:
        while step < total_steps:
            order = list(range(len(train)))
            rng.shuffle(order)
            for b in range(0, len(order), config.batch_size):
                if step >= total_steps:
                    break
                batch = [train[i] for i in order[b:b + config.batch_size]]
                r_c, r_r = _rewards(scorer, batch)
                margin = torch.tensor([p.margin * config.margin_scale if config.use_margin else 0.0 for p in batch])
                loss = -F.logsigmoid(r_c - r_r - margin).mean()
                if config.center_rewards_coefficient > 0:
                    loss = loss + config.center_rewards_coefficient * ((r_c + r_r) ** 2).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                schedule.step()
                step += 1
                loss_value = float(loss.detach())
                running = 0.9 * running + 0.1 * loss_value if step > 1 else loss_value
                bar.update(1)
                bar.set_postfix(loss=f"{running:.4f}")
    finally:
        bar.close()
    train_seconds = time.monotonic() - start
    model.eval()
    normalization = normalize_output(scorer, train, config.normalization_samples, config.seed) \
        if config.normalize_rewards else {}
    final = evaluate(scorer, held_out, use_margin=config.use_margin, margin_scale=config.margin_scale)

    metrics: dict[str, float] = {
        "train_pairs": float(len(train)), "eval_pairs": float(len(held_out)), "steps": float(step),
        "train_loss": running, "train_seconds": train_seconds, "train_threads": float(torch.get_num_threads()),
        "train_bf16": float(scorer.dtype == "bfloat16"),
    }
    metrics.update({f"eval_{k}": v for k, v in final.items()})
    metrics.update(normalization)
    metrics.update({f"initial_eval_{k}": v for k, v in initial.items()})

    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    version = config.version or next_version(output_dir)
    target = output_dir / version
    if target.exists():
        raise FileExistsError(f"checkpoint {target} already exists; versions are immutable")
    tmp = output_dir / f".{version}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    scorer.tokenizer.save_pretrained(tmp)

    created = common_pb2.ModelVersion().created_at
    created.GetCurrentTime()
    model_name = f"{getattr(model.config, 'model_type', 'model')}-reward"
    mv = common_pb2.ModelVersion(kind=common_pb2.MODEL_KIND_REWARD, version=version,
                                 checkpoint_uri=target.resolve().as_uri(), metrics=metrics,
                                 parent_version=parent, model_name=model_name, step=step)
    mv.created_at.CopyFrom(created)
    data_hash = hashlib.sha256()
    for p in pairs:
        data_hash.update(p.SerializeToString(deterministic=True))
    config_dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()
                   if k not in ("pairs", "eval_pairs", "kafka_config")}  # kafka_config holds credentials
    (tmp / METADATA_FILE).write_text(json.dumps({
        "kind": "reward", "version": version, "parent_version": parent, "model_name": model_name,
        "base_model": str(config.base_model or scorer.path), "step": step, "created_at": created.ToJsonString(),
        "metrics": metrics, "data_sha256": data_hash.hexdigest(), "max_length": config.max_length,
        "config": config_dict,
    }, indent=2, default=str))
    tmp.rename(target)  # atomic: a reader sees a complete checkpoint or none
    log.info("reward model %s: held-out accuracy %.3f (%d pairs), checkpoint %s", version,
             final.get("accuracy", float("nan")), len(held_out), target)

    if config.publish:
        publish_model_version(mv, config.bootstrap_servers, config.model_versions_topic, **config.kafka_config)
    return RewardTrainingResult(model_version=mv, metrics=metrics, checkpoint_path=target)


def publish_model_version(mv: common_pb2.ModelVersion, bootstrap_servers: str | None,
                          topic_name: str | None = None, **kafka_config: object) -> None:
    """Produce `mv` to flywheel.model-versions.v1 (key = kind name) and wait for the ack."""
    from flywheel.bus import TypedProducer, topics
    from flywheel.bus.topics import Topic

    if not bootstrap_servers:
        raise ValueError("publishing needs bootstrap_servers")
    topic = Topic(topic_name, common_pb2.ModelVersion) if topic_name else topics.MODEL_VERSIONS
    producer = TypedProducer(bootstrap_servers, client_id="flywheel-reward-trainer", **kafka_config)
    try:
        # Key: the kind without its enum prefix ("REWARD"), as the trainer keys "POLICY".
        producer.send_and_wait(topic, mv, key=common_pb2.ModelKind.Name(mv.kind).removeprefix("MODEL_KIND_"))
    finally:
        producer.close()


def write_pairs_jsonl(pairs: Iterable[common_pb2.PreferencePair | dict], path: str | Path) -> Path:
    """Write pairs in the export format (one JSON object per line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for p in pairs:
            row = {f: getattr(p, f) for f in PAIR_FIELDS} if isinstance(p, common_pb2.PreferencePair) else p
            fh.write(json.dumps(row) + "\n")
    return path
