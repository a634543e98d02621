"""The Kafka bus against the real broker: round trips, dead letters, at-least-once commits."""

from __future__ import annotations


import pytest
from kafka import KafkaConsumer

from flywheel.bus import ConsumerWorker, Rejection, Topic, TypedConsumer, TypedProducer, ensure_topics
from flywheel.bus import codec
from flywheel.v1 import common_pb2
from waiting import wait_until, wait_until_async

def rollout(i: int) -> common_pb2.Rollout:
    return common_pb2.Rollout(
        rollout_id=f"r{i}", prompt_id=f"p{i % 3}", response_text=f"response {i}",
        response_token_ids=[1, 2, 3], token_logprobs=[-0.5, -1.0, -0.25], policy_version="policy-0001",
    )


@pytest.fixture
def topic(kafka_bootstrap: str, unique: str) -> Topic:
    t = Topic(f"test.rollouts.{unique}", common_pb2.Rollout)
    ensure_topics(kafka_bootstrap, [t], partitions=2)
    return t


@pytest.fixture
def producer(kafka_bootstrap: str):
    p = TypedProducer(kafka_bootstrap, client_id="test")
    yield p
    p.close()


def consumer(kafka_bootstrap: str, topic: Topic, producer: TypedProducer, group: str) -> TypedConsumer:
    return TypedConsumer(topic, bootstrap_servers=kafka_bootstrap, group_id=group, dead_letters=producer,
                         max_poll_records=100)


def poll_until(c: TypedConsumer, n: int, timeout_s: float = 30.0) -> list:
    got: list = []
    wait_until(lambda: got.extend(c.poll(timeout_ms=200)) or len(got) >= n, timeout_s, interval_s=0,
               what=f"{n} records")
    return got


def run_until(worker: ConsumerWorker, condition, what: str, tolerate: tuple[type[Exception], ...] = ()) -> None:
    """Run the worker's poll-handle-commit cycle until `condition()` holds; errors of the `tolerate`
    types (a failing handler's) count as "not yet"."""
    def cycle():
        try:
            worker.run_once()
        except tolerate:
            pass
        return condition()

    wait_until(cycle, interval_s=0, what=what)


def raw_records(kafka_bootstrap: str, topic_name: str, n: int, timeout_s: float = 30.0) -> list:
    raw = KafkaConsumer(topic_name, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest",
                        enable_auto_commit=False, group_id=None)
    try:
        got: list = []

        def enough() -> bool:
            for records in raw.poll(timeout_ms=200).values():
                got.extend(records)
            return len(got) >= n

        wait_until(enough, timeout_s, interval_s=0, what=f"{n} raw records")
        return got
    finally:
        raw.close()


def test_ensure_topics_creates_topic_and_dlq_idempotently(kafka_bootstrap: str, unique: str) -> None:
    t = Topic(f"test.ensure.{unique}", common_pb2.Prompt)
    created = ensure_topics(kafka_bootstrap, [t], partitions=2)
    assert sorted(created) == sorted([t.name, t.dlq])
    assert ensure_topics(kafka_bootstrap, [t], partitions=2) == []


def test_round_trip_preserves_message_key_and_headers(kafka_bootstrap, topic, producer, unique) -> None:
    sent = [rollout(i) for i in range(10)]
    for m in sent:
        producer.send(topic, m, key=m.prompt_id, trace_id=f"trace-{m.rollout_id}")
    producer.flush()

    c = consumer(kafka_bootstrap, topic, producer, f"g-{unique}")
    try:
        got = poll_until(c, 10)
    finally:
        c.close()
    assert sorted(d.value.rollout_id for d in got) == sorted(m.rollout_id for m in sent)
    by_id = {d.value.rollout_id: d for d in got}
    for m in sent:
        d = by_id[m.rollout_id]
        assert d.value == m
        assert d.key == m.prompt_id
        assert d.trace_id == f"trace-{m.rollout_id}"
        assert d.headers[codec.HEADER_MESSAGE_TYPE] == "flywheel.v1.Rollout"
        assert d.headers[codec.HEADER_SCHEMA_VERSION] == "1"
        assert d.headers[codec.HEADER_CONTENT_TYPE] == "application/x-protobuf"
    # same key -> same partition, so per-prompt order is kept
    partitions_by_key: dict[str, set[int]] = {}
    for d in got:
        partitions_by_key.setdefault(d.key, set()).add(d.partition)
    assert all(len(p) == 1 for p in partitions_by_key.values())


