"""Scorers: the plug-in interface of the reward service and its implementations.

- `base`: the `Scorer` interface (what a plugin implements) and its result types.
- `transformer`: the sequence-classification reward model and its checkpoints.
- `chunking`: how one call is split into length-homogeneous forward passes.
- `builtin`: VADER, a remote RewardService, weighted ensembles.
- `factory`: `build_scorer(settings)` - built-ins, entry-point plugins, `module:Class`, ensembles.
"""

from flywheel.reward.scorers.base import Component, Scorer, ScoreResult, check_lengths
from flywheel.reward.scorers.builtin import RETRYABLE, EnsembleScorer, RemoteScorer, VaderScorer, with_reward_model
from flywheel.reward.scorers.chunking import plan_chunks
from flywheel.reward.scorers.factory import (
    ENTRY_POINT_GROUP,
    PLUGIN_ENV_PREFIX,
    build_scorer,
    create_plugin,
    load_plugin,
    parse_ensemble,
    plugin_names,
    transformer_from_settings,
)
from flywheel.reward.scorers.transformer import (
    METADATA_FILE,
    TransformerRewardScorer,
    default_torch_threads,
    read_checkpoint_metadata,
)

__all__ = [
    "ENTRY_POINT_GROUP", "METADATA_FILE", "PLUGIN_ENV_PREFIX", "RETRYABLE", "Component",
    "EnsembleScorer", "RemoteScorer", "ScoreResult", "Scorer", "TransformerRewardScorer", "VaderScorer",
    "build_scorer", "check_lengths", "create_plugin", "default_torch_threads", "load_plugin", "parse_ensemble",
    "plan_chunks", "plugin_names", "read_checkpoint_metadata", "transformer_from_settings",
    "with_reward_model",
]
