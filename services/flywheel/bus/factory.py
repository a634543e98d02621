"""Build bus clients from a service's settings, so every service configures Kafka the same way."""

from __future__ import annotations

from typing import Iterable

from google.protobuf.message import Message

from flywheel.bus.admin import ensure_topics
from flywheel.bus.consumer import BatchHandler, TypedConsumer
from flywheel.bus.deadletter import DeadLetterer
from flywheel.bus.producer import TypedProducer
from flywheel.bus.topics import ALL_TOPICS, Topic
from flywheel.bus.worker import ConsumerWorker
from flywheel.runtime.config import ServiceSettings


def client_config(settings: ServiceSettings) -> dict[str, object]:
    """Connection settings every Kafka client of a service shares (producers, consumers, followers)."""
    return dict(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=f"{settings.kafka_client_id}-{settings.service_name}",
        # After a broker restart: retry the connection at least every second, not every 30 s.
        reconnect_backoff_max_ms=settings.kafka_reconnect_backoff_max_ms,
        **settings.kafka_client_config(),  # TLS / SASL
    )


def producer_for(settings: ServiceSettings, **kafka_config: object) -> TypedProducer:
    return TypedProducer(**{**client_config(settings), **kafka_config})  # type: ignore[arg-type]


def consumer_for(settings: ServiceSettings, topic: Topic, group_id: str | None,
                 dead_letters: TypedProducer | DeadLetterer, *, static: bool = True,
                 **kafka_config: object) -> TypedConsumer[Message]:
    """A group consumer of `topic`. `static=False` for per-instance groups (nobody to share with)."""
    group_id = group_id or settings.kafka_consumer_group
    config: dict[str, object] = dict(
        client_config(settings),
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=max(500, settings.kafka_session_timeout_ms // 4),
        max_poll_records=settings.kafka_max_poll_records,
        group_instance_id=settings.group_instance_id if static else None,
    )
    config.update(kafka_config)
    return TypedConsumer(topic, group_id=group_id, dead_letters=dead_letters, **config)  # type: ignore[arg-type]


def worker_for(settings: ServiceSettings, topic: Topic, group_id: str | None, handler: BatchHandler,
               dead_letters: TypedProducer | DeadLetterer, *, commit_every: int | None = None,
               static: bool = True) -> ConsumerWorker[Message]:
    return ConsumerWorker(
        consumer_for(settings, topic, group_id, dead_letters, static=static),
        handler,
        poll_timeout_ms=settings.kafka_poll_timeout_ms,
        retry_backoff_s=settings.kafka_retry_backoff_s,
        commit_every=commit_every,
    )


def ensure_topics_for(settings: ServiceSettings, topics: Iterable[Topic] = ALL_TOPICS) -> list[str]:
    if not settings.kafka_create_topics:
        return []
    return ensure_topics(settings.bootstrap_servers, topics, partitions=settings.kafka_topic_partitions,
                         replication_factor=settings.kafka_replication_factor,
                         client_id=f"{settings.kafka_client_id}-{settings.service_name}-admin",
                         **settings.kafka_client_config())