def test_producer_refuses_wrong_message_type(topic, producer) -> None:
    with pytest.raises(TypeError, match="flywheel.v1.Rollout"):
        producer.send(topic, common_pb2.Prompt(prompt_id="x"))


def test_consumer_of_a_topic_created_after_subscribing_gets_its_records_with_short_polls(
        kafka_bootstrap, producer, unique) -> None:
    # The topic appears after the group formed (empty assignment), so kafka-python rejoins on the
    # metadata change; with 1 ms polls that join always finishes between polls, which kafka-python
    # 3.0.12 then never applies (no partitions, no heartbeats, no error). TypedConsumer must rejoin.
    late = Topic(f"test.late.{unique}", common_pb2.Rollout)
    c = consumer(kafka_bootstrap, late, producer, f"g-{unique}")
    try:
        wait_until(lambda: c.poll(timeout_ms=100) == [] and c._consumer._coordinator.stable(), 30, interval_s=0,
                   what="the group to form around a topic that does not exist yet")
        assert c._consumer.assignment() == set()
        ensure_topics(kafka_bootstrap, [late], partitions=2, with_dlq=False)
        producer.send(late, rollout(1), key="p1")
        producer.flush()
        got: list = []
        wait_until(lambda: got.extend(c.poll(timeout_ms=1)) or got, 30, interval_s=0,
                   what="the record of the late topic")
        assert [d.value.rollout_id for d in got] == ["r1"]
        assert len(c._consumer.assignment()) == 2
    finally:
        c.close()


def test_poison_message_goes_to_dlq_and_consumer_moves_on(kafka_bootstrap, topic, producer, unique) -> None:
    producer.send(topic, rollout(1), key="p1")
    # Undecodable bytes, then a record that declares another type: both poison.
    producer._send_raw(topic.name, b"\xff\xff\xff not protobuf", b"p1",
                       [(codec.HEADER_MESSAGE_TYPE, b"flywheel.v1.Rollout")])
    producer._send_raw(topic.name, common_pb2.Prompt(prompt_id="x").SerializeToString(), b"p1",
                       [(codec.HEADER_MESSAGE_TYPE, b"flywheel.v1.Prompt")])
    producer.send(topic, rollout(2), key="p1")
    producer.flush()

    handled: list[str] = []
    worker = ConsumerWorker(consumer(kafka_bootstrap, topic, producer, f"g-{unique}"),
                            lambda batch: handled.extend(d.value.rollout_id for d in batch))
    run_until(worker, lambda: len(handled) >= 2, "r1 and r2 handled")
    worker.consumer.close()
    assert handled == ["r1", "r2"], "the consumer must skip poison records and keep going"

    dead = raw_records(kafka_bootstrap, topic.dlq, 2)
    assert len(dead) == 2
    errors = [codec.header_dict(r.headers) for r in dead]
    assert {e[codec.HEADER_ERROR_TYPE] for e in errors} == {"PoisonMessage"}
    assert "cannot decode" in errors[0][codec.HEADER_ERROR_MESSAGE]
    assert "flywheel.v1.Prompt" in errors[1][codec.HEADER_ERROR_MESSAGE]
    assert all(e[codec.HEADER_ORIGINAL_TOPIC] == topic.name for e in errors)
    assert dead[0].value == b"\xff\xff\xff not protobuf", "the original bytes are preserved"

    # Offsets were committed past the poison (offsets 1 and 2 of the key's partition; r2 at 3 may or
    # may not be committed yet when the worker stops): a restarted consumer never sees the poison again.
    again = consumer(kafka_bootstrap, topic, producer, f"g-{unique}")
    try:
        untouched, keyed = sorted(o or 0 for o in (again.committed(p) for p in range(2)))
        assert untouched == 0 and keyed in (3, 4), (untouched, keyed)
    finally:
        again.close()


