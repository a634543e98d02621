"""Typed protobuf consumer with at-least-once delivery (the loops that drive it: `flywheel.bus.worker`).

Offsets are committed only after the handler succeeded (never auto-committed). A record that can
never be processed (undecodable, wrong type, rejected as invalid by the handler) is forwarded to
`<topic>.dlq` with the error in its headers (`DeadLetterer`), then committed past, so one bad
record cannot stall a partition. Handlers must be idempotent (Flywheel handlers key their output
by deterministic ids): what was polled but not committed is redelivered after a crash.

Static membership: with `group_instance_id` the broker recognises a restarted instance and hands
it its partitions back at once (no rebalance, no wait for the dead member's session). A static
member does not leave the group when closed (by design), so `close(leave_group=True)` removes it
explicitly: on a clean shutdown its partitions move to the other members immediately.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Generic, Iterable, Sequence, TypeVar

from google.protobuf.message import Message
from kafka import KafkaAdminClient, KafkaConsumer
from kafka.admin import MemberToRemove
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.structs import OffsetAndMetadata, TopicPartition

from flywheel.bus import codec
from flywheel.bus.codec import Delivery, PoisonMessage
from flywheel.bus.deadletter import DeadLetterer
from flywheel.bus.producer import TypedProducer
from flywheel.bus.topics import Topic
from flywheel.runtime.errors import InvalidArgument

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

# How long a poll waits for a group (re)join that `_rejoin_if_join_was_dropped` asked for.
REJOIN_POLL_MS = 2_000


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
                 dead_letters: TypedProducer | DeadLetterer, client_id: str = "flywheel", max_poll_records: int = 64,
                 auto_offset_reset: str = "earliest", security_protocol: str = "PLAINTEXT",
                 group_instance_id: str | None = None, **kafka_config: object) -> None:
        self.topic = topic
        self.group_id = group_id
        self.group_instance_id = group_instance_id
        self._dead_letters = (dead_letters if isinstance(dead_letters, DeadLetterer)
                              else DeadLetterer(dead_letters, group_id))
        self._max_poll_records = max_poll_records
        self._admin_config = dict(bootstrap_servers=bootstrap_servers, client_id=client_id,
                                  security_protocol=security_protocol)
        self._consumer = KafkaConsumer(
            bootstrap_servers=bootstrap_servers,
            client_id=client_id,
            group_id=group_id,
            group_instance_id=group_instance_id,
            enable_auto_commit=False,
            auto_offset_reset=auto_offset_reset,
            max_poll_records=max_poll_records,
            security_protocol=security_protocol,
            # A topic the broker had no metadata for at subscription (created a moment before, or
            # after) gets no partitions until the next metadata refresh: 5 min by default, which
            # left a freshly started follower deaf for minutes. Refresh every 10 s instead.
            **{"metadata_max_age_ms": 10_000, **kafka_config},
        )
        self._consumer.subscribe([topic.name], listener=_ForgetRevoked(self))
        # Per partition: first offset polled since the last commit, and the next offset to commit.
        self._first_uncommitted: dict[TopicPartition, int] = {}
        self._next_offset: dict[TopicPartition, int] = {}

    # -- polling -----------------------------------------------------------------------------
    def poll(self, timeout_ms: int = 500, max_records: int | None = None) -> list[Delivery[M]]:
        """Decoded deliveries in partition order; poison records are dead-lettered on the way."""
        max_records = max_records or self._max_poll_records
        raw = self._consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        if self._rejoin_if_join_was_dropped():
            raw = self._consumer.poll(timeout_ms=max(timeout_ms, REJOIN_POLL_MS), max_records=max_records)
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
        # Durable before we may commit past the record: nothing is lost.
        self._dead_letters.forward(self.topic, value=value, key=key, headers=headers, partition=partition,
                                   offset=offset, error_type=error_type, reason=reason)

    def _rejoin_if_join_was_dropped(self) -> bool:
        """Recover from a group join that finished between two polls and was never applied.

        kafka-python 3.0.12 applies a finished JoinGroup/SyncGroup (new assignment, heartbeats back on)
        only inside a later poll, and only while the coordinator still reports that it needs to
        rejoin. A rejoin triggered by topic metadata (a topic created just after subscribing, or
        given more partitions) clears that condition as the join performs its assignment, so a join
        that outlasts the poll that started it is never applied: the member stops heartbeating, the
        broker evicts it, and the consumer sits deaf with no partitions and no error, for good (the
        scoring worker timed out on this in CI; a 1 ms poll reproduces it every time). Asking for a
        rejoin makes the next poll join again; that poll waits long enough for the join to land.
        """
        coordinator = getattr(self._consumer, "_coordinator", None)
        join = getattr(coordinator, "_join_task", None)
        if join is None or not join.is_done or coordinator.need_rejoin():
            return False
        log.warning("%s: group %s finished a join that was never applied; rejoining", self.topic.name,
                    self.group_id)
        coordinator.request_rejoin()
        return True

    # -- offsets -----------------------------------------------------------------------------
    def commit(self) -> None:
        """Commit everything polled so far (call only once it is all handled)."""
        if not self._next_offset:
            return
        offsets = {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in self._next_offset.items()}
        self._consumer.commit(offsets)
        self._first_uncommitted.clear()
        self._next_offset.clear()

    def commit_through(self, deliveries: Sequence[Delivery[M]]) -> None:
        """Commit up to and including `deliveries` (a prefix, in poll order, of what was polled).

        Lets a handler that works in units commit each finished unit: a crash then replays at most
        the unit in progress, not the whole poll. Poison records before them are covered too."""
        offsets: dict[TopicPartition, int] = {}
        for d in deliveries:
            tp = TopicPartition(d.topic, d.partition)
            offsets[tp] = max(offsets.get(tp, 0), d.offset + 1)
        if not offsets:
            return
        self._consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})
        for tp, offset in offsets.items():
            if offset >= self._next_offset.get(tp, 0):
                self._first_uncommitted.pop(tp, None)
                self._next_offset.pop(tp, None)
            else:
                self._first_uncommitted[tp] = offset

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

    def close(self, *, leave_group: bool = False, timeout_s: float = 5.0) -> None:
        """Close; with `leave_group`, a static member also leaves (clean shutdown, not a restart)."""
        self._consumer.close(autocommit=False)
        if leave_group and self.group_instance_id:
            self._leave_static_group(timeout_s)

    def _leave_static_group(self, timeout_s: float) -> None:
        try:
            admin = KafkaAdminClient(**self._admin_config, request_timeout_ms=int(timeout_s * 1000),
                                     bootstrap_timeout_ms=int(timeout_s * 1000))
        except Exception as exc:  # noqa: BLE001 - the session timeout removes it anyway
            log.warning("%s: could not leave group %s (%s); the session timeout will", self.topic.name,
                        self.group_id, exc)
            return
        try:
            admin.remove_group_members(self.group_id, [MemberToRemove(group_instance_id=self.group_instance_id,
                                                                      reason="shutdown")])
            log.info("static member %s left group %s", self.group_instance_id, self.group_id)
        except Exception as exc:  # noqa: BLE001
            log.warning("static member %s could not leave group %s: %s", self.group_instance_id, self.group_id, exc)
        finally:
            admin.close()
