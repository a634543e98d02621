"""Kafka SASL_SSL end to end: a real broker with a test-made CA, PLAIN and SCRAM-SHA-512 users.

The broker is the project's launcher (deploy/kafka/kafka.sh --sasl-ssl-port ...); every client
is built from ServiceSettings the way the services build theirs (kafka_client_config()), so the
topic admin, producer, consumer and a whole service (the reward scoring worker) all authenticate.
Cost: one extra broker start (~20 s on an idle 2-core machine) and a few seconds of traffic.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
from conftest import KAFKA_SH, free_port
from kafka.admin import KafkaAdminClient
from tls_certs import make_pki
from waiting import wait_until, wait_until_async

from flywheel.bus import Topic, consumer_for, ensure_topics_for, producer_for
from flywheel.reward.app import build_app
from flywheel.reward.settings import RewardSettings
from flywheel.runtime.config import ServiceSettings
from flywheel.v1 import common_pb2

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

USERS = {"PLAIN": ("rater-gateway", "plain-secret"), "SCRAM-SHA-512": ("flywheel-reward", "scram-secret")}


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    pki = make_pki(tmp_path_factory.mktemp("kafka-pki"))
    data_dir = tmp_path_factory.mktemp("kafka-sasl")
    sasl_port = free_port()
    out = subprocess.run(
        [str(KAFKA_SH), "start", "--data-dir", str(data_dir), "--port", str(free_port()),
         "--controller-port", str(free_port()), "--heap", "256m", "--sasl-ssl-port", str(sasl_port),
         "--tls-dir", str(pki), "--plain-user", ":".join(USERS["PLAIN"]),
         "--scram-user", ":".join(USERS["SCRAM-SHA-512"])],
        capture_output=True, text=True, timeout=240)
    if out.returncode != 0:
        raise RuntimeError(f"could not start the SASL_SSL broker: {out.stderr}")
    try:
        yield f"127.0.0.1:{sasl_port}", pki
    finally:
        subprocess.run([str(KAFKA_SH), "stop", "--data-dir", str(data_dir)], timeout=60, check=False)


def secure(cls, bootstrap: str, pki: Path, mechanism: str, password: str | None = None, **more):
    user, secret = USERS[mechanism]
    return cls(kafka_bootstrap_servers=bootstrap, kafka_security_protocol="SASL_SSL",
               kafka_sasl_mechanism=mechanism, kafka_sasl_username=user,
               kafka_sasl_password=password or secret, kafka_ssl_cafile=pki / "ca.crt", **more)


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-512"])
def test_admin_producer_and_consumer_authenticate(secure_broker, mechanism: str, unique: str) -> None:
    bootstrap, pki = secure_broker
    settings = secure(ServiceSettings, bootstrap, pki, mechanism, kafka_topic_partitions=1)
    topic = Topic(f"test.secure.{unique}", common_pb2.Rollout)
    assert ensure_topics_for(settings, [topic]) == [topic.name, topic.dlq]  # the admin client
    producer = producer_for(settings)
    consumer = consumer_for(settings, topic, f"g-{unique}", producer)
    try:
        producer.send_and_wait(topic, common_pb2.Rollout(rollout_id="r1"), key="p")
        got = wait_until(lambda: consumer.poll(timeout_ms=500), 60, interval_s=0, what="r1 delivered")
        assert [d.value.rollout_id for d in got] == ["r1"]
    finally:
        consumer.close()
        producer.close()


@pytest.mark.parametrize("mechanism, password, ca", [
    ("SCRAM-SHA-512", "wrong", "ca.crt"),
    ("PLAIN", "wrong", "ca.crt"),
    ("PLAIN", None, "other-ca.crt"),  # right password, broker certificate from a CA the client does not trust
])
def test_wrong_credentials_or_ca_are_refused(secure_broker, mechanism: str, password: str | None, ca: str) -> None:
    bootstrap, pki = secure_broker
    settings = secure(ServiceSettings, bootstrap, pki, mechanism, password)
    config = {**settings.kafka_client_config(), "ssl_cafile": str(pki / ca)}
    with pytest.raises(Exception, match="bootstrap|Authentication|SASL"):
        KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, bootstrap_timeout_ms=5000,
                         request_timeout_ms=5000, **config).list_topics()


async def test_reward_service_scores_through_sasl_ssl(secure_broker, unique, settings_factory, serve) -> None:
    bootstrap, pki = secure_broker
    settings = settings_factory(
        RewardSettings, **dict(secure(dict, bootstrap, pki, "SCRAM-SHA-512")), reward_scorer="vader",
        reward_reload_enabled=False, kafka_consumer_group=f"flywheel-reward-{unique}", kafka_poll_timeout_ms=200,
        kafka_topic_partitions=1)
    rollouts = Topic(f"test.rollouts.{unique}", common_pb2.Rollout)
    scored = Topic(f"test.scored.{unique}", common_pb2.ScoredRollout)
    app = build_app(settings, rollouts_topic=rollouts, scored_topic=scored,
                    versions_topic=Topic(f"test.versions.{unique}", common_pb2.ModelVersion))
    await serve(app.runtime)

    client = secure(ServiceSettings, bootstrap, pki, "PLAIN", service_name="test")
    producer = producer_for(client)
    reader = consumer_for(client, scored, f"reader-{unique}", producer)
    try:
        for i in range(3):
            producer.send(rollouts, common_pb2.Rollout(rollout_id=f"r{i}", prompt_id="p", raw_prompt="How are you?",
                                                       response_text=["Great, thanks!", "Awful.", "Fine."][i]))
        await asyncio.to_thread(producer.flush, 30)
        got: dict[str, float] = {}

        async def all_scored() -> bool:
            for delivery in await asyncio.to_thread(reader.poll, 500):
                got[delivery.value.rollout.rollout_id] = delivery.value.reward
            return len(got) >= 3

        await wait_until_async(all_scored, 90, interval_s=0, what="three scored rollouts")
        assert set(got) == {"r0", "r1", "r2"}
        assert got["r0"] > got["r1"]  # VADER: "Great, thanks!" is more positive than "Awful."
    finally:
        reader.close()
        producer.close()
