"""Supervised fine-tuning on demonstrations (the optional first stage before PPO).

Demonstrations come from the preference service (`Demonstration` events on
flywheel.preferences.v1, or a JSONL file of {prompt_text, response_text}). Each example is the
prompt rendered with the tokenizer's chat template (as the policy service renders prompts) plus
the response and EOS; the loss is next-token cross-entropy on the response tokens only. The
result is written in the same checkpoint format as PPO versions (next `policy-NNNN`) and marks
itself as the frozen reference for the PPO that follows (standard RLHF: reference = SFT model).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F

from flywheel.v1 import common_pb2
from flywheel.versions import BASE_POLICY_VERSION, next_version

log = logging.getLogger(__name__)


@dataclass
class SFTConfig:
    learning_rate: float = 2e-5
    epochs: int = 1
    batch_size: int = 8
    max_length: int = 512
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    progress: bool = True


def render_prompt(tokenizer: Any, prompt_text: str) -> str:
    """The prompt as the policy sees it: the chat template with a generation prompt, when there is one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt_text}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt_text


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # -100 on prompt tokens


def build_examples(demos: Iterable[common_pb2.Demonstration], tokenizer: Any, max_length: int) -> list[Example]:
    examples = []
    eos = tokenizer.eos_token_id
    for demo in demos:
        prompt_ids = tokenizer(render_prompt(tokenizer, demo.prompt_text), add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(demo.response_text, add_special_tokens=False)["input_ids"]
        if eos is not None:
            response_ids = response_ids + [eos]
        if not response_ids:
            continue
        ids = (prompt_ids + response_ids)[:max_length]
        labels = ([-100] * len(prompt_ids) + response_ids)[:max_length]
        if all(label == -100 for label in labels):
            continue  # the prompt alone fills max_length
        examples.append(Example(ids, labels))
    return examples


class SFTTrainer:
    def __init__(self, config: SFTConfig, model: torch.nn.Module, tokenizer: Any) -> None:
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate,
                                           weight_decay=config.weight_decay)

    def _collate(self, batch: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        width = max(len(e.input_ids) for e in batch)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, e in enumerate(batch):
            ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
            labels[i, : len(e.labels)] = torch.tensor(e.labels)
            mask[i, : len(e.input_ids)] = 1
        return ids, mask, labels

    def loss(self, batch: Sequence[Example]) -> tuple[torch.Tensor, int]:
        ids, mask, labels = self._collate(batch)
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        target = labels[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
        return loss, int((target != -100).sum())

    @torch.no_grad()
    def evaluate(self, examples: Sequence[Example]) -> float:
        """Mean response-token negative log-likelihood."""
        self.model.eval()
        total, tokens = 0.0, 0
        for b in range(0, len(examples), self.config.batch_size):
            loss, n = self.loss(examples[b:b + self.config.batch_size])
            total += float(loss) * n
            tokens += n
        return total / max(tokens, 1)

    def train(self, examples: Sequence[Example]) -> dict[str, float]:
        from tqdm.auto import tqdm

        cfg = self.config
        if not examples:
            raise ValueError("no demonstrations to train on")
        rng = random.Random(cfg.seed)
        initial = self.evaluate(examples)
        steps = cfg.epochs * math.ceil(len(examples) / cfg.batch_size)
        bar = tqdm(total=steps, desc="sft", unit="step", disable=not cfg.progress)
        start = time.perf_counter()
        running = float("nan")
        self.model.train()
        try:
            for _epoch in range(cfg.epochs):
                order = list(range(len(examples)))
                rng.shuffle(order)
                for b in range(0, len(order), cfg.batch_size):
                    loss, _ = self.loss([examples[i] for i in order[b:b + cfg.batch_size]])
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                    self.optimizer.step()
                    value = float(loss.detach())
                    running = value if math.isnan(running) else 0.9 * running + 0.1 * value
                    bar.update(1)
                    bar.set_postfix(loss=f"{running:.4f}")
        finally:
            bar.close()
            self.model.eval()
        final = self.evaluate(examples)
        return {"sft_examples": float(len(examples)), "sft_steps": float(steps), "sft_initial_nll": initial,
                "sft_final_nll": final, "sft_train_loss": running, "sft_seconds": time.perf_counter() - start}


def load_demonstrations_file(path: str | Path) -> list[common_pb2.Demonstration]:
    """JSONL rows with prompt_text and response_text (other Demonstration fields optional)."""
    demos = []
    with open(path) as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "prompt_text" not in row or "response_text" not in row:
                raise ValueError(f"{path}:{i}: needs prompt_text and response_text")
            demos.append(common_pb2.Demonstration(
                event_id=str(row.get("event_id") or f"{Path(path).name}:{i}"), prompt_id=str(row.get("prompt_id", "")),
                prompt_text=row["prompt_text"], response_text=row["response_text"], rater_id=str(row.get("rater_id", ""))))
    return demos


def load_demonstrations_from_topic(bootstrap_servers: str | Sequence[str], topic_name: str | None = None,
                                   timeout_s: float = 30.0, **kafka_config: object) -> list[common_pb2.Demonstration]:
    """Every Demonstration on the preferences topic (read from the beginning to the current end)."""
    from flywheel.bus import topics
    from flywheel.bus.snapshot import read_topic

    demos: dict[str, common_pb2.Demonstration] = {}
    for partition, offset, event in read_topic(bootstrap_servers, topics.PREFERENCES, topic_name=topic_name,
                                               timeout_s=timeout_s, **kafka_config):
        if event.WhichOneof("event") == "demonstration":  # type: ignore[attr-defined]
            demo = event.demonstration  # type: ignore[attr-defined]
            demos[demo.event_id or f"{partition}:{offset}"] = demo
    return list(demos.values())


def run_sft(demos: Sequence[common_pb2.Demonstration], *, store: Any, base_model_path: str | Path,
            config: SFTConfig | None = None) -> common_pb2.ModelVersion:
    """SFT the newest policy (or the base model) on `demos`; write the next policy version."""
    from google.protobuf import timestamp_pb2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = config or SFTConfig()
    torch.manual_seed(config.seed)
    latest = store.latest()
    source = store.local_dir(latest.version) if latest else Path(base_model_path)
    parent = latest.version if latest else BASE_POLICY_VERSION
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    examples = build_examples(demos, tokenizer, config.max_length)
    stats = SFTTrainer(config, model, tokenizer).train(examples)
    version = next_version(parent)
    step = latest.step if latest else 0
    uri = store.uri_for(version)
    store.save(version, model=model, tokenizer=tokenizer, value_head=None, optimizer_state=None,
               trainer_state={"reference_model": uri, "stage": "sft"},
               metadata={"parent_version": parent, "step": step, "metrics": stats, "stage": "sft",
                         "sft_config": asdict(config), "base_model": str(base_model_path),
                         "demonstration_ids": [d.event_id for d in demos]})
    created = timestamp_pb2.Timestamp()
    created.GetCurrentTime()
    log.info("SFT %s -> %s: NLL %.3f -> %.3f on %d examples", parent, version, stats["sft_initial_nll"],
             stats["sft_final_nll"], len(examples))
    return common_pb2.ModelVersion(kind=common_pb2.MODEL_KIND_POLICY, version=version, checkpoint_uri=uri,
                                   metrics=stats, parent_version=parent, created_at=created,
                                   model_name=Path(str(base_model_path)).name, step=step)
