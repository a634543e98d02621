"""Configuration from the environment (pydantic-settings), shared by every service.

Every setting is an environment variable `FLYWHEEL_<FIELD>`. Each service subclasses
`ServiceSettings`, overriding port defaults and adding its own fields (named with the service
prefix, e.g. `reward_max_batch_size` -> `FLYWHEEL_REWARD_MAX_BATCH_SIZE`). `flywheel config-docs`
renders the table in docs/configuration.md from these classes. A FLYWHEEL_* variable that names
no setting stops start-up (`check_environment`) instead of being silently ignored.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Iterable, Literal, Mapping

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from flywheel.runtime.uris import UriPolicy

ENV_PREFIX = "FLYWHEEL_"


def default_home() -> Path:
    """Where Flywheel keeps caches, checkpoints and local state when not told otherwise."""
    return Path.home() / ".cache" / "flywheel"


class ServiceSettings(BaseSettings):
    """Server, metrics and Kafka settings common to every service."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    service_name: str = Field("flywheel", description="Name used in logs, metrics and the Kafka client id.")
    host: str = Field("0.0.0.0", description="Address the gRPC server binds.")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads of the service's process, set once at "
                               "start-up; 0 leaves torch's default (one per core).")
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
    tls_cert_file: Path | None = Field(
        None, description="PEM certificate; with tls_key_file serves TLS on the gRPC, /metrics and HTTP ports "
        "(and is the client certificate when dialling with tls_ca_file under mutual TLS).")
    tls_key_file: Path | None = Field(None, description="PEM private key for TLS.")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA bundle: require client certificates signed by it on every port (mutual TLS).")
    tls_ca_file: Path | None = Field(
        None, description="PEM CA bundle trusted when dialling other services (turns on TLS for outgoing calls).")
    log_level: str = Field("INFO", description="Python logging level.")
    auth_enabled: bool = Field(
        True, description="Require an API key (`authorization: Bearer <key>`, issued with `flywheel keys issue`) on "
        "the reward, policy and trainer APIs. Disable only where the network is trusted (the local loop does).")
    auth_keys_db: Path | None = Field(None, description="SQLite file with the hashed API keys "
                                      "(default <home>/auth/keys.sqlite).")
    auth_default_requests_per_s: float = Field(0.0, ge=0, description="Requests/s quota of keys that set none "
                                               "(0: unlimited).")
    auth_default_items_per_s: float = Field(0.0, ge=0, description="Items/s (texts scored, sequences generated) "
                                            "quota of keys that set none (0: unlimited).")
    auth_burst_s: float = Field(1.0, gt=0, description="Quota burst: a key may spend this many seconds' worth of "
                                "its rate at once.")
    home: Path = Field(default_factory=default_home, description="Directory for caches, checkpoints and state.")
    checkpoint_roots: list[Path] = Field(
        default_factory=list, description="Local directories a checkpoint_uri announced on the model-versions "
        "topic may name (JSON list; empty: <home>/checkpoints, where a trainer sharing this home writes). A version "
        "anywhere else is rejected without being read.")
    checkpoint_remote: list[str] = Field(
        default_factory=list, description="Remote `scheme://host` locations an announced checkpoint_uri may name "
        "(JSON list, e.g. [\"s3://checkpoints\"]); none by default, so no message makes a service fetch from an "
        "address its sender chose.")

    kafka_bootstrap_servers: str = Field("127.0.0.1:9092", description="Comma-separated Kafka bootstrap servers.")
    kafka_client_id: str = Field("flywheel", description="Kafka client id prefix.")
    kafka_topic_partitions: int = Field(3, ge=1, description="Partitions for topics Flywheel creates.")
    kafka_replication_factor: int = Field(1, ge=1, description="Replication factor for topics Flywheel creates.")
    kafka_create_topics: bool = Field(True, description="Create missing topics (and their DLQs) at start.")
    kafka_poll_timeout_ms: int = Field(500, gt=0, description="Consumer poll timeout.")
    kafka_max_poll_records: int = Field(64, gt=0, description="Max records per consumer poll (handler batch).")
    kafka_retry_backoff_s: float = Field(1.0, gt=0, description="First backoff after a failed handler (doubles, capped at 30 s).")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.")
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "SCRAM-SHA-512", description="SASL mechanism (SASL_* protocols only).")
    kafka_sasl_username: str = Field("", description="SASL user (SASL_* protocols only).")
    kafka_sasl_password: SecretStr = Field(SecretStr(""), description="SASL password (SASL_* protocols only).")
    kafka_ssl_cafile: Path | None = Field(
        None, description="PEM CA bundle that signed the brokers' certificates (SSL protocols; unset: system CAs).")
    kafka_ssl_certfile: Path | None = Field(None, description="PEM client certificate for broker mutual TLS.")
    kafka_ssl_keyfile: Path | None = Field(None, description="PEM private key of kafka_ssl_certfile.")
    kafka_ssl_check_hostname: bool = Field(True, description="Verify that broker certificates name the broker host.")

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

    @model_validator(mode="after")
    def _kafka_credentials_complete(self) -> "ServiceSettings":
        if self.kafka_security_protocol.startswith("SASL_") and not (
                self.kafka_sasl_username and self.kafka_sasl_password.get_secret_value()):
            raise ValueError(f"kafka_security_protocol {self.kafka_security_protocol} needs kafka_sasl_username "
                             "and kafka_sasl_password")
        if bool(self.kafka_ssl_certfile) != bool(self.kafka_ssl_keyfile):
            raise ValueError("kafka_ssl_certfile and kafka_ssl_keyfile must be set together")
        return self

    def kafka_client_config(self) -> dict[str, object]:
        """Security keyword arguments for every kafka-python client (producer, consumer, admin)."""
        config: dict[str, object] = {"security_protocol": self.kafka_security_protocol}
        if self.kafka_security_protocol.startswith("SASL_"):
            config.update(sasl_mechanism=self.kafka_sasl_mechanism, sasl_plain_username=self.kafka_sasl_username,
                          sasl_plain_password=self.kafka_sasl_password.get_secret_value())
        if self.kafka_security_protocol in ("SSL", "SASL_SSL"):
            config["ssl_check_hostname"] = self.kafka_ssl_check_hostname
            if self.kafka_ssl_cafile:
                config["ssl_cafile"] = str(self.kafka_ssl_cafile)
            if self.kafka_ssl_certfile:
                config.update(ssl_certfile=str(self.kafka_ssl_certfile), ssl_keyfile=str(self.kafka_ssl_keyfile))
        return config

    @field_validator("*", mode="after")
    @classmethod
    def _absolute_paths(cls, value: object) -> object:
        # A relative path means "relative to the directory the service was started from", resolved
        # once here: later code may run with another working directory (or pass the path to a child).
        if isinstance(value, Path):
            return value.expanduser().absolute()
        return value

    def checkpoint_policy(self) -> UriPolicy:
        """Where model versions from the topic may be loaded from (checked before any fetch)."""
        return UriPolicy("checkpoint_uri", list(self.checkpoint_roots) or [self.home / "checkpoints"],
                         self.checkpoint_remote)

    def api_keys_path(self) -> Path:
        return self.auth_keys_db or self.home / "auth" / "keys.sqlite"

    @property
    def group_instance_id(self) -> str | None:
        return self.kafka_group_instance_id or None

    @property
    def bootstrap_servers(self) -> list[str]:
        return [s.strip() for s in self.kafka_bootstrap_servers.split(",") if s.strip()]


