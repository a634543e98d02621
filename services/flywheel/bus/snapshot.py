"""Read a whole topic, from the beginning to its end as of now (no consumer group, nothing committed).

For batch jobs that need a snapshot of a topic (training sets built from the preferences or
aggregated-preferences topics), not for services, which use `TypedConsumer`.
"""

from __future__ import annotations

import logging
import time
from typing import Iterator, Sequence

from google.protobuf.message import Message
from kafka import KafkaConsumer, TopicPartition

from flywheel.bus import codec
from flywheel.bus.topics import Topic

log = logging.getLogger(__name__)


def read_topic(bootstrap_servers: str | Sequence[str], topic: Topic, *, topic_name: str | None = None,
               timeout_s: float = 30.0, **kafka_config: object) -> Iterator[tuple[int, int, Message]]:
    """Yield (partition, offset, message) for every decodable record up to the current end offsets.

    Undecodable records are logged and skipped (a snapshot reader does not own the DLQ).
    Raises TimeoutError if the end is not reached within `timeout_s`. `kafka_config`: security
    settings (ServiceSettings.kafka_client_config()).
    """
    name = topic_name or topic.name
    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False, group_id=None,
                             **kafka_config)
    try:
        partitions = [TopicPartition(name, p) for p in (consumer.partitions_for_topic(name) or [])]
        if not partitions:
            return
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        end = consumer.end_offsets(partitions)
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < end[tp] for tp in partitions):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {name} took longer than {timeout_s}s")
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    try:
                        message = codec.decode(topic, record.value, record.headers)
                    except codec.PoisonMessage as exc:
                        log.warning("skipping %s@%d: %s", name, record.offset, exc)
                        continue
                    yield record.partition, record.offset, message
    finally:
        consumer.close()
