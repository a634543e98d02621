from pathlib import Path

from flywheel.loop.evaluation import EvalResult, ground_truth, improvement_z
from flywheel.loop.report import LoopReport, VersionRecord, write


def test_ground_truth_is_vader_compound() -> None:
    pos, neg, neutral = ground_truth(["I love this, it is wonderful!", "This is terrible and I hate it.", "The box."])
    assert pos > 0.5 and neg < -0.5 and neutral == 0.0


def test_improvement_z() -> None:
    before = EvalResult("policy-0000", [0.0, 0.1, -0.1, 0.0])
    after = EvalResult("policy-0003", [0.5, 0.6, 0.4, 0.5])
    assert improvement_z(before, after) > 5
    assert improvement_z(after, before) < -5


def test_report_writes_plots_and_summary(tmp_path: Path) -> None:
    report = LoopReport(records=[VersionRecord("policy-0000", 0.0, 0, 0.05, 0.02, -0.1, 0.0),
                                 VersionRecord("policy-0001", 5.0, 10, 0.25, 0.03, 0.4, 1.2)],
                        reward_models=[{"version": "reward-0001", "accuracy": 0.86, "pairs": 480}],
                        counters={"rollouts": 100})
    summary = write(report, tmp_path)
    text = summary.read_text()
    assert "+0.050 -> +0.250 (change +0.200)" in text
    assert "reward-0001 | 0.860 | 480" in text
    for name in ("ground_truth.png", "reward.png", "kl.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert (tmp_path / "report.json").exists()


def test_paired_improvement_z() -> None:
    from flywheel.loop.evaluation import paired_improvement_z

    before = EvalResult("a", [0.0, 0.5, -0.5, 0.2])
    after = EvalResult("b", [0.3, 0.7, -0.2, 0.5])  # every prompt improves by ~0.25
    assert paired_improvement_z(before, after) > 5
    try:
        paired_improvement_z(before, EvalResult("c", [0.1]))
    except ValueError:
        pass
    else:
        raise AssertionError("mismatched evaluations must be refused")
