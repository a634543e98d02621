"""The one way a record becomes a dead letter: `<topic>.dlq`, original bytes, error in the headers.

Every consumer (group workers, the trainer, preference's followers, the loop's raters) forwards
poison through a `DeadLetterer`, so the headers, the metric and the durability guarantee (the
dead letter is acknowledged before the consumer may commit past the record) are the same.
"""

from __future__ import annotations

import logging
from typing import Sequence

from flywheel.bus import codec, metrics
from flywheel.bus.producer import TypedProducer
from flywheel.bus.topics import Topic

log = logging.getLogger(__name__)


class DeadLetterer:
    def __init__(self, producer: TypedProducer, group: str) -> None:
        self.producer = producer
        self.group = group

    def forward(self, topic: Topic, *, value: bytes | None, key: bytes | None,
                headers: Sequence[tuple[str, bytes]], partition: int, offset: int, error_type: str,
                reason: str) -> None:
        """Send the raw record to `topic.dlq` and block until the broker has it."""
        log.warning("dead-lettering %s[%d]@%d: %s: %s", topic.name, partition, offset, error_type, reason)
        error_headers = [
            (codec.HEADER_ERROR_TYPE, error_type.encode()),
            (codec.HEADER_ERROR_MESSAGE, reason.encode()[:4096]),
            (codec.HEADER_ORIGINAL_TOPIC, topic.name.encode()),
            (codec.HEADER_ORIGINAL_PARTITION, str(partition).encode()),
            (codec.HEADER_ORIGINAL_OFFSET, str(offset).encode()),
            (codec.HEADER_CONSUMER_GROUP, self.group.encode()),
        ]
        kept = [(k, v) for k, v in headers if not k.startswith("flywheel-error")]
        self.producer.send_dead_letter(topic.dlq, value=value, key=key, headers=kept + error_headers)
        metrics.DEAD_LETTERED.labels(topic.name, self.group).inc()
