"""The committed stubs must match what the protos generate now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import gen_protos  # noqa: E402


def test_generated_code_is_not_stale(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(REPO / "tools" / "gen_protos.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in gen_protos.generated_files(tmp_path)}
    committed = {p.relative_to(gen_protos.DEFAULT_OUT): p.read_bytes()
                 for p in gen_protos.generated_files(gen_protos.DEFAULT_OUT)}
    assert fresh, "no stubs generated"
    assert sorted(fresh) == sorted(committed), "generated file set differs: run `python tools/gen_protos.py`"
    stale = [str(name) for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated code (run `python tools/gen_protos.py`): {stale}"


def test_every_service_proto_defines_its_rpcs() -> None:
    from flywheel.v1 import policy_pb2, preference_pb2, reward_pb2, trainer_pb2

    def methods(module, service):
        return set(module.DESCRIPTOR.services_by_name[service].methods_by_name)

    # The contract's core RPCs; services may add more (additive changes only).
    assert methods(policy_pb2, "PolicyService") >= {"Generate", "GenerateStream", "GetModelVersion"}
    assert methods(reward_pb2, "RewardService") >= {"Score", "ScoreStream", "Compare", "GetModelVersion"}
    assert methods(preference_pb2, "PreferenceService") >= {
        "SubmitDemonstration", "SubmitComparison", "SubmitRanking", "SubmitBulk", "GetConsensus", "ExportDataset"}
    assert methods(trainer_pb2, "TrainerService") >= {"Status", "Pause", "Resume", "TriggerRewardModelTraining"}
