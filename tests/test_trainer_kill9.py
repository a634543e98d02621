"""kill -9 the trainer mid-run, restart it: it resumes from its last checkpoint and the committed
offsets; every rollout is trained exactly once (counted from the checkpoints' lineage), none lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flywheel.bus import TypedConsumer, TypedProducer, ensure_topics
from flywheel.bus.topics import SCORED_ROLLOUTS, Topic

from conftest import committed_offsets
from test_trainer_loop import produce, scored
from waiting import wait_until

REPO = Path(__file__).resolve().parents[1]
N_ROLLOUTS = 48
BATCH = 4


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from flywheel.trainer.testing import tiny_llama_dir

    return tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def _complete(ckpt: Path) -> list[dict]:
    metas = []
    for d in sorted(ckpt.glob("policy-*")):
        if (d / "flywheel.json").exists():
            metas.append(json.loads((d / "flywheel.json").read_text()))
    return metas


def _start(env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flywheel.trainer"], cwd=REPO, env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_kill_9_mid_run_resumes_without_loss_or_double_training(kafka_bootstrap, unique, tiny_model, tmp_path):
    topic = Topic(f"scored-{unique}", SCORED_ROLLOUTS.message_type)
    ensure_topics(kafka_bootstrap, [topic], partitions=3)
    messages = [scored(i) for i in range(N_ROLLOUTS)]
    produce(kafka_bootstrap, topic, messages)
    ckpt = tmp_path / "ckpt"
    env = dict(
        os.environ, FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, FLYWHEEL_TRAINER_BASE_MODEL=str(tiny_model),
        FLYWHEEL_TRAINER_CHECKPOINT_URI=ckpt.as_uri(), FLYWHEEL_KAFKA_CONSUMER_GROUP=f"trainer-{unique}",
        FLYWHEEL_TRAINER_SCORED_ROLLOUTS_TOPIC=topic.name, FLYWHEEL_TRAINER_MODEL_VERSIONS_TOPIC=f"versions-{unique}",
        FLYWHEEL_TRAINER_BATCH_SIZE=str(BATCH), FLYWHEEL_TRAINER_MINI_BATCH_SIZE="2", FLYWHEEL_TRAINER_PPO_EPOCHS="4",
        FLYWHEEL_KAFKA_SESSION_TIMEOUT_MS="6000", FLYWHEEL_TORCH_THREADS="1", FLYWHEEL_GRPC_PORT="0",
        FLYWHEEL_METRICS_PORT="0", FLYWHEEL_HOST="127.0.0.1", FLYWHEEL_HOME=str(tmp_path / "home"),
        FLYWHEEL_SHUTDOWN_DELAY_S="0", FLYWHEEL_KAFKA_POLL_TIMEOUT_MS="200", OMP_NUM_THREADS="1",
        FLYWHEEL_TRAINER_MAX_VERSION_LAG="1000")  # all rollouts come from policy-0000: never stale here

    first = _start(env, tmp_path / "first.log")
    try:
        wait_until(lambda: len(_complete(ckpt)) >= 3 or first.poll() is not None, 180,
                   what="three checkpoints from the first run")
        assert len(_complete(ckpt)) >= 3, (tmp_path / "first.log").read_text()[-3000:]
        os.kill(first.pid, signal.SIGKILL)  # mid-run: a later step, or between a checkpoint and its commit
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    killed_at = len(_complete(ckpt))
    assert killed_at < N_ROLLOUTS // BATCH, "the first run finished before it was killed"

    second = _start(env, tmp_path / "second.log")
    try:
        # done when every offset is committed: a commit follows its checkpoint, so nothing is left
        # that could still be trained (twice or at all)
        group = f"trainer-{unique}"
        wait_until(lambda: committed_offsets(kafka_bootstrap, group) >= N_ROLLOUTS or second.poll() is not None,
                   240, interval_s=0.5, what="the second run to commit every offset")
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(60)
    log = (tmp_path / "second.log").read_text()
    metas = _complete(ckpt)
    assert f"resuming from policy-{killed_at:04d}" in log, log[-3000:]

    # Versions form one unbroken chain across the crash.
    assert [m["version"] for m in metas] == [f"policy-{i:04d}" for i in range(1, len(metas) + 1)]
    assert [m["parent_version"] for m in metas] == [f"policy-{i:04d}" for i in range(len(metas))]
    assert [m["step"] for m in metas] == list(range(1, len(metas) + 1))
    # Exactly once: every rollout in exactly one version, none lost.
    trained = [rid for m in metas for rid in m["rollout_ids"]]
    assert len(trained) == N_ROLLOUTS, f"{len(trained)} trained (duplicates: {len(trained) - len(set(trained))})"
    assert sorted(trained) == sorted(m.rollout.rollout_id for m in messages)
    assert len(metas) == N_ROLLOUTS // BATCH

    consumer = TypedConsumer(topic, bootstrap_servers=kafka_bootstrap, group_id=f"trainer-{unique}",
                             dead_letters=TypedProducer(kafka_bootstrap))
    try:
        assert sum(consumer.committed(p) or 0 for p in range(3)) == N_ROLLOUTS
    finally:
        consumer.close()