def settings_env(cls: type[BaseSettings], **values: object) -> dict[str, str]:
    """Environment variables that set `values` on a `cls` process: names come from the fields (a
    name that is not one raises), values are rendered as pydantic-settings parses them."""
    env = {}
    for name, value in values.items():
        if name not in cls.model_fields:
            close = difflib.get_close_matches(name, list(cls.model_fields), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise KeyError(f"{cls.__name__} has no setting {name!r}{hint}")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (list, tuple, dict)):
            text = json.dumps(value)
        else:
            text = str(value)
        env[f"{ENV_PREFIX}{name.upper()}"] = text
    return env


# FLYWHEEL_* variables that are not service settings (read by the Makefile, deploy tools, tests and
# CLI options); every other FLYWHEEL_* variable must name a setting of some service.
NOT_SETTINGS = frozenset({
    "FLYWHEEL_CACHE", "FLYWHEEL_KAFKA_VERSION", "FLYWHEEL_TOOLS_DIR", "FLYWHEEL_UID",
    "FLYWHEEL_HEALTHCHECK_TIMEOUT_S", "FLYWHEEL_TEST_KAFKA_BOOTSTRAP", "FLYWHEEL_TRAINER_TARGET",
    "FLYWHEEL_PREFERENCE_TOKEN",
})
# Scorer plugins declare their own settings (read from FLYWHEEL_REWARD_PLUGIN_*, validated by the
# plugin's model when it is built), so their names cannot be known here.
NOT_SETTINGS_PREFIXES = ("FLYWHEEL_REWARD_PLUGIN_",)


# Settings renamed so far (docs/changelog.md): the old name is refused, pointing at the new one.
RENAMED = {
    "FLYWHEEL_POLICY_TORCH_THREADS": "FLYWHEEL_TORCH_THREADS",
    "FLYWHEEL_REWARD_TORCH_THREADS": "FLYWHEEL_TORCH_THREADS",
    "FLYWHEEL_TRAINER_TORCH_THREADS": "FLYWHEEL_TORCH_THREADS",
    "FLYWHEEL_REWARD_HOT_RELOAD": "FLYWHEEL_REWARD_RELOAD_ENABLED",
    "FLYWHEEL_POLICY_CONSUMER_GROUP": "FLYWHEEL_KAFKA_CONSUMER_GROUP",
    "FLYWHEEL_REWARD_CONSUMER_GROUP": "FLYWHEEL_KAFKA_CONSUMER_GROUP",
    "FLYWHEEL_TRAINER_GROUP_ID": "FLYWHEEL_KAFKA_CONSUMER_GROUP",
    "FLYWHEEL_TRAINER_SESSION_TIMEOUT_MS": "FLYWHEEL_KAFKA_SESSION_TIMEOUT_MS",
}


class UnknownSettingError(ValueError):
    """A FLYWHEEL_* environment variable that no service reads: almost always a typo."""


def check_environment(known: Iterable[str], environ: Mapping[str, str] | None = None) -> None:
    """Refuse to start when a FLYWHEEL_* variable names no setting (pydantic would ignore it)."""
    known = set(known)
    environ = os.environ if environ is None else environ
    unknown = sorted(name for name in environ
                     if name.startswith(ENV_PREFIX) and name not in known and name not in NOT_SETTINGS
                     and not name.startswith(NOT_SETTINGS_PREFIXES))
    if not unknown:
        return
    lines = []
    for name in unknown:
        if name in RENAMED:
            lines.append(f"  {name}: did you mean {RENAMED[name]}? (renamed, see docs/changelog.md)")
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        lines.append(f"  {name}" + (f": did you mean {close[0]}?" if close else ""))
    raise UnknownSettingError("unknown FLYWHEEL_* environment variable(s); fix or unset them "
                              "(docs/configuration.md lists every setting):\n" + "\n".join(lines))
