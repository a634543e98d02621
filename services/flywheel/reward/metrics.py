"""Prometheus metrics of the reward service (gRPC and Kafka metrics come from the shared runtime/bus)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram, Info

if TYPE_CHECKING:  # pragma: no cover
    from flywheel.reward.scorers import Scorer

BATCH_SIZE = Histogram(
    "flywheel_reward_batch_size", "Items per scorer forward pass (dynamic batching).",
    buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256, 512),
)
QUEUE_DEPTH = Gauge("flywheel_reward_queue_depth", "Items waiting for a forward pass.")
FORWARD_SECONDS = Histogram(
    "flywheel_reward_forward_seconds", "Duration of one scorer forward pass.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
REQUEST_SECONDS = Histogram(
    "flywheel_reward_scoring_seconds", "Scoring latency of one request: queueing plus forward pass.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
SCORES = Histogram(
    "flywheel_reward_scores", "Distribution of served scores.", ("scorer",),
    buckets=(-10, -5, -3, -2, -1, -0.5, -0.25, 0, 0.25, 0.5, 1, 2, 3, 5, 10),
)
REJECTED = Counter("flywheel_reward_rejected_total", "Requests refused or dropped, by reason "
                   "(overloaded, deadline).", ("reason",))
MODEL = Info("flywheel_reward_model", "The scorer now serving: name, version, checkpoint.")
RELOADS = Counter("flywheel_reward_reloads_total", "Reward-model hot reloads by outcome "
                  "(loaded|rejected|ignored).", ("outcome",))
RELOAD_SECONDS = Histogram("flywheel_reward_reload_seconds", "Time to load and validate a reward model.",
                           buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
SCORED_ROLLOUTS = Counter("flywheel_reward_scored_rollouts_total",
                          "Rollouts scored by the Kafka worker and produced to scored-rollouts.")


def publish_model(scorer: "Scorer") -> None:
    MODEL.info({"scorer": scorer.name, "version": scorer.version, "checkpoint_uri": scorer.checkpoint_uri})
