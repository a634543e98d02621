"""Followers: replay a topic into the store, offsets committed in the same SQLite transaction.

Every instance of the preference service needs *all* rollouts (to know response ids) and *all*
preference events (its store feeds the aggregation), so a follower assigns itself every partition
instead of joining a consumer group that would split them. Where it resumes comes from the store:
a fresh store (new file) replays the topic from the beginning, an existing one from its recorded
offsets; records are applied idempotently (primary keys), so replaying twice changes nothing.
When a group id is given, the offsets are also committed to Kafka (best effort) so standard
tooling can show this consumer's lag; the store remains the source of truth.

This is why the shared `ConsumerWorker` (subscribe + group-committed offsets) is not used here.
Records that cannot be decoded go to the topic's dead-letter topic, as in the shared worker.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Callable

from google.protobuf.message import Message
from kafka import KafkaConsumer
from kafka.structs import OffsetAndMetadata, TopicPartition
from prometheus_client import Gauge

from flywheel.bus import codec
from flywheel.bus import metrics as bus_metrics
from flywheel.bus.codec import PoisonMessage
from flywheel.bus.producer import TypedProducer
from flywheel.bus.topics import Topic
from flywheel.runtime.config import ServiceSettings

log = logging.getLogger(__name__)

REPLAY_LAG = Gauge("flywheel_preference_replay_lag", "Records of a topic not yet applied to the store.", ("topic",))

# apply(records, next_offsets): records are (message, partition, offset); must be idempotent and
# persist next_offsets atomically with the records.
Apply = Callable[[list[tuple[Message, int, int]], dict[int, int]], None]


class TopicFollower:
    def __init__(self, settings: ServiceSettings, topic: Topic, apply: Apply, stored_offsets: Callable[[], dict[int, int]],
                 dead_letters: TypedProducer, *, group_id: str | None = None, max_records: int = 1000,
                 live_interval_s: float = 0.0) -> None:
        """`live_interval_s` > 0 (for a topic this service also writes): once caught up, check every
        interval and fetch only records nobody stored here within an interval (see `_due_partitions`)."""
        self._live_interval_s = live_interval_s
        self.settings = settings
        self.topic = topic
        self._apply = apply
        self._stored_offsets = stored_offsets
        self._dead_letters = dead_letters
        self._group_id = group_id
        self._max_records = max_records
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.caught_up = threading.Event()
        self.applied = 0
        self.failures = 0

    # BackgroundWorker protocol
    async def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"follow-{self.topic.name}", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    async def wait_caught_up(self, timeout_s: float) -> bool:
        return await asyncio.to_thread(self.caught_up.wait, timeout_s)

    def _consumer(self) -> KafkaConsumer:
        s = self.settings
        return KafkaConsumer(
            bootstrap_servers=s.bootstrap_servers, client_id=f"{s.kafka_client_id}-{s.service_name}-follower",
            group_id=self._group_id, enable_auto_commit=False, auto_offset_reset="earliest",
            max_poll_records=self._max_records, **s.kafka_client_config())

    def _run(self) -> None:
        backoff = self.settings.kafka_retry_backoff_s
        while not self._stop.is_set():
            try:
                self._follow()
                return
            except Exception:  # noqa: BLE001 - reconnect and resume from the store's offsets
                self.failures += 1
                log.exception("follower of %s failed; resuming in %.1fs", self.topic.name, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def _follow(self) -> None:
        consumer = self._consumer()
        try:
            partitions = None
            while partitions is None and not self._stop.is_set():
                partitions = consumer.partitions_for_topic(self.topic.name)
                if partitions is None:
                    self._stop.wait(0.5)
            if self._stop.is_set():
                return
            tps = [TopicPartition(self.topic.name, p) for p in sorted(partitions)]
            consumer.assign(tps)
            stored = self._stored_offsets()
            for tp in tps:
                if tp.partition in stored:
                    consumer.seek(tp, stored[tp.partition])
                else:
                    consumer.seek_to_beginning(tp)
            targets = consumer.end_offsets(tps)
            labels = (self.topic.name, self._group_id or "store")
            behind: dict[TopicPartition, tuple[int, float]] = {}  # live mode: (end offset seen, since when)
            while not self._stop.is_set():
                limit: dict[TopicPartition, int] | None = None
                if self._live_interval_s > 0 and self.caught_up.is_set():
                    limit = self._due_partitions(consumer, tps, behind)
                    if limit is None:
                        break
                    if not limit:
                        continue
                raw = consumer.poll(timeout_ms=self.settings.kafka_poll_timeout_ms, max_records=self._max_records)
                batch: list[tuple[Message, int, int]] = []
                next_offsets: dict[int, int] = {}
                for tp, records in raw.items():
                    for record in records:
                        if limit is not None and record.offset >= limit.get(tp, 0):
                            consumer.seek(tp, record.offset)  # newer: the live path may still be storing it
                            break
                        next_offsets[tp.partition] = record.offset + 1
                        try:
                            value = codec.decode(self.topic, record.value, record.headers)
                        except PoisonMessage as exc:
                            self._dead_letter(record, str(exc))
                            continue
                        batch.append((value, tp.partition, record.offset))
                if next_offsets:
                    self._apply(batch, next_offsets)
                    self.applied += len(batch)
                    bus_metrics.CONSUMED.labels(*labels).inc(len(batch))
                    if self._group_id:
                        try:
                            consumer.commit({TopicPartition(self.topic.name, p): OffsetAndMetadata(o, "", -1)
                                             for p, o in next_offsets.items()})
                        except Exception as exc:  # noqa: BLE001 - informational only
                            log.debug("offset commit for %s failed: %s", self.topic.name, exc)
                if limit is not None:
                    continue
                lag = 0
                for tp in tps:
                    end = consumer.highwater(tp)
                    if end is not None:
                        lag += max(0, end - consumer.position(tp))
                REPLAY_LAG.labels(self.topic.name).set(lag)
                if not self.caught_up.is_set() and all(consumer.position(tp) >= targets[tp] for tp in tps):
                    log.info("store caught up with %s (%d records applied)", self.topic.name, self.applied)
                    self.caught_up.set()
        finally:
            consumer.close(autocommit=False)

    def _due_partitions(self, consumer: KafkaConsumer, tps: list[TopicPartition],
                        behind: dict[TopicPartition, tuple[int, float]]) -> dict[TopicPartition, int] | None:
        """Live mode: which partitions to fetch, and up to which offset (None: stopping).

        The live path stores this instance's own records within milliseconds and advances the
        store's offsets past them, so normally nothing is fetched at all. A partition whose stored
        offset stays below an end offset seen at least one interval ago holds records nobody stored
        here (another instance's, or ones whose store write failed): those, up to that end offset,
        are fetched and applied. Fetching is otherwise paused, so no record is parsed twice.
        """
        if self._stop.wait(self._live_interval_s):
            return None
        stored = self._stored_offsets()
        ends = consumer.end_offsets(tps)
        now = time.monotonic()
        due: dict[TopicPartition, int] = {}
        for tp in tps:
            done = stored.get(tp.partition, 0)
            if done >= ends[tp]:
                behind.pop(tp, None)
                continue
            seen_end, since = behind.get(tp, (ends[tp], now))
            if done >= seen_end:  # what lagged before has been stored; watch the new end
                seen_end, since = ends[tp], now
            behind[tp] = (seen_end, since)
            if now - since >= self._live_interval_s:
                due[tp] = seen_end
        paused = set(consumer.paused())
        for tp in tps:
            if tp in due:
                if consumer.position(tp) < stored.get(tp.partition, 0):
                    consumer.seek(tp, stored[tp.partition])
                if tp in paused:
                    consumer.resume(tp)
            elif tp not in paused:
                consumer.pause(tp)
        REPLAY_LAG.labels(self.topic.name).set(sum(max(0, ends[tp] - stored.get(tp.partition, 0)) for tp in tps))
        return due

    def _dead_letter(self, record, reason: str) -> None:
        log.warning("dead-lettering %s[%d]@%d: %s", self.topic.name, record.partition, record.offset, reason)
        headers = [(k, v) for k, v in (record.headers or []) if not k.startswith("flywheel-error")]
        headers += [
            (codec.HEADER_ERROR_TYPE, b"PoisonMessage"),
            (codec.HEADER_ERROR_MESSAGE, reason.encode()[:4096]),
            (codec.HEADER_ORIGINAL_TOPIC, self.topic.name.encode()),
            (codec.HEADER_ORIGINAL_PARTITION, str(record.partition).encode()),
            (codec.HEADER_ORIGINAL_OFFSET, str(record.offset).encode()),
            (codec.HEADER_CONSUMER_GROUP, (self._group_id or "flywheel-preference-store").encode()),
        ]
        self._dead_letters.send_dead_letter(self.topic.dlq, value=record.value, key=record.key, headers=headers)
        bus_metrics.DEAD_LETTERED.labels(self.topic.name, self._group_id or "store").inc()


