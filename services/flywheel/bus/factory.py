"""Build bus clients from a service's settings, so every service configures Kafka the same way."""

from __future__ import annotations

from typing import Iterable

from google.protobuf.message import Message

from flywheel.bus.admin import ensure_topics
from flywheel.bus.consumer import BatchHandler, ConsumerWorker, TypedConsumer
from flywheel.bus.producer import TypedProducer
from flywheel.bus.topics import ALL_TOPICS, Topic
from flywheel.runtime.config import ServiceSettings


def producer_for(settings: ServiceSettings) -> TypedProducer:
    return TypedProducer(
        settings.bootstrap_servers,
        client_id=f"{settings.kafka_client_id}-{settings.service_name}",
        **settings.kafka_client_config(),
    )


def consumer_for(settings: ServiceSettings, topic: Topic, group_id: str,
                 dead_letters: TypedProducer) -> TypedConsumer[Message]:
    return TypedConsumer(
        topic,
        bootstrap_servers=settings.bootstrap_servers,
        group_id=group_id,
        dead_letters=dead_letters,
        client_id=f"{settings.kafka_client_id}-{settings.service_name}",
        max_poll_records=settings.kafka_max_poll_records,
        **settings.kafka_client_config(),
    )


def worker_for(settings: ServiceSettings, topic: Topic, group_id: str, handler: BatchHandler,
               dead_letters: TypedProducer) -> ConsumerWorker[Message]:
    return ConsumerWorker(
        consumer_for(settings, topic, group_id, dead_letters),
        handler,
        poll_timeout_ms=settings.kafka_poll_timeout_ms,
        retry_backoff_s=settings.kafka_retry_backoff_s,
    )


def ensure_topics_for(settings: ServiceSettings, topics: Iterable[Topic] = ALL_TOPICS) -> list[str]:
    if not settings.kafka_create_topics:
        return []
    return ensure_topics(settings.bootstrap_servers, topics, partitions=settings.kafka_topic_partitions,
                         replication_factor=settings.kafka_replication_factor,
                         client_id=f"{settings.kafka_client_id}-{settings.service_name}-admin",
                         **settings.kafka_client_config())
