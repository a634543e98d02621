"""Small real models for fast tests and benchmarks (random weights from a config, real tokenizer)."""

from __future__ import annotations

from pathlib import Path


def tiny_llama_dir(target: Path, *, hidden_size: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A randomly initialised Llama causal LM with SmolLM2's tokenizer, saved like a checkpoint.

    Same vocabulary and chat template as the real policy, so rollouts and checkpoints are
    interchangeable; a forward/backward takes milliseconds.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from flywheel.models import smollm2_checkpoint

    target = Path(target)
    if (target / "config.json").exists():
        return target
    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target


def tiny_gpt2(vocab_size: int = 1000, n_layer: int = 2, n_embd: int = 64, seed: int = 0):  # noqa: ANN201
    """The benchmark's model: a 2-layer, 64-dim GPT-2 (random weights)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=4,
                                      n_positions=256))
