"""Kill -9 the service after the broker acknowledged an event but before the client got its ack:
the client's retry must yield exactly one event (on the topic and in the store)."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
from kafka import KafkaConsumer

from flywheel.bus import TypedProducer
from flywheel.bus.topics import PREFERENCES, ROLLOUTS
from flywheel.loop import local
from flywheel.preference.app import SERVICE_NAME
from flywheel.preference.auth import TokenStore
from flywheel.v1 import common_pb2, preference_pb2_grpc
from waiting import wait_until

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(env: dict[str, str], log: Path, hang_after_produce: Path | None = None) -> subprocess.Popen:
    """The service; with `hang_after_produce`, the test build with the fault hook injected."""
    cmd = ([sys.executable, str(Path(__file__).with_name("preference_hang_server.py")), str(hang_after_produce)]
           if hang_after_produce is not None else [sys.executable, "-m", "flywheel.preference"])
    return subprocess.Popen(cmd, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def wait_serving(target: str, proc: subprocess.Popen, log: Path, timeout_s: float = 90.0) -> None:
    try:
        local.wait_serving(target, SERVICE_NAME, timeout_s, proc)
    except (RuntimeError, TimeoutError) as exc:
        raise AssertionError(f"{exc}: {log.read_text()[-3000:]}") from exc


def records_with(bootstrap: str, needle: bytes) -> int:
    c = KafkaConsumer(PREFERENCES.name, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                      enable_auto_commit=False, group_id=None)
    try:
        found, quiet_since = 0, time.monotonic()
        while time.monotonic() - quiet_since < 2.0:
            batch = c.poll(timeout_ms=300)
            if batch:
                quiet_since = time.monotonic()
            found += sum(needle in r.value for records in batch.values() for r in records)
        return found
    finally:
        c.close()


def stored(db: Path, event_id: str) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT count(*) FROM events WHERE event_id = ?", (event_id,)).fetchone()[0]


def test_kill_between_produce_and_ack_then_retry_yields_exactly_one_event(kafka_bootstrap, tmp_path, unique):
    home = tmp_path / "home"
    hang = tmp_path / "hang-after-produce"
    port = free_port()
    target = f"127.0.0.1:{port}"
    env = {**os.environ, "FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "FLYWHEEL_HOST": "127.0.0.1",
           "FLYWHEEL_GRPC_PORT": str(port), "FLYWHEEL_METRICS_ENABLED": "false", "FLYWHEEL_HOME": str(home),
           "FLYWHEEL_PREFERENCE_UI_PORT": "0",
           "FLYWHEEL_SHUTDOWN_DELAY_S": "0"}
    tokens = TokenStore(home / "preference" / "auth.sqlite")
    token = tokens.issue("alice")
    tokens.close()
    prompt_id = f"crash-{unique}"
    rollouts = [common_pb2.Rollout(rollout_id=f"{prompt_id}-{i}", prompt_id=prompt_id, response_text=f"answer {i}",
                                   policy_version="policy-0001") for i in range(3)]
    producer = TypedProducer(kafka_bootstrap, client_id="test")
    for r in rollouts:
        producer.send(ROLLOUTS, r, key=prompt_id)
    producer.flush()
    producer.close()

    request = common_pb2.Ranking(event_id=f"evt-{uuid.uuid4().hex}", rater_id="alice", prompt_id=prompt_id,
                                 responses=[common_pb2.ResponseRef(response_id=r.rollout_id) for r in rollouts],
                                 ranks=[2, 1, 3])
    metadata = (("authorization", f"Bearer {token}"),)
    log = tmp_path / "service.log"
    proc = start(env, log, hang_after_produce=hang)
    try:
        wait_serving(target, proc, log)
        with grpc.insecure_channel(target) as ch:
            stub = preference_pb2_grpc.PreferenceServiceStub(ch)
            call = stub.SubmitRanking.future(request, metadata=metadata, timeout=60)
            wait_until(hang.exists, 30, what=f"the produce/ack window (log: {log})")
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            with pytest.raises(grpc.RpcError) as err:
                call.result()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, "the client never got an ack"
        assert records_with(kafka_bootstrap, request.event_id.encode()) == 1, "the broker has the event"
        # (The store may already hold it: the service's own topic follower can apply the record before the kill.)

        proc = start(env, log)
        wait_serving(target, proc, log)
        with grpc.insecure_channel(target) as ch:
            ack = preference_pb2_grpc.PreferenceServiceStub(ch).SubmitRanking(request, metadata=metadata, timeout=30)
        assert ack.duplicate and ack.event_id == request.event_id
        assert records_with(kafka_bootstrap, request.event_id.encode()) == 1, "the retry produced nothing new"
        assert stored(home / "preference" / "store.sqlite", request.event_id) == 1
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
