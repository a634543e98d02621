"""Protobuf values plus headers on the wire.

Headers (all UTF-8):
  flywheel-message-type    full protobuf name, e.g. flywheel.v1.Rollout
  flywheel-schema-version  the topic's schema version
  flywheel-trace-id        propagated across services for tracing
  content-type             application/x-protobuf
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Generic, Sequence, TypeVar

from google.protobuf.message import DecodeError, Message

from flywheel.bus.topics import Topic

HEADER_MESSAGE_TYPE = "flywheel-message-type"
HEADER_SCHEMA_VERSION = "flywheel-schema-version"
HEADER_TRACE_ID = "flywheel-trace-id"
HEADER_CONTENT_TYPE = "content-type"
CONTENT_TYPE = "application/x-protobuf"

# Dead-letter headers
HEADER_ERROR_TYPE = "flywheel-error-type"
HEADER_ERROR_MESSAGE = "flywheel-error-message"
HEADER_ORIGINAL_TOPIC = "flywheel-original-topic"
HEADER_ORIGINAL_PARTITION = "flywheel-original-partition"
HEADER_ORIGINAL_OFFSET = "flywheel-original-offset"
HEADER_CONSUMER_GROUP = "flywheel-consumer-group"

Headers = list[tuple[str, bytes]]
M = TypeVar("M", bound=Message)


class PoisonMessage(Exception):
    """A record that can never be processed (undecodable, wrong type, invalid): dead-letter it."""


_trace_ids = random.Random()  # seeded from os.urandom once; uuid4() per record costs ~60 µs here


def new_trace_id() -> str:
    """128 random bits as 32 hex chars (W3C trace-id format); for correlation, not secrets."""
    return f"{_trace_ids.getrandbits(128):032x}"


def encode(topic: Topic, message: Message, trace_id: str | None = None,
           extra_headers: Sequence[tuple[str, bytes]] = ()) -> tuple[bytes, Headers]:
    if not isinstance(message, topic.message_type):
        raise TypeError(
            f"topic {topic.name} carries {topic.message_type.DESCRIPTOR.full_name}, "
            f"not {type(message).DESCRIPTOR.full_name}"
        )
    headers: Headers = [
        (HEADER_MESSAGE_TYPE, message.DESCRIPTOR.full_name.encode()),
        (HEADER_SCHEMA_VERSION, str(topic.schema_version).encode()),
        (HEADER_TRACE_ID, (trace_id or new_trace_id()).encode()),
        (HEADER_CONTENT_TYPE, CONTENT_TYPE.encode()),
        *extra_headers,
    ]
    return message.SerializeToString(), headers


def header_dict(headers: Sequence[tuple[str, bytes]] | None) -> dict[str, str]:
    return {k: (v or b"").decode("utf-8", "replace") for k, v in (headers or [])}


@dataclass
class Delivery(Generic[M]):
    """One decoded record."""

    topic: str
    partition: int
    offset: int
    key: str | None
    value: M
    headers: dict[str, str] = field(default_factory=dict)
    timestamp_ms: int = 0

    @property
    def trace_id(self) -> str:
        return self.headers.get(HEADER_TRACE_ID, "")


def decode(topic: Topic, raw_value: bytes | None, headers: Sequence[tuple[str, bytes]] | None) -> Message:
    """Parse a record value; raises PoisonMessage when it cannot be the topic's message type."""
    h = header_dict(headers)
    expected = topic.message_type.DESCRIPTOR.full_name
    declared = h.get(HEADER_MESSAGE_TYPE)
    if declared is not None and declared != expected:
        raise PoisonMessage(f"{HEADER_MESSAGE_TYPE} is {declared!r}, topic {topic.name} carries {expected!r}")
    version = h.get(HEADER_SCHEMA_VERSION)
    if version is not None and version != str(topic.schema_version):
        raise PoisonMessage(f"{HEADER_SCHEMA_VERSION} is {version!r}, topic expects {topic.schema_version}")
    if raw_value is None:
        raise PoisonMessage("record has no value (tombstone)")
    message = topic.message_type()
    try:
        message.ParseFromString(raw_value)
    except DecodeError as exc:
        raise PoisonMessage(f"cannot decode {expected}: {exc}") from exc
    return message
