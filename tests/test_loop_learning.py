"""The whole loop learns: a shorter run of `flywheel demo`.

Real services over a real Kafka broker with real weights (SmolLM2-135M policy, MiniLM reward model):
simulated raters who judge by a hidden ground truth (VADER compound of the response) rank the policy's
samples -> preference service (Bradley–Terry) -> reward model -> PPO against that reward model only
-> new policy versions -> hot reload. The ground truth is measured on held-out prompts the loop never
trains on, with the same sampling seed before and after, so the comparison is paired per prompt.
"""

from __future__ import annotations

import math
import shutil

import pytest

from flywheel.loop.evaluation import paired_improvement_z
from flywheel.loop.local import LocalCluster
from flywheel.loop.report import write as write_report
from flywheel.loop.runner import LoopConfig, LoopRunner

# One-sided paired test at p < 0.005: a policy that did not change (or got worse) passes with
# probability below 0.5%.
MIN_Z = 2.58
MIN_IMPROVEMENT = 0.1  # VADER compound, on a [-1, 1] scale; the full demo reaches +0.3 or more


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_loop_raises_held_out_ground_truth(tmp_path):
    config = LoopConfig(
        # From start-up; PPO gets what the bootstrap leaves of it (~5 of 12 minutes). The trainer runs
        # on the machine's cores in bf16 where the CPU has it (LoopConfig's defaults): with one fp32
        # thread the same 12 minutes gave 5 PPO steps and +0.074 (z 1.0), measured 2026-12-01.
        minutes=12.0,
        bootstrap_prompts=80,    # x 8 candidates, ranked by 3 of 6 raters (one adversarial)
        reward_retrain_minutes=0,
        eval_every=0,            # held-out evaluation of the base policy and the last version only
        # 80 held-out prompts, not the demo's 48: the paired z grows with the square root of the
        # prompts for the same improvement. With 48, a clean-clone CI run that learned +0.193 in 9
        # steps scored z 2.13 and failed (~2.8 over 80). All 107 gave z 7.7 (+0.348), but the base
        # evaluation then took 2.7 of the 12 minutes on the CI machine and left PPO 3 steps.
        eval_prompts=80,
        keep_checkpoints=2,
    )
    run_dir = tmp_path / "run"
    runner = None
    try:
        with LocalCluster(run_dir) as cluster:
            runner = LoopRunner(cluster, config)
            report = runner.run()
    finally:
        # ~1.6 GB per policy checkpoint; logs, the report and the reward models stay for a post-mortem.
        if runner is not None:
            write_report(runner.report, run_dir / "report")
        shutil.rmtree(run_dir / "home" / "checkpoints" / "policy", ignore_errors=True)

    base, final = runner.evals[0], runner.evals[-1]
    assert base.policy_version == "policy-0000"
    assert final.policy_version != base.policy_version, "the loop produced no new policy version"
    steps = report.records[-1].step
    assert steps >= 3, f"only {steps} PPO steps ran"

    # The reward model learned the raters' preference (held-out pairs of the preference export).
    first_rm = report.reward_models[0]
    assert first_rm["accuracy"] >= 0.65, report.reward_models  # chance is 0.5; 120 prompts gave 0.79-0.87

    # PPO against the learned reward raised the hidden ground truth beyond noise.
    z = paired_improvement_z(base, final)
    improvement = final.mean - base.mean
    assert improvement >= MIN_IMPROVEMENT and z >= MIN_Z, (
        f"held-out ground truth {base.mean:+.3f} -> {final.mean:+.3f} ({improvement:+.3f}, paired z {z:.2f}) "
        f"after {steps} steps")

    # KL to the reference stayed bounded under the adaptive controller.
    kls = [r.kl for r in report.records[1:] if not math.isnan(r.kl)]
    assert kls and max(kls) <= 2 * config.target_kl, kls
