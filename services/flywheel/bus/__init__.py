"""The Kafka bus: typed protobuf producer/consumer, topics, dead letters, at-least-once worker."""

from flywheel.bus.admin import ensure_topics
from flywheel.bus.codec import Delivery, PoisonMessage
from flywheel.bus.consumer import ConsumerWorker, Rejection, TypedConsumer, per_message
from flywheel.bus.producer import TypedProducer
from flywheel.bus.topics import ALL_TOPICS, Topic

__all__ = [
    "ALL_TOPICS",
    "ConsumerWorker",
    "Delivery",
    "PoisonMessage",
    "Rejection",
    "Topic",
    "TypedConsumer",
    "TypedProducer",
    "ensure_topics",
    "per_message",
]

from flywheel.bus.factory import consumer_for, ensure_topics_for, producer_for, worker_for  # noqa: E402

__all__ += ["consumer_for", "ensure_topics_for", "producer_for", "worker_for"]
