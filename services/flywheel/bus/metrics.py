"""Kafka bus metrics (per topic and consumer group)."""

from prometheus_client import Counter, Gauge, Histogram

PRODUCED = Counter("flywheel_bus_produced_total", "Records produced.", ("topic",))
PRODUCE_ERRORS = Counter("flywheel_bus_produce_errors_total", "Records the broker did not acknowledge.", ("topic",))
CONSUMED = Counter("flywheel_bus_consumed_total", "Records consumed and handled.", ("topic", "group"))
DEAD_LETTERED = Counter(
    "flywheel_bus_dead_lettered_total", "Poison records sent to the dead-letter topic.", ("topic", "group")
)
HANDLER_FAILURES = Counter(
    "flywheel_bus_handler_failures_total",
    "Handler failures; the batch is retried from its first offset (nothing committed).",
    ("topic", "group"),
)
CONSUMER_LAG = Gauge(
    "flywheel_bus_consumer_lag", "Records behind the partition end, summed over assigned partitions.",
    ("topic", "group"),
)
HANDLE_SECONDS = Histogram(
    "flywheel_bus_handle_seconds", "Time to handle one polled batch.", ("topic", "group"),
    buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
