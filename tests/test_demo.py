"""The README's main command, run the way a newcomer runs it.

`flywheel demo` (what `make demo` runs once the environment exists) from a fresh working directory,
with the default (relative) run directory and a clean environment: no FLYWHEEL_* variables, no
absolute paths handed in by a test. It starts its own Kafka broker and the four services, so these
tests catch what per-service tests with absolute temporary paths cannot (a relative run directory
resolved twice made the raters' tokens unknown to the preference service).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.kafka]

# A short run: few prompts, and the PPO phase ends at the first new policy version.
SHORT_RUN = ["--minutes", "25", "--bootstrap-prompts", "16", "--eval-prompts", "4", "--max-policy-versions", "1"]


def newcomer_env() -> dict[str, str]:
    """The caller's environment without any Flywheel settings (as in a fresh shell)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}


def flywheel_command() -> list[str]:
    script = Path(sys.executable).with_name("flywheel")
    return [str(script)] if script.exists() else [sys.executable, "-m", "flywheel.cli"]


def processes_of(run_dir: Path) -> list[str]:
    """Live processes whose command line or environment names the run directory (services, broker)."""
    needle = str(run_dir).encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
            state = (proc / "stat").read_text().split(")")[-1].split()[0]
        except OSError:
            continue
        if state != "Z" and (needle in cmdline or needle in environ):
            command = cmdline.replace(b"\0", b" ")[:200].decode(errors="replace")
            found.append(f"{proc.name}: {command}")
    return found


def stop(demo: subprocess.Popen) -> None:
    """End a demo that overran as a user would (Ctrl-C, which stops its services and broker), and
    only if that fails, kill it."""
    if demo.poll() is None:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(timeout=180)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait()


def the_run_dir(workdir: Path) -> Path:
    runs = sorted((workdir / "runs").glob("demo-*"))
    assert len(runs) == 1, f"expected one run directory under {workdir / 'runs'}, found {runs}"
    return runs[0]


@pytest.mark.timeout(1500)
def test_demo_runs_from_a_fresh_directory_with_defaults(tmp_path: Path) -> None:
    workdir = tmp_path / "newcomer"
    workdir.mkdir()
    demo = subprocess.Popen(flywheel_command() + ["demo", *SHORT_RUN], cwd=workdir, env=newcomer_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = demo.communicate(timeout=1400)
    except subprocess.TimeoutExpired:
        stop(demo)
        output, _ = demo.communicate()
        pytest.fail(f"the demo did not finish within 1400 s:\n{output[-6000:]}")
    assert demo.returncode == 0, output[-6000:]
    run_dir = the_run_dir(workdir)

    # Every service used the run's home, not one resolved again below its own working directory.
    assert (run_dir / "home" / "preference" / "auth.sqlite").exists()
    assert not (run_dir / "runs").exists(), "a service resolved the relative run directory twice"

    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert (run_dir / "report" / "summary.md").exists()
    counters = report["counters"]
    assert counters["rankings_submitted"] > 0 and counters["prompts_rated"] >= 16, counters
    assert report["reward_models"] and report["reward_models"][0]["version"].startswith("reward-"), report
    versions = [r["version"] for r in report["records"]]
    assert versions[0] == "policy-0000" and any(v != "policy-0000" for v in versions), versions
    assert counters["trainer_steps"] >= 1, counters

    # Shut down in dependency order: the loop's own Kafka clients never saw the broker go away.
    kafka_errors = [line for line in output.splitlines() if "ERROR" in line and "kafka" in line]
    assert not kafka_errors, "\n".join(kafka_errors[:20])
    assert not processes_of(run_dir), processes_of(run_dir)


@pytest.mark.timeout(600)
def test_ctrl_c_writes_the_report_and_stops_every_child(tmp_path: Path) -> None:
    workdir = tmp_path / "newcomer"
    workdir.mkdir()
    demo = subprocess.Popen(flywheel_command() + ["demo", *SHORT_RUN], cwd=workdir, env=newcomer_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(demo.stdout), daemon=True)
    reader.start()
    try:
        # Interrupt while the services start (the broker is up, a service is loading its model): the
        # hardest moment to clean up after, and the cheapest to reach.
        wait_until(lambda: any("starting services" in line for line in lines) or demo.poll() is not None,
                   timeout_s=300, what="the demo to start its services")
        assert demo.poll() is None, "".join(lines)[-4000:]
        run_dir = the_run_dir(workdir)
        wait_until(lambda: len(processes_of(run_dir)) >= 2, timeout_s=120,
                   what="the broker and a service of the run to be running")
        demo.send_signal(signal.SIGINT)
        demo.wait(timeout=180)
    finally:
        stop(demo)
    reader.join(timeout=10)
    output = "".join(lines)
    assert demo.returncode == 0, output[-4000:]
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert "interrupted by the user" in report["notes"], report["notes"]
    assert {"prompts_sent", "trainer_steps"} <= set(report["counters"]), report["counters"]  # what ran so far
    assert not processes_of(run_dir), processes_of(run_dir)
    kafka_errors = [line for line in output.splitlines() if "ERROR" in line and "kafka" in line]
    assert not kafka_errors, "\n".join(kafka_errors[:20])