def test_handler_rejection_is_dead_lettered_with_reason(kafka_bootstrap, topic, producer, unique) -> None:
    for i in range(3):
        producer.send(topic, rollout(i), key="same")
    producer.flush()

    def handler(batch):
        return [Rejection(d, "token_logprobs: length mismatch") for d in batch if d.value.rollout_id == "r1"]

    worker = ConsumerWorker(consumer(kafka_bootstrap, topic, producer, f"g-{unique}"), handler)
    run_until(worker, lambda: worker.handled >= 3, "3 records handled")
    worker.consumer.close()
    dead = raw_records(kafka_bootstrap, topic.dlq, 1)
    assert len(dead) == 1
    h = codec.header_dict(dead[0].headers)
    assert h[codec.HEADER_ERROR_MESSAGE] == "token_logprobs: length mismatch"
    assert h[codec.HEADER_MESSAGE_TYPE] == "flywheel.v1.Rollout"
    assert common_pb2.Rollout.FromString(dead[0].value).rollout_id == "r1"


def test_failing_handler_commits_nothing_and_message_is_redelivered(kafka_bootstrap, topic, producer, unique):
    group = f"g-{unique}"
    producer.send(topic, rollout(7), key="k")
    producer.flush()

    attempts: list[str] = []

    def broken(batch):
        attempts.extend(d.value.rollout_id for d in batch)
        raise ConnectionError("downstream unavailable")

    worker = ConsumerWorker(consumer(kafka_bootstrap, topic, producer, group), broken)
    run_until(worker, lambda: len(attempts) >= 2, "two attempts", tolerate=(ConnectionError,))
    # It was retried in place (rewound), not skipped.
    assert attempts[:2] == ["r7", "r7"]
    partition = next(iter({p for p in range(2) if worker.consumer.committed(p) is not None}), None)
    assert partition is None, "nothing may be committed while the handler fails"
    worker.consumer.close()  # the process "dies" here

    handled: list[str] = []
    restarted = ConsumerWorker(consumer(kafka_bootstrap, topic, producer, group),
                               lambda batch: handled.extend(d.value.rollout_id for d in batch))
    run_until(restarted, lambda: handled, "r7 redelivered")
    committed = {p: restarted.consumer.committed(p) for p in range(2)}
    restarted.consumer.close()
    assert handled == ["r7"]
    assert max(o or 0 for o in committed.values()) == 1


async def test_worker_thread_retries_until_handler_recovers(kafka_bootstrap, topic, producer, unique):
    producer.send(topic, rollout(3), key="k")
    producer.flush()
    calls: list[int] = []
    done: list[str] = []

    def flaky(batch):
        calls.append(len(batch))
        if len(calls) < 3:
            raise RuntimeError("transient")
        done.extend(d.value.rollout_id for d in batch)

    worker = ConsumerWorker(consumer(kafka_bootstrap, topic, producer, f"g-{unique}"), flaky,
                            retry_backoff_s=0.05)
    await worker.start()
    await wait_until_async(lambda: done, what="the handler to recover")
    await worker.stop()
    assert done == ["r3"]
    assert worker.failures == 2


def test_units_of_a_poll_are_committed_as_they_finish(kafka_bootstrap, producer, unique):
    """With commit_every, a failure in the third unit leaves the first two committed: a restart
    replays one unit, not the whole poll."""
    topic = Topic(f"test.units.{unique}", common_pb2.Rollout)
    ensure_topics(kafka_bootstrap, [topic], partitions=1)
    for i in range(10):
        producer.send(topic, rollout(i), key="k")
    producer.flush()
    handled: list[str] = []

    def fails_on_r4(batch):
        if any(d.value.rollout_id == "r4" for d in batch):
            raise ConnectionError("downstream unavailable")
        handled.extend(d.value.rollout_id for d in batch)

    group = f"g-{unique}"
    worker = ConsumerWorker(consumer(kafka_bootstrap, topic, producer, group), fails_on_r4, commit_every=2)

    def until_the_failing_unit() -> bool:
        try:
            worker.run_once()
        except ConnectionError:
            return True
        return False

    wait_until(until_the_failing_unit, interval_s=0, what="the unit with r4 to fail")
    committed = worker.consumer.committed(0)
    worker.consumer.close()
    assert handled == ["r0", "r1", "r2", "r3"]
    assert committed == 4  # r4 and r5 (the failed unit) and everything after are redelivered


