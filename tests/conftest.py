"""Shared fixtures: a real single-node Kafka broker (KRaft) for the whole session.

The broker is started by the project's own launcher (deploy/kafka/kafka.sh) on a free loopback
port with a temporary data dir. Set FLYWHEEL_TEST_KAFKA_BOOTSTRAP to reuse an already running
real broker instead (handy while iterating); nothing here ever substitutes a fake.
"""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KAFKA_SH = REPO / "deploy" / "kafka" / "kafka.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> str:
    external = os.environ.get("FLYWHEEL_TEST_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    data_dir = tmp_path_factory.mktemp("kafka")
    port = free_port()
    out = subprocess.run(
        [str(KAFKA_SH), "start", "--data-dir", str(data_dir), "--port", str(port),
         "--controller-port", str(free_port())],
        capture_output=True, text=True, timeout=180,
    )
    if out.returncode != 0:
        raise RuntimeError(f"could not start Kafka: {out.stderr}")
    try:
        yield out.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run([str(KAFKA_SH), "stop", "--data-dir", str(data_dir)], timeout=60, check=False)


@pytest.fixture
def unique() -> str:
    """A short unique suffix for topic and group names, so tests never see each other's data."""
    return uuid.uuid4().hex[:10]
