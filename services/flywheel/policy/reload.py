"""Hot reload of the local backend: the shared `ModelVersionFollower` over policy versions.

Loading (and `load_policy`'s validation: a forward pass with finite logits) happens on the
consumer thread while generation keeps running on the old weights; the swap is one reference
assignment, so every batch runs entirely on one version and no request is dropped. Failure policy
and metrics (`flywheel_policy_reloads_total{outcome=loaded|rejected|ignored}`) are the follower's.
"""

from __future__ import annotations

from pathlib import Path

from flywheel import checkpoints
from flywheel.model_follower import ModelVersionFollower
from flywheel.policy import metrics
from flywheel.policy.backends import LocalBackend
from flywheel.policy.engine import LoadedPolicy, load_policy
from flywheel.runtime.uris import UriPolicy
from flywheel.v1 import common_pb2
from flywheel.versions import POLICY


def policy_follower(backend: LocalBackend, *, cache_dir: Path, uri_policy: UriPolicy, device: str = "cpu",
                    dtype: str = "float32", prepack: bool = True) -> ModelVersionFollower[LoadedPolicy]:
    def load(mv: common_pb2.ModelVersion) -> LoadedPolicy:
        path = checkpoints.resolve(mv.checkpoint_uri, cache_dir)
        return load_policy(path, mv.version, device=device, dtype=dtype, validate=True, prepack=prepack)

    return ModelVersionFollower(POLICY, load, lambda policy: None, backend.swap,
                                current_version=lambda: backend.version, uri_policy=uri_policy,
                                reloads=metrics.RELOADS,
                                reload_seconds=metrics.RELOAD_SECONDS)