def test_a_failing_lag_query_is_not_a_handler_failure(kafka_bootstrap, topic, producer, unique, caplog):
    from flywheel.bus import metrics

    producer.send(topic, rollout(1), key="k")
    producer.flush()
    handled: list[str] = []
    worker = ConsumerWorker(consumer(kafka_bootstrap, topic, producer, f"g-{unique}"),
                            lambda batch: handled.extend(d.value.rollout_id for d in batch))

    lag_queries: list[int] = []

    def broker_gone() -> int:  # what consumer.lag() raised when the broker vanished
        lag_queries.append(1)
        raise TimeoutError("metadata unavailable")

    worker.consumer.lag = broker_gone  # type: ignore[method-assign]
    labels = (topic.name, f"g-{unique}")
    before = metrics.HANDLER_FAILURES.labels(*labels)._value.get()
    worker.start_thread()
    try:
        wait_until(lambda: handled and len(lag_queries) >= 3, 30, what="handled, then three failed lag queries")
    finally:
        assert worker.join(30)
    assert handled == ["r1"]
    assert worker.failures == 0
    assert metrics.HANDLER_FAILURES.labels(*labels)._value.get() == before
    assert "handler failed" not in caplog.text




@pytest.mark.kafka  # starts a broker of its own (not the kafka_bootstrap fixture)
def test_kafka_launcher_start_status_stop(tmp_path) -> None:
    """deploy/kafka/kafka.sh: a second broker starts on its own port, answers, and stops cleanly."""
    import subprocess

    from conftest import KAFKA_SH, free_port

    data = tmp_path / "k2"
    port = free_port()
    out = subprocess.run([str(KAFKA_SH), "start", "--data-dir", str(data), "--port", str(port), "--heap", "256m"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    try:
        assert out.stdout.strip().endswith(f"127.0.0.1:{port}")
        assert subprocess.run([str(KAFKA_SH), "status", "--data-dir", str(data)]).returncode == 0
        assert ensure_topics(f"127.0.0.1:{port}", [Topic("launcher.check", common_pb2.Prompt)], partitions=1)
    finally:
        subprocess.run([str(KAFKA_SH), "stop", "--data-dir", str(data)], timeout=60)
    assert subprocess.run([str(KAFKA_SH), "status", "--data-dir", str(data)]).returncode != 0
    assert not (data / "kafka.pid").exists()


def test_read_topic_snapshot_skips_poison_and_feeds_the_sft_loader(kafka_bootstrap, producer, unique) -> None:
    from flywheel.bus.snapshot import read_topic
    from flywheel.trainer.sft import load_demonstrations_from_topic

    t = Topic(f"test.preferences.{unique}", common_pb2.PreferenceEvent)
    ensure_topics(kafka_bootstrap, [t], partitions=2)
    for i in range(2):
        demo = common_pb2.Demonstration(event_id=f"d{i}", prompt_id="p", prompt_text="q", response_text=f"a{i}")
        producer.send(t, common_pb2.PreferenceEvent(demonstration=demo), key="p")
    producer.send(t, common_pb2.PreferenceEvent(ranking=common_pb2.Ranking(event_id="r", prompt_id="p")), key="p")
    producer._send_raw(t.name, b"\xff\xff not protobuf", b"p", [])
    producer.flush()

    got = list(read_topic(kafka_bootstrap, t, timeout_s=30))
    assert len(got) == 3, "the poison record is skipped, every other record read once"
    assert sorted(m.WhichOneof("event") for _, _, m in got) == ["demonstration", "demonstration", "ranking"]
    demos = load_demonstrations_from_topic(kafka_bootstrap, t.name)
    assert sorted(d.event_id for d in demos) == ["d0", "d1"]


async def test_acknowledged_awaits_each_record_without_a_thread(kafka_bootstrap, topic, producer) -> None:
    from kafka.future import Future

    from flywheel.bus.producer import acknowledged

    futures = [producer.send(topic, rollout(i), key=f"p{i}") for i in range(5)]
    results = await acknowledged(futures, timeout_s=30)
    assert all(not isinstance(r, Exception) for r in results), results
    assert sorted((r.partition, r.offset) for r in results) == sorted((f.get().partition, f.get().offset) for f in futures)
    [late] = await acknowledged([Future()], timeout_s=0.2)  # a record the broker never answers
    assert type(late).__name__ == "KafkaTimeoutError"
