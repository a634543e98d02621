"""The in-process generation engine: the serving policy, swappable, and batched generation.

Reusable without gRPC or Kafka (the trainer's evaluation and the demo loop call it directly):

    engine = PolicyEngine.from_checkpoint()              # SmolLM2-135M-Instruct, "policy-0000"
    [[c]] = engine.generate(["Say hi"], SamplingConfig(temperature=0.7, max_new_tokens=16, seed=1))
    c.token_ids, c.logprobs, c.text, c.finish_reason, c.policy_version

The parts, each in its own module: `loading` (checkpoint, tokenizer, template, precision),
`sampler` (token choice and the behaviour-logprob convention), `kv_cache` (preallocated KV cache
and the one-token forward pass), `decode` (the continuous decode batch). Logprob convention (the
trainer relies on it; docs/policy.md): `log_softmax(logits / temperature)[token]` in float32 from
the sampling precision's logits, BEFORE top-k / top-p filtering; greedy rows are not scaled.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Sequence

import torch

from flywheel.policy.decode import (  # noqa: F401 - re-exported: the engine's public names
    FINISH_CANCELLED,
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    DecodeBatch,
    Generation,
    StepCallback,
    generate_batch,
)
from flywheel.policy.loading import (  # noqa: F401 - re-exported
    BASE_VERSION,
    CheckpointError,
    LoadedPolicy,
    apply_template,
    load_policy,
)
from flywheel.policy.sampling import SamplingConfig

from flywheel.runtime.process import machine_threads  # noqa: F401 - re-exported (bench)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# The engine: a current policy that can be swapped atomically
# --------------------------------------------------------------------------------------------------
class PolicyEngine:
    """Holds the serving policy; `swap` replaces it atomically (batches in flight finish on the old one).

    Generation itself is synchronous and single-threaded per batch; callers that share an engine
    across threads serialise batches with `lock` (the async batcher runs all batches on one thread).
    """

    def __init__(self, policy: LoadedPolicy) -> None:
        self._policy = policy
        self.lock = threading.Lock()
        decoder = policy.decoder()
        log.info("policy engine: %s on %s in %s, %d torch threads%s", policy.version, policy.device,
                 policy.dtype_name, torch.get_num_threads(),
                 ", prepacked projections" if decoder is not None and decoder.prepacked else "")

    @classmethod
    def from_checkpoint(cls, path: str | Path | None = None, version: str = BASE_VERSION, *, device: str = "cpu",
                        dtype: str = "float32", prepack: bool = True) -> "PolicyEngine":
        if path is None:
            from flywheel.models import smollm2_checkpoint

            path = smollm2_checkpoint()
        return cls(load_policy(path, version, device=device, dtype=dtype, prepack=prepack))

    @property
    def current(self) -> LoadedPolicy:
        return self._policy

    @property
    def version(self) -> str:
        return self._policy.version

    def swap(self, policy: LoadedPolicy) -> LoadedPolicy:
        """Serve `policy` from the next batch on; returns the previous one."""
        old, self._policy = self._policy, policy
        log.info("policy swapped: %s -> %s", old.version, policy.version)
        return old

    def generate(self, prompts: Sequence[str | Sequence[dict[str, str]]], sampling: SamplingConfig, *,
                 max_batch_size: int = 32, on_step: StepCallback | None = None) -> list[list[Generation]]:
        """Sample `sampling.n` candidates per prompt (plain text or chat messages), in batches.

        Returns, per prompt, its candidates in candidate order; each carries token ids, behaviour
        logprobs, text, finish reason and the policy version that produced it.
        """
        policy = self.current
        grouped: list[list[Generation]] = []
        for prompt in prompts:
            text = policy.template(text=prompt) if isinstance(prompt, str) else policy.template(messages=prompt)
            ids = policy.encode(text)
            grouped.append([Generation.from_config(text, sampling, c, list(ids)) for c in range(sampling.n)])
        flat = [s for group in grouped for s in group]
        with self.lock:
            for start in range(0, len(flat), max_batch_size):
                generate_batch(policy, flat[start:start + max_batch_size], on_step)
        return grouped
