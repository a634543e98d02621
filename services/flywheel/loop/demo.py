"""`flywheel demo`: the main job. Runs the whole loop locally on a single-node Kafka it starts itself,
shows a live status, and writes a report (PNG plots + markdown) into the run directory."""

from __future__ import annotations

import logging
import math
import signal
import time
from contextlib import nullcontext as _nothing
from pathlib import Path

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from flywheel.loop.local import LocalCluster
from flywheel.loop.report import LoopReport, write
from flywheel.loop.runner import LoopConfig, LoopRunner, LoopStatus, default_run_dir

console = Console()
if not console.is_terminal:
    console = Console(width=240, soft_wrap=True)


def _render(status: LoopStatus, report: LoopReport, minutes: float, total: float) -> Group:
    head = Table.grid(padding=(0, 2))
    head.add_row("[bold]phase[/]", status.phase, "[bold]time[/]", f"{minutes:5.1f} / {total:.0f} min")
    head.add_row("[bold]policy[/]", status.policy_version, "[bold]reward model[/]", status.reward_version)
    head.add_row("[bold]prompts sent[/]", str(status.prompts_sent), "[bold]prompts rated / rankings[/]",
                 f"{status.prompts_rated} / {status.rankings_submitted}")
    head.add_row("[bold]PPO step[/]", str(status.trainer_step), "[bold]KL[/]", f"{status.kl:.3f}")
    head.add_row("[bold]mean reward[/]", f"{status.mean_reward:+.3f}", "[bold]held-out truth[/]",
                 "-" if math.isnan(status.last_ground_truth) else f"{status.last_ground_truth:+.3f}")
    versions = Table(title="policy versions (held-out ground truth = VADER compound)", expand=False)
    for col in ("version", "min", "step", "truth", "± se", "reward", "KL"):
        versions.add_column(col, justify="right")
    for r in report.records[-12:]:
        versions.add_row(r.version, f"{r.minutes:.1f}", str(r.step), f"{r.ground_truth_mean:+.3f}",
                         f"{r.ground_truth_stderr:.3f}", f"{r.reward_mean:+.3f}", f"{r.kl:.3f}")
    return Group(head, versions)


class _PlainStatus:
    """One line per phase change, and at most every 15 s otherwise."""

    def __init__(self) -> None:
        self._last = ("", 0.0)

    def update(self, s: LoopStatus, minutes: float) -> None:
        now = time.monotonic()
        if s.phase == self._last[0] and now - self._last[1] < 15:
            return
        self._last = (s.phase, now)
        console.print(f"[{minutes:5.1f} min] {s.phase} | policy {s.policy_version} reward {s.reward_version} | "
                      f"prompts {s.prompts_sent} rated {s.prompts_rated} rankings {s.rankings_submitted} | "
                      f"step {s.trainer_step} (consumed {s.trainer_consumed}, buffered {s.trainer_buffered}) KL {s.kl:.3f} reward {s.mean_reward:+.3f} | "
                      f"truth {s.last_ground_truth:+.3f}")


def _interrupt_once() -> None:
    """Ctrl-C (or SIGTERM) ends the run; further ones are ignored so the clean-up that stops every
    child process and writes the report always finishes."""

    def interrupt(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


def demo(
    minutes: float = typer.Option(LoopConfig.minutes, help="How long the loop runs (PPO phase ends at this mark)."),
    run_dir: Path = typer.Option(None, help="Logs, state and the report (default runs/demo-<time>)."),
    bootstrap_servers: str = typer.Option("", help="Use this running Kafka instead of starting one."),
    bootstrap_prompts: int = typer.Option(LoopConfig.bootstrap_prompts,
                                          help="Prompts rated before the first reward model."),
    eval_prompts: int = typer.Option(LoopConfig.eval_prompts, help="Held-out prompts evaluated per policy version."),
    max_policy_versions: int = typer.Option(
        LoopConfig.max_policy_versions,
        help="End the PPO phase after this many new policy versions, even before --minutes (0: no limit)."),
    eval_every: int = typer.Option(LoopConfig.eval_every, min=0,
                                   help="Evaluate every n-th new policy version (0: only the base and the last)."),
    reward_retrain_minutes: float = typer.Option(
        LoopConfig.reward_retrain_minutes, min=0,
        help="Retrain the reward model on all preferences this long after the previous one (0: never)."),
    keep_checkpoints: int = typer.Option(LoopConfig.keep_checkpoints, min=1,
                                         help="Newest policy checkpoints kept on disk (~1.6 GB each)."),
) -> None:
    """Run the whole loop locally: Kafka, policy, reward, preference, trainer, simulated raters."""
    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_dir = (run_dir or default_run_dir()).absolute()
    config = LoopConfig(minutes=minutes, bootstrap_prompts=bootstrap_prompts, eval_prompts=eval_prompts,
                        max_policy_versions=max_policy_versions, eval_every=eval_every,
                        reward_retrain_minutes=reward_retrain_minutes, keep_checkpoints=keep_checkpoints)
    _interrupt_once()
    console.print(f"[bold]flywheel demo[/]: run directory {run_dir} (service logs in {run_dir}/logs)")
    with LocalCluster(run_dir) as cluster:
        if bootstrap_servers:
            cluster.start_kafka(bootstrap_servers)
        # A live table on a terminal; plain status lines when output goes to a file or CI log.
        live = Live(console=console, refresh_per_second=2) if console.is_terminal else None
        plain = _PlainStatus()
        invited = []

        def on_status(s, r) -> None:
            if runner.human and not invited:  # once: how a person joins the running loop
                invited.append(True)
                url, token = runner.human
                console.print(f"[bold]Rate alongside the simulated raters[/]: open {url} and sign in with "
                              f"the rater token {token}", markup=True, highlight=False)
            live.update(_render(s, r, runner.minutes(), minutes)) if live else plain.update(s, runner.minutes())

        with live or _nothing():
            runner = LoopRunner(cluster, config, on_status=on_status)
            try:
                report = runner.run()
            except KeyboardInterrupt:
                report = runner.report
                report.notes.append("interrupted by the user")
    # Everything the run started is stopped by now (raters, services, broker), also after Ctrl-C.
    summary = write(report, run_dir / "report")
    console.print(summary.read_text(), markup=False, highlight=False)
    console.print(f"report: {summary}")
