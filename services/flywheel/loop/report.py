"""The demo's final report: PNG plots per policy version and a markdown summary."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class VersionRecord:
    """What the loop measured for one policy version."""

    version: str
    minutes: float  # since the loop started
    step: int = 0
    ground_truth_mean: float = float("nan")  # held-out VADER compound, the hidden target
    ground_truth_stderr: float = float("nan")
    reward_mean: float = float("nan")  # the learned reward model's score (what PPO optimises)
    kl: float = float("nan")  # KL(policy || reference) per sequence, from the trainer
    kl_coef: float = float("nan")  # the KL penalty coefficient the step used (adaptive controller)
    # Per held-out prompt, in the corpus's order (same prompts and seed for every version): what a
    # paired comparison of two versions needs (`evaluation.paired_improvement_z`).
    ground_truth_scores: list[float] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class LoopReport:
    records: list[VersionRecord] = field(default_factory=list)
    reward_models: list[dict] = field(default_factory=list)  # version, accuracy, pairs
    counters: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def save_json(self, path: Path) -> None:
        path.write_text(json.dumps({"records": [asdict(r) for r in self.records],
                                    "reward_models": self.reward_models, "counters": self.counters,
                                    "notes": self.notes}, indent=2))


def plot(report: LoopReport, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    records = report.records
    xs = list(range(len(records)))
    labels = [r.version for r in records]
    panels = [
        ("ground_truth.png", "held-out ground truth (VADER compound)", [r.ground_truth_mean for r in records],
         [r.ground_truth_stderr for r in records]),
        ("reward.png", "reward-model score of training rollouts", [r.reward_mean for r in records], None),
        ("kl.png", "KL(policy || reference)", [r.kl for r in records], None),
    ]
    paths = []
    for name, title, ys, errs in panels:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        if errs is not None:
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3)
        else:
            ax.plot(xs, ys, marker="o")
        ax.set_title(title)
        ax.set_xticks(xs, labels, rotation=45, ha="right", fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def markdown(report: LoopReport, plots: list[Path]) -> str:
    lines = ["# Flywheel loop report", ""]
    if report.records:
        first, last = report.records[0], report.records[-1]
        delta = last.ground_truth_mean - first.ground_truth_mean
        lines += [
            f"Policy {first.version} -> {last.version}: held-out ground truth "
            f"{first.ground_truth_mean:+.3f} -> {last.ground_truth_mean:+.3f} (change {delta:+.3f}) "
            f"after {last.minutes:.1f} minutes; KL to reference {last.kl:.3f}.",
            "",
            "| version | minutes | step | ground truth (held-out) | ± stderr | reward model | KL | KL coef |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in report.records:
            lines.append(f"| {r.version} | {r.minutes:.1f} | {r.step} | {r.ground_truth_mean:+.3f} | "
                         f"{r.ground_truth_stderr:.3f} | {r.reward_mean:+.3f} | {r.kl:.3f} | {r.kl_coef:.3f} |")
    if report.reward_models:
        lines += ["", "## Reward models", "", "| version | held-out pairwise accuracy | training pairs |",
                  "| --- | --- | --- |"]
        for rm in report.reward_models:
            lines.append(f"| {rm.get('version')} | {rm.get('accuracy', float('nan')):.3f} | {rm.get('pairs', 0)} |")
    if report.counters:
        lines += ["", "## Counters", ""] + [f"- {k}: {v}" for k, v in sorted(report.counters.items())]
    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report.notes]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def write(report: LoopReport, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = plot(report, out_dir) if report.records else []
    report.save_json(out_dir / "report.json")
    path = out_dir / "summary.md"
    path.write_text(markdown(report, plots))
    return path
