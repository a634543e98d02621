"""Loading a policy checkpoint: model, tokenizer, chat template, validation and numeric precision.

`resolve_dtype("auto")` (flywheel.precision, shared with the reward scorer and the trainer) picks
bfloat16 where the hardware computes it natively and float32 otherwise.
The dtype that loads the weights is the dtype that samples, so the behaviour logprobs a rollout
carries are that precision's (reported as `LoadedPolicy.dtype_name`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from flywheel.policy.kv_cache import supports_fast_decode
from flywheel.precision import DTYPES, cpu_has_bf16, resolve_dtype  # noqa: F401 - one detection, re-exported
from flywheel.versions import BASE_POLICY_VERSION as BASE_VERSION  # one definition (flywheel.versions)

class CheckpointError(Exception):
    """A checkpoint that cannot serve: missing files, incompatible tokenizer, non-finite outputs."""


def apply_template(tokenizer: Any, text: str | None = None, messages: Sequence[dict[str, str]] | None = None) -> str:
    """A prompt as the model sees it: the tokenizer's chat template where it has one, else the plain text."""
    if not messages:
        messages = [{"role": "user", "content": text or ""}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages)


@dataclass
class LoadedPolicy:
    """One loaded policy version: model, tokenizer and what decoding needs to know about them."""

    version: str
    path: Path
    model: Any
    tokenizer: Any
    eos_token_ids: frozenset[int]
    pad_token_id: int
    max_positions: int
    device: torch.device
    loaded_at: float = field(default_factory=time.time)
    _prefix: Any = field(default=None, repr=False)
    _prefix_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    prepack: bool = True  # the decoder's projections keep oneDNN-prepacked weights (CPU; kv_cache.Projection)
    _decoder: Any = field(default=None, repr=False)

    @property
    def dtype_name(self) -> str:
        """The precision that samples (and so computes the behaviour logprobs): float32, bfloat16, ..."""
        return str(self.model.dtype).removeprefix("torch.")

    def decoder(self) -> Any:
        """The fast one-token decoder (`kv_cache.FusedDecoder`), built once; None for other architectures."""
        if self._decoder is None:
            with self._prefix_lock:
                if self._decoder is None:
                    from flywheel.policy.kv_cache import FusedDecoder

                    self._decoder = (FusedDecoder(self.model, self.max_positions, prepack=self.prepack)
                                     if supports_fast_decode(self.model) else False)
        return self._decoder or None

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self.tokenizer.all_special_ids)

    @property
    def model_name(self) -> str:
        return str(getattr(self.model.config, "_name_or_path", "") or self.path.name)

    def template(self, text: str | None = None, messages: Sequence[dict[str, str]] | None = None) -> str:
        """The prompt exactly as the model sees it: the chat template where the tokenizer has one."""
        return apply_template(self.tokenizer, text, messages)

    def encode(self, prompt_text: str) -> list[int]:
        """Token ids of an already templated prompt (the template carries the special tokens)."""
        return list(self.tokenizer(prompt_text, add_special_tokens=False)["input_ids"])

    def prefix(self) -> tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]] | None:
        """The token ids every chat prompt starts with (system prompt + user header) and their KV.

        Computed once per loaded policy; prompts starting with these ids skip them in prefill.
        """
        if self._prefix is None:
            with self._prefix_lock:
                if self._prefix is None:
                    self._prefix = self._compute_prefix()
        return self._prefix or None

    @torch.inference_mode()
    def _compute_prefix(self) -> Any:
        if not getattr(self.tokenizer, "chat_template", None):
            return ()
        a, b = self.encode(self.template("a")), self.encode(self.template("b"))
        n = 0
        while n < min(len(a), len(b)) - 1 and a[n] == b[n]:
            n += 1
        if n < 4:
            return ()
        from transformers import DynamicCache

        ids = a[:n]
        cache = DynamicCache()
        self.model(input_ids=torch.tensor([ids], device=self.device), past_key_values=cache, use_cache=True,
                   logits_to_keep=1)
        return (ids, [(layer.keys, layer.values) for layer in cache.layers])

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)


def load_policy(path: str | Path, version: str, *, device: str = "cpu", dtype: str = "float32",
                validate: bool = True, prepack: bool = True) -> LoadedPolicy:
    """Load a HF causal-LM checkpoint directory (extra files such as value heads are ignored).

    With validate=True the checkpoint must also run: a forward pass over a templated prompt has to
    produce finite logits over a vocabulary that covers the tokenizer. Raises CheckpointError.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[resolve_dtype(dtype, device)])
    except Exception as exc:  # noqa: BLE001 - every load failure is a broken checkpoint
        raise CheckpointError(f"cannot load {path}: {type(exc).__name__}: {exc}") from exc
    model.to(device).eval()
    eos: set[int] = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            eos.add(source)
        elif isinstance(source, (list, tuple)):
            eos.update(int(t) for t in source)
    if not eos:
        raise CheckpointError(f"{path}: neither the tokenizer nor the generation config names an eos token")
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = min(eos)
    max_positions = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    policy = LoadedPolicy(version=version, path=path, model=model, tokenizer=tokenizer,
                          eos_token_ids=frozenset(eos), pad_token_id=int(pad), max_positions=max_positions,
                          device=torch.device(device), prepack=prepack)
    if not supports_fast_decode(model):
        raise CheckpointError(f"{path}: architecture {type(model).__name__} is not supported by the decode engine "
                              "(Llama-family decoders: RMSNorm, rotary embeddings, gated SiLU MLP)")
    if validate:
        _validate(policy)
    policy.decoder()  # fuse the projections now, on the loading thread, not in the first decode step
    return policy


@torch.inference_mode()
def _validate(policy: LoadedPolicy) -> None:
    vocab = policy.model.get_output_embeddings().weight.shape[0]
    if len(policy.tokenizer) > vocab:
        raise CheckpointError(f"{policy.path}: tokenizer has {len(policy.tokenizer)} tokens, model only {vocab}")
    ids = policy.encode(policy.template("Hello"))
    if not ids:
        raise CheckpointError(f"{policy.path}: the tokenizer produced no tokens")
    try:
        logits = policy.model(input_ids=torch.tensor([ids], device=policy.device)).logits
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{policy.path}: forward pass failed: {type(exc).__name__}: {exc}") from exc
    if not torch.isfinite(logits).all():
        raise CheckpointError(f"{policy.path}: the model produces non-finite logits")
