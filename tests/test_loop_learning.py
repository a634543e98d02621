"""The whole loop, shortened: real services over a real broker, real SmolLM2 and MiniLM weights.

Simulated raters (hidden truth: VADER compound, one adversarial) rank policy samples -> preference
service (Bradley–Terry) -> reward-model training -> reward service -> PPO trainer -> new policy
versions -> policy hot reload. The held-out ground truth of the last version must beat the base
policy's on the same prompts with a statistical margin (paired z >= 2).
"""

from __future__ import annotations

import math

import pytest

from flywheel.loop.evaluation import paired_improvement_z
from flywheel.loop.local import LocalCluster
from flywheel.loop.runner import LoopConfig, LoopRunner

pytestmark = [pytest.mark.slow, pytest.mark.kafka]


def test_loop_learns_the_hidden_preference(tmp_path) -> None:
    config = LoopConfig(
        minutes=8.0, candidates=4, max_new_tokens=20, raters=5, adversarial_raters=1,
        bootstrap_prompts=32, reward_epochs=2, reward_retrain_minutes=0,
        ppo_batch_size=16, ppo_mini_batch_size=8, ppo_epochs=2, learning_rate=8e-5,
        prompts_in_flight=8, eval_prompts=40,
    )
    # Its own broker: the loop uses the real topic names, which other tests also write to.
    with LocalCluster(tmp_path / "run") as cluster:
        runner = LoopRunner(cluster, config)
        report = runner.run()

    assert report.reward_models, "a reward model was trained from the raters' preferences"
    assert report.reward_models[0]["accuracy"] >= 0.6, report.reward_models
    versions = [r.version for r in report.records]
    assert versions[0] == "policy-0000" and len(versions) >= 3, versions
    base, last = runner.evals[0], runner.evals[-1]
    z = paired_improvement_z(base, last)
    print(f"held-out truth {base.policy_version} {base.mean:+.3f} -> {last.policy_version} {last.mean:+.3f}, "
          f"paired z {z:.2f}; reward models {report.reward_models}")
    assert last.mean > base.mean and z >= 2.0, (base.mean, last.mean, z)
    assert all(math.isfinite(r.kl) and r.kl < 20 for r in report.records), [r.kl for r in report.records]
