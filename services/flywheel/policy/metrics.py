"""Prometheus metrics of the policy service (module-level: one registry per process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

GENERATED_TOKENS = Counter("flywheel_policy_generated_tokens_total", "Tokens sampled by the policy.")
TOKENS_PER_SECOND = Gauge(
    "flywheel_policy_tokens_per_second", "Generated tokens per second over the last second of decoding (0 when idle).")
BATCH_SIZE = Histogram(
    "flywheel_policy_batch_size", "Sequences decoded together in one step.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
STEP_SECONDS = Histogram("flywheel_policy_decode_step_seconds", "Wall time of one decode step (sample + forward).",
                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
QUEUE_DEPTH = Gauge("flywheel_policy_queue_depth", "Sequences waiting for a batch.")
TIME_TO_FIRST_TOKEN = Histogram(
    "flywheel_policy_time_to_first_token_seconds", "Submit to first sampled token, per request.",
    buckets=_LATENCY_BUCKETS)
REQUEST_LATENCY = Histogram(
    "flywheel_policy_request_latency_seconds", "Submit to completion of a generation request, by outcome.",
    ("outcome",), buckets=_LATENCY_BUCKETS)
REQUESTS = Counter("flywheel_policy_requests_total", "Generation requests, by outcome.", ("outcome",))
VERSION_INFO = Gauge("flywheel_policy_version_info", "1 for the policy version now serving.", ("version",))
VERSION_NUMBER = Gauge("flywheel_policy_version_number", "Numeric suffix of the policy version now serving.")
RELOADS = Counter("flywheel_policy_reloads_total", "Policy checkpoint loads, by outcome (loaded|rejected|ignored).",
                  ("outcome",))
RELOAD_SECONDS = Histogram("flywheel_policy_reload_seconds", "Time to load and validate a checkpoint.",
                           buckets=_LATENCY_BUCKETS)
ROLLOUTS_PRODUCED = Counter("flywheel_policy_rollouts_produced_total", "Rollouts produced to Kafka.")
