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
    preference_export_roots: list[Path] = Field(
        default_factory=list, description="Local directories an ExportDataset output_uri may name (JSON list; "
        "empty: only the export dir). Anything else is PERMISSION_DENIED.")
    preference_export_remote: list[str] = Field(
        default_factory=list, description="Remote `scheme://host` locations an output_uri may name (JSON list, "
        "e.g. [\"s3://datasets\"]); none by default, so no request makes the service connect anywhere.")
    preference_prior_strength: float = Field(
        0.5, gt=0, le=1e6, description="Gamma(λ+1, λ) prior on each response's strength, λ pseudo-comparisons per "
        "response (regularises sparse prompts; the MAP equals choix.ilsr_pairwise with alpha = λ / responses). "
        "Must be > 0: without it a response that wins every comparison has an infinite score.")
    preference_reliability: bool = Field(
        True, description="Estimate each rater's accuracy (probability a judgement is not reversed, against "
        "leave-one-rater-out scores) and weight judgements by it.")
    preference_reliability_prior_strength: float = Field(
        4.0, gt=0, le=1e9, description="Beta prior on each rater's accuracy: this many pseudo-judgements (higher: a "
        "rater needs more judgements to move away from the prior accuracy).")
    preference_reliability_prior_accuracy: float = Field(
        0.95, gt=0.5, lt=1.0, description="Prior accuracy of a rater (the Beta prior's mode): weight 2·accuracy - 1 "
        "for a rater with little evidence.")
    preference_max_iterations: int = Field(
        500, gt=0, le=10_000, description="Most iterations of one fit; a fit that stops here reports converged=false "
        "(log line and flywheel_preference_fit_not_converged_total) with finite estimates.")
    preference_tolerance: float = Field(
        1e-6, gt=0, lt=1, description="Convergence: largest parameter change, extrapolated by the contraction rate.")
    preference_max_rater_series: int = Field(
        1000, ge=0, le=100_000, description="Per-rater weight gauges exported at most (bounds metric cardinality; "
        "GetRaterStatistics reports every rater).")
    preference_refresh_interval_s: float = Field(
        30.0, gt=0, description="Refit rater reliabilities over all prompts at most this often when new events arrived.")
    preference_replay_timeout_s: float = Field(
        300.0, gt=0, description="Readiness: the store must catch up with the topics within this time.")
    preference_follow_interval_s: float = Field(
        0.5, ge=0, description="Once caught up, poll the preferences topic for other instances' events this often "
        "(records this instance stored itself are skipped, not re-read).")
    preference_tasks_db_path: Path | None = Field(
        None, description="SQLite file with gold orderings, flags and web UI sessions (default "
        "<home>/preference/tasks.sqlite). Not derived from Kafka: back it up.")
    preference_task_overlap: int = Field(3, ge=1, description="Raters per task (prompt x policy version).")
    preference_task_lease_s: float = Field(
        600.0, gt=0, description="A leased task returns to the pool after this long (a later submission is "
        "still accepted and counted as late).")
    preference_task_random_share: float = Field(
        0.1, ge=0, le=1, description="Share of tasks drawn uniformly at random instead of by informativeness "
        "(an unbiased evaluation sample).")
    preference_task_gold_rate: float = Field(
        0.05, ge=0, le=1, description="Chance that a lease serves an unseen gold task (known answer) instead.")
    preference_task_max_candidates: int = Field(4, ge=2, description="Most candidates shown in one task.")
    preference_task_settle_s: float = Field(
        2.0, ge=0, description="A new rollout group is offered this long after it appeared, so its candidates "
        "(published together) are all in it.")
    preference_task_refresh_s: float = Field(
        1.0, gt=0, description="Rebuild the task pool from the store (new rollouts, other instances' answers) "
        "this often.")
    preference_ui_enabled: bool = Field(True, description="Serve the rater/admin web UI.")
    preference_ui_port: int = Field(8053, ge=0, le=65535, description="Web UI HTTP(S) port; 0 picks a free port.")
    preference_ui_session_ttl_s: float = Field(
        12 * 3600.0, gt=0, description="A web UI session ends this long after sign-in.")

    def store_path(self) -> Path:
        return self.preference_store_path or self.home / "preference" / "store.sqlite"

    def auth_db_path(self) -> Path:
        return self.preference_auth_db_path or self.home / "preference" / "auth.sqlite"

    def tasks_db_path(self) -> Path:
        return self.preference_tasks_db_path or self.home / "preference" / "tasks.sqlite"

    def export_dir(self) -> Path:
        return self.preference_export_dir or self.home / "preference" / "exports"

    def export_roots(self) -> list[Path]:
        return list(self.preference_export_roots) or [self.export_dir()]
