"""The Kafka bus: typed protobuf producer/consumer, topics, dead letters, the one consumer loop."""

from flywheel.bus.admin import ensure_topics
from flywheel.bus.codec import Delivery, PoisonMessage
from flywheel.bus.consumer import Rejection, TypedConsumer, per_message
from flywheel.bus.deadletter import DeadLetterer
from flywheel.bus.producer import TypedProducer
from flywheel.bus.topics import ALL_TOPICS, Topic
from flywheel.bus.worker import ConsumerThread, ConsumerWorker

__all__ = [
    "ALL_TOPICS",
    "ConsumerThread",
    "ConsumerWorker",
    "DeadLetterer",
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
