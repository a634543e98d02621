"""Flywheel: continuous RLHF as gRPC microservices exchanging rollouts and feedback over Kafka."""

__version__ = "0.1.0"
