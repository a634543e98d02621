"""Followers: replay a topic into the store, offsets committed in the same SQLite transaction.

Every instance of the preference service needs *all* rollouts (to know response ids) and *all*
preference events (its store feeds the aggregation), so a follower assigns itself every partition
instead of joining a consumer group that would split them. Where it resumes comes from the store:
a fresh store (new file) replays the topic from the beginning, an existing one from its recorded
offsets; records are applied idempotently (primary keys), so replaying twice changes nothing.
When a group id is given, the offsets are also committed to Kafka (best effort) so standard
tooling can show this consumer's lag; the store remains the source of truth.

So a follower assigns partitions itself instead of using `ConsumerWorker` (subscribe +
group-committed offsets), but it runs on the same `ConsumerThread` loop (backoff, metrics,
lifecycle) and dead-letters through the same `DeadLetterer`.
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
from flywheel.bus.deadletter import DeadLetterer
from flywheel.bus.factory import client_config
from flywheel.bus.producer import TypedProducer
from flywheel.bus.topics import Topic
from flywheel.bus.worker import ConsumerThread
from flywheel.runtime.config import ServiceSettings

log = logging.getLogger(__name__)

REPLAY_LAG = Gauge("flywheel_preference_replay_lag", "Records of a topic not yet applied to the store.", ("topic",))

# apply(records, next_offsets): records are (message, partition, offset); must be idempotent and
# persist next_offsets atomically with the records.
Apply = Callable[[list[tuple[Message, int, int]], dict[int, int]], None]


class TopicFollower(ConsumerThread):
    def __init__(self, settings: ServiceSettings, topic: Topic, apply: Apply, stored_offsets: Callable[[], dict[int, int]],
                 dead_letters: TypedProducer, *, group_id: str | None = None, max_records: int = 1000,
                 live_interval_s: float = 0.0) -> None:
        """`live_interval_s` > 0 (for a topic this service also writes): once caught up, check every
        interval and fetch only records nobody stored here within an interval (see `_due_partitions`)."""
        group = group_id or "store"
        super().__init__(name=f"follow-{topic.name}", topic=topic.name, group=group,
                         retry_backoff_s=settings.kafka_retry_backoff_s)
        self._live_interval_s = live_interval_s
        self.settings = settings
        self.topic = topic
        self._apply = apply
        self._stored_offsets = stored_offsets
        self._dead_letters = DeadLetterer(dead_letters, group_id or "flywheel-preference-store")
        self._group_id = group_id
        self._max_records = max_records
        self.caught_up = threading.Event()
        self.applied = 0
        # Per connection (dropped by recover(): the next step reconnects and resumes from the store).
        self._consumer: KafkaConsumer | None = None
        self._tps: list[TopicPartition] = []
        self._targets: dict[TopicPartition, int] = {}
        self._behind: dict[TopicPartition, tuple[int, float]] = {}  # live mode: (end offset seen, since when)
        self._lag: int | None = None

    async def wait_caught_up(self, timeout_s: float) -> bool:
        return await asyncio.to_thread(self.caught_up.wait, timeout_s)

    def _connect(self) -> KafkaConsumer | None:
        s = self.settings
        consumer = KafkaConsumer(
            **{**client_config(s), "client_id": f"{s.kafka_client_id}-{s.service_name}-follower"},
            group_id=self._group_id, enable_auto_commit=False, auto_offset_reset="earliest",
            max_poll_records=self._max_records)
        partitions = None
        while partitions is None and not self.stopping:
            partitions = consumer.partitions_for_topic(self.topic.name)
            if partitions is None:
                self._stop.wait(0.5)
        if partitions is None:
            consumer.close(autocommit=False)
            return None
        tps = [TopicPartition(self.topic.name, p) for p in sorted(partitions)]
        consumer.assign(tps)
        stored = self._stored_offsets()
        for tp in tps:
            if tp.partition in stored:
                consumer.seek(tp, stored[tp.partition])
            else:
                consumer.seek_to_beginning(tp)
        self._tps, self._targets, self._behind = tps, consumer.end_offsets(tps), {}
        return consumer

    def step(self) -> None:
        if self._consumer is None:
            self._consumer = self._connect()
            if self._consumer is None:
                return
        consumer, tps = self._consumer, self._tps
        limit: dict[TopicPartition, int] | None = None
        if self._live_interval_s > 0 and self.caught_up.is_set():
            limit = self._due_partitions(consumer, tps, self._behind)
            if not limit:  # None: stopping; {}: nothing due
                return
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
                    self._dead_letters.forward(self.topic, value=record.value, key=record.key,
                                               headers=record.headers or [], partition=record.partition,
                                               offset=record.offset, error_type="PoisonMessage", reason=str(exc))
                    continue
                batch.append((value, tp.partition, record.offset))
        if next_offsets:
            self._apply(batch, next_offsets)
            self.applied += len(batch)
            bus_metrics.CONSUMED.labels(*self.labels).inc(len(batch))
            if self._group_id:
                try:
                    consumer.commit({TopicPartition(self.topic.name, p): OffsetAndMetadata(o, "", -1)
                                     for p, o in next_offsets.items()})
                except Exception as exc:  # noqa: BLE001 - informational only
                    log.debug("offset commit for %s failed: %s", self.topic.name, exc)
        if limit is not None:
            return
        lag = 0
        for tp in tps:
            end = consumer.highwater(tp)
            if end is not None:
                lag += max(0, end - consumer.position(tp))
        self._lag = lag
        REPLAY_LAG.labels(self.topic.name).set(lag)
        if not self.caught_up.is_set() and all(consumer.position(tp) >= self._targets[tp] for tp in tps):
            log.info("store caught up with %s (%d records applied)", self.topic.name, self.applied)
            self.caught_up.set()

    def lag(self) -> int | None:
        return self._lag

    def recover(self) -> None:
        """Reconnect on the next step and resume from the store's offsets."""
        self.close()

    def close(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
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
