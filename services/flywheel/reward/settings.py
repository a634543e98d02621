"""Reward service settings (environment variables FLYWHEEL_REWARD_*)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from flywheel.runtime.config import ServiceSettings


class RewardSettings(ServiceSettings):
    """Settings of the reward service."""

    service_name: str = Field("reward", description="Name used in logs, metrics and the Kafka client id.")
    grpc_port: int = Field(50052, ge=0, le=65535, description="gRPC port; 0 picks a free port.")
    metrics_port: int = Field(9102, ge=0, le=65535, description="Prometheus /metrics HTTP port; 0 picks a free port.")

    reward_scorer: str = Field(
        "transformer", description="Scorer to serve: transformer, vader, remote, ensemble (members and weights "
        "from reward_ensemble), a plugin's entry-point name (group flywheel.scorers) or module:Class.")
    reward_model_uri: str | None = Field(
        None, description="Reward-model checkpoint: a local directory or fsspec URI (file://, s3://, ...). "
        "Unset: the MiniLM backbone with a fresh, untrained head (version reward-0000).")
    reward_model_cache_dir: str | None = Field(
        None, description="Where non-local checkpoints are copied before loading (default: <home>/reward-models).")
    reward_max_length: int = Field(256, gt=0, description="Max tokens per (prompt, response) pair; longer pairs "
                                   "are truncated longest-first.")
    reward_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "float32", description="Precision the transformer scorer scores in (weights stay fp32; bfloat16 runs "
        "the forward pass under autocast). `auto` = bfloat16 on CPUs with AMX-BF16/AVX512-BF16, float32 "
        "otherwise; scores move by ~1e-3 (docs/policy.md, Precision).")
    reward_max_batch_size: int = Field(32, gt=0, description="Dynamic batching: max items in one forward pass.")
    reward_forward_overhead_tokens: int = Field(
        32, ge=0, description="Fixed cost of one forward pass, in token positions: a batch is split into "
        "length-homogeneous passes when the padding saved outweighs this (0: split whenever lengths differ).")
    reward_max_wait_ms: float = Field(5.0, ge=0, description="Dynamic batching: max time the first queued item "
                                      "waits for the batch to fill.")
    reward_batch_wait_fraction: float = Field(
        0.1, ge=0, le=1, description="Dynamic batching: when the previous batch served several requests, wait "
        "up to this fraction of its forward-pass time for more (merges closed-loop client cohorts).")
    reward_max_queue_items: int = Field(1024, gt=0, description="Items allowed to wait for a forward pass; beyond "
                                        "this requests get RESOURCE_EXHAUSTED.")
    reward_max_items_per_request: int = Field(512, gt=0, description="Max items in one Score request.")
    reward_max_text_chars: int = Field(100_000, gt=0, description="Max characters of one prompt or response.")
    reward_default_timeout_s: float = Field(30.0, gt=0, description="Deadline for requests that set none.")
    reward_vader_max_words: int = Field(
        512, gt=0, description="vader scorer: words of a response analysed (emoji count as their description's "
        "words; the rest is ignored). Bounds one item's cost: VADER is quadratic in words.")

    reward_remote_target: str = Field("", description="remote scorer: host:port of another RewardService.")
    reward_remote_timeout_s: float = Field(10.0, gt=0, description="remote scorer: deadline of one attempt.")
    reward_remote_retries: int = Field(3, ge=0, description="remote scorer: retries after UNAVAILABLE, "
                                       "RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED (exponential backoff).")
    reward_remote_api_key: str = Field("", description="remote scorer: API key (scope score) sent as "
                                       "`authorization: Bearer <key>`; empty: none.")
    reward_ensemble: str = Field(
        "transformer=1.0", description="ensemble scorer: comma-separated member=weight; members are built-ins "
        "(transformer, vader, remote) or plugins, e.g. 'transformer=0.8,vader=0.2,format=0.5'.")
    reward_plugin_config_file: Path | None = Field(
        None, description="JSON or TOML file with the settings of the plugin scorer(s); values here win over "
        "FLYWHEEL_REWARD_PLUGIN_* environment variables.")

    reward_http_enabled: bool = Field(True, description="Serve the HTTP/JSON APIs (Open Inference Protocol REST, "
                                      "OpenRLHF /get_reward, slime /slime/reward, /v1/score).")
    reward_http_port: int = Field(8082, ge=0, le=65535, description="HTTP port; 0 picks a free port.")
    reward_http_max_body_bytes: int = Field(16 * 1024 * 1024, gt=0, description="Largest accepted HTTP body; "
                                            "larger ones get 413 before they are read.")
    reward_kserve_model_name: str = Field("reward", description="Model name served on the KServe v2 "
                                          "(inference.GRPCInferenceService) API.")
    reward_worker_enabled: bool = Field(True, description="Run the Kafka scoring worker "
                                        "(rollouts -> scored-rollouts).")
    kafka_consumer_group: str = Field("flywheel-reward", description="Consumer group of the scoring worker.")
    reward_reload_enabled: bool = Field(True, description="Follow flywheel.model-versions.v1 and swap in new "
                                    "reward models (per-instance consumer group).")
    reward_instance_id: str = Field("", description="Suffix of the hot-reload consumer group; empty: random "
                                    "per process.")
