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

# Services under test run without API keys and with their HTTP APIs on free ports, unless a test
# asks otherwise (tests/test_auth.py turns auth on); subprocesses inherit both.
os.environ.setdefault("FLYWHEEL_AUTH_ENABLED", "false")
os.environ.setdefault("FLYWHEEL_REWARD_HTTP_PORT", "0")

REPO = Path(__file__).resolve().parents[1]
KAFKA_SH = REPO / "deploy" / "kafka" / "kafka.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def committed_offsets(bootstrap: str, group: str) -> int:
    """Offsets `group` committed, summed over partitions (read with the admin API: nothing joins the
    group). Tests wait on it: a consumer that committed everything has nothing left to (re)do."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        offsets = admin.list_group_offsets(group).get(group, {})
        return sum(meta.offset for meta in offsets.values() if meta.offset > 0)
    finally:
        admin.close()


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The `kafka` marker, set in one place: every test that uses the broker fixture (directly or
    through another fixture) gets it. Only tests that start a broker of their own mark themselves."""
    for item in items:
        if "kafka_bootstrap" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kafka)


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
    bootstrap = out.stdout.strip().splitlines()[-1]
    # As a deployment does (`flywheel create-topics`): the broker never auto-creates topics, and
    # tests that produce before any service started must not depend on test order.
    from flywheel.bus import ensure_topics

    ensure_topics(bootstrap)
    try:
        yield bootstrap
    finally:
        subprocess.run([str(KAFKA_SH), "stop", "--data-dir", str(data_dir)], timeout=60, check=False)


@pytest.fixture
def unique() -> str:
    """A short unique suffix for topic and group names, so tests never see each other's data."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def settings_factory(tmp_path: Path):
    """Settings for an in-test service: loopback, free ports (0), state under tmp_path (where tests also
    write the checkpoints they announce: the allowed checkpoint root)."""

    def make(cls=None, **overrides):
        from flywheel.runtime.config import ServiceSettings

        cls = cls or ServiceSettings
        base = dict(host="127.0.0.1", grpc_port=0, metrics_port=0, home=tmp_path / "home", shutdown_grace_s=1.0,
                    shutdown_delay_s=0.0, preference_ui_port=0, checkpoint_roots=[tmp_path])
        base.update(overrides)
        return cls(**base)

    return make


@pytest.fixture
async def serve():
    """Start ServiceRuntimes on loopback; returns "127.0.0.1:port". Stopped at teardown."""
    started = []

    async def start(runtime, ready: bool = True) -> str:
        await runtime.start(ready=ready)
        started.append(runtime)
        return f"127.0.0.1:{runtime.grpc_port}"

    yield start
    for runtime in reversed(started):
        await runtime.stop(grace=0)
