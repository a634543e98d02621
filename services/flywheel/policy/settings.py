"""Policy service settings (environment variables `FLYWHEEL_POLICY_*`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from flywheel.bus import topics
from flywheel.runtime.config import ServiceSettings


class PolicySettings(ServiceSettings):
    service_name: str = Field("policy", description="Name used in logs, metrics and the Kafka client id.")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free port.")
    metrics_port: int = Field(9101, ge=0, le=65535, description="Prometheus /metrics HTTP port; 0 picks a free port.")

    # -- backend ---------------------------------------------------------------------------------
    policy_backend: Literal["local", "tgi"] = Field(
        "local", description="`local`: sample with the in-process transformers engine; `tgi`: forward to a "
        "Text Generation Inference server (or another Flywheel policy's HTTP API) at policy_tgi_url.")
    policy_model_dir: Path | None = Field(
        None, description="Initial policy checkpoint (HF safetensors dir); unset: the packaged SmolLM2-135M-Instruct.")
    policy_model_version: str = Field("policy-0000", description="Version name of the initial checkpoint.")
    policy_device: str = Field("cpu", description="Torch device of the local engine (cpu, cuda, cuda:1, ...).")
    policy_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="Precision the local engine samples in (and so computes behaviour logprobs in). "
        "`auto` = bfloat16 on CUDA with bf16 and on CPUs with AMX-BF16/AVX512-BF16, float32 otherwise; not the "
        "default yet: with bf16 sampling the loop's learning test did not learn (docs/policy.md, Precision).")
    policy_prepack: bool = Field(
        True, description="On CPU, keep the decode step's projection weights prepacked for oneDNN's GEMM as well "
        "(1.3-1.8x faster projections at 16-64 rows, docs/policy.md; costs a second copy of the weights).")
    policy_tgi_url: str = Field("http://127.0.0.1:8080", description="Base URL of the TGI server (tgi backend).")
    policy_tgi_timeout_s: float = Field(60.0, gt=0, description="HTTP timeout of one TGI request.")
    policy_tgi_tokenizer_dir: Path | None = Field(
        None, description="Tokenizer used to apply the chat template before calling TGI (unset: SmolLM2's).")
    policy_tgi_version: str | None = Field(
        None, description="Policy version to report for the tgi backend (unset: the server's /info model_sha, "
        "else 'tgi:<model_id>').")

    # -- batching --------------------------------------------------------------------------------
    policy_max_batch_size: int = Field(32, ge=1, description="Max sequences (prompt x candidate) in one forward batch.")
    policy_batch_wait_ms: float = Field(
        5.0, ge=0, description="How long the batcher gathers requests before starting a batch on an idle engine.")
    policy_max_queue: int = Field(
        512, ge=1, description="Max queued sequences; RPCs beyond it fail with RESOURCE_EXHAUSTED.")
    policy_max_input_tokens: int = Field(2048, ge=1, description="Longest accepted templated prompt, in tokens.")
    policy_max_input_bytes: int = Field(
        65_536, ge=1, description="Longest accepted prompt text (or sum of message contents), in UTF-8 bytes; "
        "checked before tokenizing.")
    policy_max_new_tokens_limit: int = Field(1024, ge=1, description="Largest accepted max_new_tokens.")
    policy_max_n: int = Field(64, ge=1, description="Largest accepted number of candidates per prompt.")
    policy_max_stop_sequences: int = Field(8, ge=0, description="Most stop sequences per request.")

    # -- sampling defaults (used where a request leaves a field at zero) ---------------------------
    policy_default_temperature: float = Field(1.0, ge=0, description="Temperature when a prompt has no sampling params.")
    policy_default_top_k: int = Field(0, ge=0, description="Default top-k (0 disables).")
    policy_default_top_p: float = Field(1.0, gt=0, le=1, description="Default nucleus mass (1 disables).")
    policy_default_max_new_tokens: int = Field(64, ge=1, description="Default max_new_tokens.")
    policy_default_n: int = Field(1, ge=1, description="Default candidates per prompt.")

    # -- HTTP (TGI-compatible) -------------------------------------------------------------------
    policy_http_enabled: bool = Field(True, description="Serve the TGI-compatible HTTP API.")
    policy_http_port: int = Field(8080, ge=0, le=65535, description="TGI-compatible HTTP port; 0 picks a free port.")
    policy_http_max_body_bytes: int = Field(
        2_000_000, ge=1024, description="Largest HTTP request body (TGI's default payload limit); larger is 413, "
        "refused from Content-Length before the body is read.")

    # -- Kafka -----------------------------------------------------------------------------------
    policy_worker_enabled: bool = Field(True, description="Consume prompts and produce rollouts.")
    policy_reload_enabled: bool = Field(True, description="Hot-reload policy versions from the model-versions topic.")
    kafka_consumer_group: str = Field("flywheel-policy", description="Consumer group of the prompt worker.")
    policy_prompts_topic: str = Field(topics.PROMPTS.name, description="Topic the worker consumes prompts from.")
    policy_rollouts_topic: str = Field(topics.ROLLOUTS.name, description="Topic the worker produces rollouts to.")
    policy_model_versions_topic: str = Field(
        topics.MODEL_VERSIONS.name, description="Topic announcing new checkpoints (read from the beginning).")
    policy_worker_max_prompts: int = Field(
        16, ge=1, description="Prompts the worker generates for at once (their rollouts are produced before the "
        "offsets are committed).")
