"""Configuration from the environment (pydantic-settings), shared by every service.

Every setting is an environment variable `FLYWHEEL_<FIELD>`. Each service subclasses
`ServiceSettings`, overriding port defaults and adding its own fields (named with the service
prefix, e.g. `reward_max_batch_size` -> `FLYWHEEL_REWARD_MAX_BATCH_SIZE`). `flywheel config-docs`
renders the table in docs/configuration.md from these classes.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "FLYWHEEL_"


def default_home() -> Path:
    """Where Flywheel keeps caches, checkpoints and local state when not told otherwise."""
    return Path.home() / ".cache" / "flywheel"


class ServiceSettings(BaseSettings):
    """Server, metrics and Kafka settings common to every service."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    service_name: str = Field("flywheel", description="Name used in logs, metrics and the Kafka client id.")
    host: str = Field("0.0.0.0", description="Address the gRPC server binds.")
    grpc_port: int = Field(50050, ge=0, le=65535, description="gRPC port; 0 picks a free port.")
    metrics_port: int = Field(9100, ge=0, le=65535, description="Prometheus /metrics HTTP port; 0 picks a free port.")
    metrics_enabled: bool = Field(True, description="Serve /metrics.")
    max_message_bytes: int = Field(64 * 1024 * 1024, gt=0, description="Max gRPC send/receive message size.")
    keepalive_time_ms: int = Field(30_000, gt=0, description="Interval of gRPC keepalive pings.")
    keepalive_timeout_ms: int = Field(10_000, gt=0, description="Wait for a keepalive ack before closing.")
    max_concurrent_rpcs: int | None = Field(None, description="Reject RPCs beyond this many in flight (unset: no limit).")
    shutdown_delay_s: float = Field(
        2.0, ge=0, description="On SIGTERM: seconds between reporting NOT_SERVING and closing the listener "
        "(lets probes and load balancers route new calls elsewhere).")
    shutdown_grace_s: float = Field(10.0, ge=0, description="On SIGTERM: seconds in-flight RPCs get to finish.")
    tls_cert_file: Path | None = Field(None, description="PEM certificate; with tls_key_file enables TLS.")
    tls_key_file: Path | None = Field(None, description="PEM private key for TLS.")
    log_level: str = Field("INFO", description="Python logging level.")
    home: Path = Field(default_factory=default_home, description="Directory for caches, checkpoints and state.")

    kafka_bootstrap_servers: str = Field("127.0.0.1:9092", description="Comma-separated Kafka bootstrap servers.")
    kafka_client_id: str = Field("flywheel", description="Kafka client id prefix.")
    kafka_topic_partitions: int = Field(3, ge=1, description="Partitions for topics Flywheel creates.")
    kafka_replication_factor: int = Field(1, ge=1, description="Replication factor for topics Flywheel creates.")
    kafka_create_topics: bool = Field(True, description="Create missing topics (and their DLQs) at start.")
    kafka_poll_timeout_ms: int = Field(500, gt=0, description="Consumer poll timeout.")
    kafka_max_poll_records: int = Field(64, gt=0, description="Max records per consumer poll (handler batch).")
    kafka_retry_backoff_s: float = Field(1.0, gt=0, description="First backoff after a failed handler (doubles, capped at 30 s).")
    kafka_security_protocol: str = Field("PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.")
    kafka_consumer_group: str = Field("flywheel", description="Consumer group of this service's input consumer "
                                      "(each service sets its own default).")
    kafka_group_instance_id: str = Field(
        "", description="Static group membership (group.instance.id) of this instance: a restarted instance gets "
        "its partitions back at once instead of waiting out the dead member's session. Must be unique per running "
        "instance and stable across its restarts (the chart sets the pod name). Empty: dynamic membership.")
    kafka_session_timeout_ms: int = Field(
        10_000, ge=1000, description="Consumer session timeout: how long the group waits for a member that "
        "stopped heartbeating (a crashed instance that does not come back) before moving its partitions.")
    kafka_reconnect_backoff_max_ms: int = Field(
        1000, gt=0, description="Longest wait between reconnection attempts to a broker (after a broker restart, "
        "clients are back within about this long).")

    @property
    def group_instance_id(self) -> str | None:
        return self.kafka_group_instance_id or None

    @property
    def bootstrap_servers(self) -> list[str]:
        return [s.strip() for s in self.kafka_bootstrap_servers.split(",") if s.strip()]
