"""Typed protobuf producer: idempotent, acks=all, keyed for partitioning, headers on every record."""

from __future__ import annotations

import asyncio
import logging
from typing import Sequence

from google.protobuf.message import Message
from kafka import KafkaProducer
from kafka.producer.future import FutureRecordMetadata

from flywheel.bus import codec, metrics
from flywheel.bus.topics import Topic

log = logging.getLogger(__name__)


class TypedProducer:
    def __init__(self, bootstrap_servers: Sequence[str] | str, *, client_id: str = "flywheel",
                 linger_ms: int = 5, security_protocol: str = "PLAINTEXT", **kafka_config: object) -> None:
        self._producer = KafkaProducer(
            bootstrap_servers=bootstrap_servers,
            client_id=client_id,
            # Durable and exactly-once per partition on the producer side: the broker
            # de-duplicates retries, and every in-sync replica must have the record.
            acks="all",
            enable_idempotence=True,
            linger_ms=linger_ms,
            security_protocol=security_protocol,
            **kafka_config,
        )

    def send(self, topic: Topic, message: Message, *, key: str | bytes | None = None,
             trace_id: str | None = None, headers: Sequence[tuple[str, bytes]] = ()) -> FutureRecordMetadata:
        """Queue one record; the returned future resolves once all in-sync replicas have it."""
        value, all_headers = codec.encode(topic, message, trace_id, headers)
        return self._send_raw(topic.name, value, key, all_headers)

    def _send_raw(self, topic_name: str, value: bytes | None, key: str | bytes | None,
                  headers: Sequence[tuple[str, bytes]]) -> FutureRecordMetadata:
        key_bytes = key.encode() if isinstance(key, str) else key
        future = self._producer.send(topic_name, value=value, key=key_bytes, headers=list(headers))
        future.add_callback(lambda _md: metrics.PRODUCED.labels(topic_name).inc())
        future.add_errback(lambda exc: (metrics.PRODUCE_ERRORS.labels(topic_name).inc(),
                                        log.error("produce to %s failed: %s", topic_name, exc)))
        return future

    def send_and_wait(self, topic: Topic, message: Message, *, key: str | bytes | None = None,
                      trace_id: str | None = None, timeout_s: float = 30.0) -> None:
        """Send and block until acknowledged (acks=all); raises on failure."""
        self.send(topic, message, key=key, trace_id=trace_id).get(timeout=timeout_s)

    def send_dead_letter(self, dlq_topic: str, *, value: bytes | None, key: bytes | None,
                         headers: Sequence[tuple[str, bytes]], timeout_s: float = 30.0) -> None:
        """Forward a raw record (value untouched) with error headers; blocks until durable."""
        self._send_raw(dlq_topic, value, key, headers).get(timeout=timeout_s)

    def flush(self, timeout_s: float | None = None) -> None:
        self._producer.flush(timeout=timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        self._producer.close(timeout=timeout_s)


async def acknowledged(futures: Sequence[FutureRecordMetadata], timeout_s: float) -> list[object]:
    """Await the broker's acknowledgements without holding a thread: per future, its RecordMetadata
    or its exception (a KafkaTimeoutError for one still pending after `timeout_s`)."""
    from kafka.errors import KafkaTimeoutError

    loop = asyncio.get_running_loop()

    def settle(waiter: asyncio.Future, value: object) -> None:
        if not waiter.done():
            waiter.set_result(value)

    waiters = []
    for future in futures:
        waiter = loop.create_future()
        # Callbacks run on the producer's I/O thread (or here, when already done).
        future.add_callback(lambda md, w=waiter: loop.call_soon_threadsafe(settle, w, md))
        future.add_errback(lambda exc, w=waiter: loop.call_soon_threadsafe(settle, w, exc))
        waiters.append(waiter)
    if waiters:
        await asyncio.wait(waiters, timeout=timeout_s)
    return [w.result() if w.done() else KafkaTimeoutError(f"not acknowledged within {timeout_s:g} s")
            for w in waiters]
