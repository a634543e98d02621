"""Typed protobuf consumer with at-least-once delivery, and the worker loop every service uses.

Offsets are committed only after the handler succeeded (never auto-committed). A record that can
never be processed (undecodable, wrong type, rejected as invalid by the handler) is forwarded to
`<topic>.dlq` with the error in its headers, then committed past, so one bad record cannot stall
a partition. A handler that *raises* is treated as a transient failure: nothing is committed,
the consumer rewinds to the batch's first offsets and retries with exponential backoff; if the
process dies meanwhile, the batch is redelivered to whoever owns the partition next. Handlers
must therefore be idempotent (Flywheel handlers key their output by deterministic ids).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Generic, Iterable, Sequence, TypeVar

from google.protobuf.message import Message
from kafka import KafkaConsumer
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.structs import OffsetAndMetadata, TopicPartition

from flywheel.bus import codec, metrics
from flywheel.bus.codec import Delivery, PoisonMessage
from flywheel.bus.producer import TypedProducer
from flywheel.bus.topics import Topic
from flywheel.runtime.errors import InvalidArgument

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)


@dataclass
class Rejection:
    """A record the handler deems poison: it goes to the DLQ instead of being retried."""

    delivery: Delivery
    reason: str
    error_type: str = "InvalidMessage"


BatchHandler = Callable[[list[Delivery[M]]], "Iterable[Rejection] | None"]


def per_message(handle: Callable[[Delivery[M]], None]) -> BatchHandler[M]:
    """Adapt a one-record handler: PoisonMessage/InvalidArgument become rejections, other errors propagate."""

    def handle_batch(batch: list[Delivery[M]]) -> list[Rejection]:
        rejections = []
        for delivery in batch:
            try:
                handle(delivery)
            except (PoisonMessage, InvalidArgument) as exc:
                rejections.append(Rejection(delivery, str(exc), type(exc).__name__))
        return rejections

    return handle_batch


class _ForgetRevoked(ConsumerRebalanceListener):
    def __init__(self, consumer: "TypedConsumer") -> None:
        self._consumer = consumer

    def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        self._consumer._forget(revoked)

    def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        pass


class TypedConsumer(Generic[M]):
    """Polls decoded deliveries of one topic; tracks what was polled so it can commit or rewind."""

    def __init__(self, topic: Topic, *, bootstrap_servers: Sequence[str] | str, group_id: str,
                 dead_letters: TypedProducer, client_id: str = "flywheel", max_poll_records: int = 64,
                 auto_offset_reset: str = "earliest", security_protocol: str = "PLAINTEXT",
                 **kafka_config: object) -> None:
        self.topic = topic
        self.group_id = group_id
        self._dead_letters = dead_letters
        self._max_poll_records = max_poll_records
        self._consumer = KafkaConsumer(
            bootstrap_servers=bootstrap_servers,
            client_id=client_id,
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset=auto_offset_reset,
            max_poll_records=max_poll_records,
            security_protocol=security_protocol,
            **kafka_config,
        )
        self._consumer.subscribe([topic.name], listener=_ForgetRevoked(self))
        # Per partition: first offset polled since the last commit, and the next offset to commit.
        self._first_uncommitted: dict[TopicPartition, int] = {}
        self._next_offset: dict[TopicPartition, int] = {}

    # -- polling -----------------------------------------------------------------------------
    def poll(self, timeout_ms: int = 500, max_records: int | None = None) -> list[Delivery[M]]:
        """Decoded deliveries in partition order; poison records are dead-lettered on the way."""
        raw = self._consumer.poll(timeout_ms=timeout_ms, max_records=max_records or self._max_poll_records)
        deliveries: list[Delivery[M]] = []
        for tp, records in raw.items():
            if not records:
                continue
            self._first_uncommitted.setdefault(tp, records[0].offset)
            self._next_offset[tp] = records[-1].offset + 1
            for record in records:
                try:
                    value = codec.decode(self.topic, record.value, record.headers)
                except PoisonMessage as exc:
                    self._forward_dead_letter(record.value, record.key, record.headers or [], tp.partition,
                                              record.offset, "PoisonMessage", str(exc))
                    continue
                deliveries.append(
                    Delivery(
                        topic=record.topic,
                        partition=record.partition,
                        offset=record.offset,
                        key=record.key.decode("utf-8", "replace") if record.key is not None else None,
                        value=value,  # type: ignore[arg-type]
                        headers=codec.header_dict(record.headers),
                        timestamp_ms=record.timestamp,
                    )
                )
        return deliveries

    def dead_letter(self, rejection: Rejection) -> None:
        d = rejection.delivery
        headers = [(k, v.encode()) for k, v in d.headers.items()]
        key = d.key.encode() if d.key is not None else None
        self._forward_dead_letter(d.value.SerializeToString(), key, headers, d.partition, d.offset,
                                  rejection.error_type, rejection.reason)

    def _forward_dead_letter(self, value: bytes | None, key: bytes | None, headers: Sequence[tuple[str, bytes]],
                             partition: int, offset: int, error_type: str, reason: str) -> None:
        log.warning("dead-lettering %s[%d]@%d: %s: %s", self.topic.name, partition, offset, error_type, reason)
        error_headers = [
            (codec.HEADER_ERROR_TYPE, error_type.encode()),
            (codec.HEADER_ERROR_MESSAGE, reason.encode()[:4096]),
            (codec.HEADER_ORIGINAL_TOPIC, self.topic.name.encode()),
            (codec.HEADER_ORIGINAL_PARTITION, str(partition).encode()),
            (codec.HEADER_ORIGINAL_OFFSET, str(offset).encode()),
            (codec.HEADER_CONSUMER_GROUP, self.group_id.encode()),
        ]
        kept = [(k, v) for k, v in headers if not k.startswith("flywheel-error")]
        # Durable before we may commit past the record: nothing is lost.
        self._dead_letters.send_dead_letter(self.topic.dlq, value=value, key=key, headers=kept + error_headers)
        metrics.DEAD_LETTERED.labels(self.topic.name, self.group_id).inc()

    # -- offsets -----------------------------------------------------------------------------
    def commit(self) -> None:
        """Commit everything polled so far (call only once it is all handled)."""
        if not self._next_offset:
            return
        offsets = {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in self._next_offset.items()}
        self._consumer.commit(offsets)
        self._first_uncommitted.clear()
        self._next_offset.clear()

    def rewind(self) -> None:
        """Seek back to the first uncommitted offset of each partition: the batch is polled again."""
        for tp, offset in self._first_uncommitted.items():
            self._consumer.seek(tp, offset)
        self._first_uncommitted.clear()
        self._next_offset.clear()

    def _forget(self, partitions: Sequence[TopicPartition]) -> None:
        for tp in partitions:
            self._first_uncommitted.pop(tp, None)
            self._next_offset.pop(tp, None)

    def committed(self, partition: int) -> int | None:
        return self._consumer.committed(TopicPartition(self.topic.name, partition))

    def lag(self) -> int:
        total = 0
        for tp in self._consumer.assignment():
            high = self._consumer.highwater(tp)
            if high is None:
                continue
            total += max(0, high - self._consumer.position(tp))
        return total

    def close(self) -> None:
        self._consumer.close(autocommit=False)


class ConsumerWorker(Generic[M]):
    """Runs `handler` over a topic on its own thread: poll -> handle -> dead-letter rejects -> commit."""

    def __init__(self, consumer: TypedConsumer[M], handler: BatchHandler[M], *, name: str | None = None,
                 poll_timeout_ms: int = 500, retry_backoff_s: float = 1.0, max_backoff_s: float = 30.0) -> None:
        self.consumer = consumer
        self.handler = handler
        self.name = name or f"{consumer.topic.name}/{consumer.group_id}"
        self._poll_timeout_ms = poll_timeout_ms
        self._retry_backoff_s = retry_backoff_s
        self._max_backoff_s = max_backoff_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._labels = (consumer.topic.name, consumer.group_id)
        self.handled = 0
        self.failures = 0

    def run_once(self) -> int:
        """One poll/handle/commit cycle. Returns the number of deliveries handled.

        Raises whatever the handler raised, after rewinding (nothing committed).
        """
        batch = self.consumer.poll(timeout_ms=self._poll_timeout_ms)
        if not batch:
            self.consumer.commit()  # records that were all poison are committed past
            return 0
        start = time.perf_counter()
        try:
            rejections = list(self.handler(batch) or [])
        except Exception:
            self.consumer.rewind()
            raise
        for rejection in rejections:
            self.consumer.dead_letter(rejection)
        self.consumer.commit()
        metrics.HANDLE_SECONDS.labels(*self._labels).observe(time.perf_counter() - start)
        metrics.CONSUMED.labels(*self._labels).inc(len(batch))
        self.handled += len(batch)
        return len(batch)

    def run(self) -> None:
        """The loop; returns when stop() is called."""
        backoff = self._retry_backoff_s
        while not self._stop.is_set():
            try:
                self.run_once()
                backoff = self._retry_backoff_s
                metrics.CONSUMER_LAG.labels(*self._labels).set(self.consumer.lag())
            except Exception:  # noqa: BLE001 - transient: retry the same batch
                self.failures += 1
                metrics.HANDLER_FAILURES.labels(*self._labels).inc()
                log.exception("%s: handler failed; retrying batch in %.1fs", self.name, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self._max_backoff_s)

    # BackgroundWorker protocol (see flywheel.runtime.server)
    async def start(self) -> None:
        self._thread = threading.Thread(target=self._run_then_close, name=self.name, daemon=True)
        self._thread.start()

    def _run_then_close(self) -> None:
        try:
            self.run()
        finally:
            self.consumer.close()

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
