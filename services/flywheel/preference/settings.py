"""PreferenceSettings: everything the preference service reads from FLYWHEEL_PREFERENCE_* variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from flywheel.runtime.config import ServiceSettings


class PreferenceSettings(ServiceSettings):
    service_name: str = Field("preference", description="Name used in logs, metrics and the Kafka client id.")
    grpc_port: int = Field(50053, ge=0, le=65535, description="gRPC port; 0 picks a free port.")
    metrics_port: int = Field(9103, ge=0, le=65535, description="Prometheus /metrics HTTP port; 0 picks a free port.")

    kafka_consumer_group: str = Field(
        "flywheel-preference", description="Group the rollouts follower commits its progress under (the "
        "preferences follower uses `<group>-store`); informational, the store holds the offsets.")

    preference_store_path: Path | None = Field(
        None, description="SQLite event store (default <home>/preference/store.sqlite). Derived data: "
        "a missing store is rebuilt from the preferences and rollouts topics at start.")
    preference_auth_db_path: Path | None = Field(
        None, description="SQLite file with the hashed rater tokens (default <home>/preference/auth.sqlite). "
        "Not derived from Kafka: back it up.")
    preference_auth_enabled: bool = Field(
        True, description="Require `authorization: Bearer <token>` on every RPC (disable only for local experiments).")
    preference_allow_external_responses: bool = Field(
        False, description="Accept responses that are not known rollouts (unknown or empty response_id; an empty "
        "id gets a deterministic `ext-<hash>` id). Off: unknown response ids are INVALID_ARGUMENT.")
    preference_max_text_chars: int = Field(32_768, gt=0, description="Longest prompt or response text accepted.")
    preference_max_ranking_size: int = Field(16, ge=2, description="Most responses in one ranking.")
    preference_max_id_chars: int = Field(128, gt=0, description="Longest event, rater, prompt or response id.")
    preference_ack_timeout_s: float = Field(30.0, gt=0, description="Wait this long for the broker's acks=all.")
    preference_bulk_chunk_size: int = Field(
        1000, gt=0, description="SubmitBulk: events validated, produced and stored together.")
    preference_export_dir: Path | None = Field(
        None, description="Where ExportDataset writes when no output_uri is given (default <home>/preference/exports).")
    preference_prior_strength: float = Field(
        0.5, ge=0, description="Gamma(λ+1, λ) prior on each response's strength, λ pseudo-comparisons per response "
        "(regularises sparse prompts; the MAP equals choix.ilsr_pairwise with alpha = λ / responses).")
    preference_reliability: bool = Field(
        True, description="Estimate each rater's reliability weight (leave-one-rater-out) and weight judgements by it.")
    preference_reliability_prior_strength: float = Field(
        4.0, gt=0, description="Precision τ of the N(1, 1/τ) prior on each rater's weight (higher: trust the "
        "average until a rater has more judgements).")
    preference_max_iterations: int = Field(500, gt=0, description="Most Newton/weight iterations of one fit.")
    preference_tolerance: float = Field(1e-6, gt=0, description="Fit convergence tolerance (max score change).")
    preference_refresh_interval_s: float = Field(
        30.0, gt=0, description="Refit rater reliabilities over all prompts at most this often when new events arrived.")
    preference_replay_timeout_s: float = Field(
        300.0, gt=0, description="Readiness: the store must catch up with the topics within this time.")
    preference_follow_interval_s: float = Field(
        0.5, ge=0, description="Once caught up, poll the preferences topic for other instances' events this often "
        "(records this instance stored itself are skipped, not re-read).")
    preference_debug_hang_after_produce_file: Path | None = Field(
        None, description="Testing only: after the broker acknowledged an event, create this file and hang before "
        "storing and acknowledging (lets a test kill -9 the service between submit and ack).")

    def store_path(self) -> Path:
        return self.preference_store_path or self.home / "preference" / "store.sqlite"

    def auth_db_path(self) -> Path:
        return self.preference_auth_db_path or self.home / "preference" / "auth.sqlite"

    def export_dir(self) -> Path:
        return self.preference_export_dir or self.home / "preference" / "exports"
