"""docs/deploy.md stays true: its prompt feeder runs against a real broker and its references resolve."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "deploy.md"


def feeder_snippet() -> str:
    text = DOC.read_text()
    match = re.search(r"--command -- python - (\d+) <<'PY'\n(.*?)\nPY\n", text, re.S)
    assert match, "the prompt feeder snippet is gone from docs/deploy.md"
    return match.group(2)


def test_prompt_feeder_from_the_docs_delivers_prompts(kafka_bootstrap) -> None:
    from kafka import KafkaConsumer, TopicPartition

    from flywheel.bus import ensure_topics
    from flywheel.bus.codec import decode
    from flywheel.bus.topics import PROMPTS
    from flywheel.loop.prompts import load_prompts

    ensure_topics(kafka_bootstrap, [PROMPTS])
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False)
    partitions = [TopicPartition(PROMPTS.name, p) for p in sorted(consumer.partitions_for_topic(PROMPTS.name))]
    consumer.assign(partitions)
    start = consumer.end_offsets(partitions)

    out = subprocess.run([sys.executable, "-", "5"], input=feeder_snippet(), capture_output=True, text=True,
                         timeout=120, env={"FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
                                           "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "sent 5 prompts"

    for tp in partitions:
        consumer.seek(tp, start[tp])
    received = {}
    for _ in range(20):
        for records in consumer.poll(timeout_ms=500).values():
            for record in records:
                message = decode(PROMPTS, record.value, record.headers)
                received[record.key.decode()] = message
        if len(received) >= 5:
            break
    consumer.close()
    expected = {p.prompt_id: p for p in load_prompts()[:5]}
    assert set(expected) <= set(received)
    for prompt_id, prompt in expected.items():
        assert received[prompt_id].text == prompt.text and received[prompt_id].split in ("train", "eval")


def test_referenced_files_and_commands_exist() -> None:
    text = DOC.read_text()
    for path in re.findall(r"`((?:docker|deploy|charts|docs|tests)/[\w./-]+)`", text):
        assert (REPO / path).exists(), path
    # every alert the doc lists exists, and every alert is listed
    rules = yaml.safe_load((REPO / "charts/flywheel/files/prometheus-rules.yaml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert set(re.findall(r"`(Flywheel\w+)`", text)) == alerts
    # the Dockerfile targets it builds and the chart values it sets are real
    assert all(f"AS {svc}" in (REPO / "docker/Dockerfile").read_text() for svc in ("policy", "reward", "preference",
                                                                                     "trainer"))
    values = yaml.safe_load((REPO / "charts/flywheel/values.yaml").read_text())
    block = re.search(r"cat > flywheel-values.yaml <<'YAML'\n(.*?)\nYAML\n", text, re.S).group(1)

    def check(user: dict, defaults: dict, path: str = "") -> None:
        for key, value in user.items():
            assert key in defaults, f"docs set unknown value {path}{key}"
            if isinstance(value, dict) and isinstance(defaults[key], dict) and defaults[key]:
                check(value, defaults[key], f"{path}{key}.")

    check(yaml.safe_load(block), values)
