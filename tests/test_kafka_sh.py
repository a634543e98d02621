"""deploy/kafka/kafka.sh never deletes data on its own (it used to reformat on a new controller port)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from conftest import KAFKA_SH, free_port

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def kafka_sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(KAFKA_SH), *args], capture_output=True, text=True, timeout=180, check=check)


def topics(bootstrap: str) -> set[str]:
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


def test_restart_keeps_topics_and_refuses_a_different_controller_port(tmp_path: Path) -> None:
    from flywheel.bus import Topic, ensure_topics
    from flywheel.v1 import common_pb2

    data = tmp_path / "kafka"
    # Started without --controller-port: a random one is picked and stored with the data.
    bootstrap = kafka_sh("start", "--data-dir", str(data), "--port", str(free_port())).stdout.strip().splitlines()[-1]
    try:
        ensure_topics(bootstrap, [Topic("kept.v1", common_pb2.Prompt)], partitions=1, replication_factor=1)
    finally:
        kafka_sh("stop", "--data-dir", str(data))
    stored = (data / "controller.port").read_text().strip()

    # The plain restart from the issue (no --controller-port, another port) reuses it: nothing lost.
    bootstrap = kafka_sh("start", "--data-dir", str(data), "--port", str(free_port())).stdout.strip().splitlines()[-1]
    try:
        assert "kept.v1" in topics(bootstrap)
    finally:
        kafka_sh("stop", "--data-dir", str(data))

    # A different controller port would need a reformat: refused, with the way out spelled out.
    other = str(free_port())
    refused = kafka_sh("start", "--data-dir", str(data), "--port", str(free_port()), "--controller-port", other,
                       check=False)
    assert refused.returncode != 0
    assert f"formatted with controller port {stored}, not {other}" in refused.stderr
    assert "loses every topic" in refused.stderr
    assert (data / "data" / "meta.properties").exists()
    assert any(p.name.startswith("kept.v1-") for p in (data / "data").iterdir())
    with socket.socket() as s:  # nothing was started
        assert s.connect_ex(("127.0.0.1", int(stored))) != 0
