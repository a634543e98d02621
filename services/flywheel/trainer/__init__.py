"""The PPO trainer service: scored rollouts in (Kafka), policy versions out.

In-process API (the demo loop drives it directly):
- `PPOConfig`, `PPOTrainer(config, policy, ref_model).step(batch) -> StepStats` (flywheel.trainer.ppo)
- `collate(scored_rollouts) -> RolloutBatch`, `RolloutFilter` (flywheel.trainer.batch)
- `CheckpointStore` (flywheel.trainer.checkpoint), `TrainerLoop`, `load_trainer` (flywheel.trainer.loop)
- `SFTTrainer` (flywheel.trainer.sft)
Imports are lazy so `import flywheel.trainer` stays cheap (no torch).
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "PPOConfig": "flywheel.trainer.ppo",
    "PPOTrainer": "flywheel.trainer.ppo",
    "PolicyWithValueHead": "flywheel.trainer.ppo",
    "StepStats": "flywheel.trainer.ppo",
    "RolloutBatch": "flywheel.trainer.batch",
    "RolloutFilter": "flywheel.trainer.batch",
    "collate": "flywheel.trainer.batch",
    "CheckpointStore": "flywheel.trainer.checkpoint",
    "TrainerLoop": "flywheel.trainer.loop",
    "load_trainer": "flywheel.trainer.loop",
    "SFTConfig": "flywheel.trainer.sft",
    "SFTTrainer": "flywheel.trainer.sft",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
