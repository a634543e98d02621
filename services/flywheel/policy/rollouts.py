"""Prompt -> Job (validation, templating) and Completion -> flywheel.v1.Rollout (lineage, ids)."""

from __future__ import annotations

import hashlib

from google.protobuf.timestamp_pb2 import Timestamp

from flywheel.policy.backends import Backend, Completion, Job
from flywheel.policy.engine import FINISH_EOS, FINISH_LENGTH, FINISH_STOP
from flywheel.policy.sampling import SamplingConfig, SamplingDefaults, resolve
from flywheel.runtime.errors import require
from flywheel.v1 import common_pb2

ROLES = ("system", "user", "assistant")

FINISH_REASONS = {
    FINISH_LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FINISH_EOS: common_pb2.FINISH_REASON_EOS_TOKEN,
    FINISH_STOP: common_pb2.FINISH_REASON_STOP_SEQUENCE,
}


def rollout_id(prompt_id: str, policy_version: str, candidate_index: int, seed: int | None) -> str:
    """Deterministic: a redelivered prompt (same id, version, candidate, request seed) keeps its ids."""
    key = "\x1f".join([prompt_id, policy_version, str(candidate_index), "" if seed is None else str(seed)])
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def raw_prompt(prompt: common_pb2.Prompt) -> str:
    """The user-facing text: the plain text, or the last user message of a chat prompt."""
    if not prompt.messages:
        return prompt.text
    users = [m.content for m in prompt.messages if m.role == "user"]
    return users[-1] if users else prompt.messages[-1].content


def prompt_id_of(prompt: common_pb2.Prompt, prompt_text: str) -> str:
    return prompt.prompt_id or "anon-" + hashlib.sha256(prompt_text.encode()).hexdigest()[:16]


def check_prompt_bytes(prompt: common_pb2.Prompt, limit: int, prefix: str = "prompt") -> None:
    """Refuse a prompt over `limit` UTF-8 bytes before anything tokenizes it (an 8 MB prompt once
    took 5.8 s of tokenizing to be refused by its token count)."""
    if prompt.messages:
        size = sum(len(m.content.encode("utf-8", "surrogatepass")) for m in prompt.messages)
        field = f"{prefix}.messages"
    else:
        size = len(prompt.text.encode("utf-8", "surrogatepass"))
        field = f"{prefix}.text"
    require(size <= limit, field, f"{size} bytes exceed the limit of {limit}")


def prompt_job(backend: Backend, prompt: common_pb2.Prompt, fallback: common_pb2.SamplingParams | None,
               defaults: SamplingDefaults, *, prefix: str = "prompt") -> Job:
    """Validate one Prompt, resolve its sampling, apply the chat template and tokenize (blocking:
    async callers run it off the event loop). Raises InvalidArgument."""
    check_prompt_bytes(prompt, defaults.max_input_bytes, prefix)
    if prompt.messages:
        for i, m in enumerate(prompt.messages):
            require(m.role in ROLES, f"{prefix}.messages[{i}].role", f"must be one of {', '.join(ROLES)}")
            require(bool(m.content.strip()), f"{prefix}.messages[{i}].content", "must not be empty")
        text = backend.template(messages=[{"role": m.role, "content": m.content} for m in prompt.messages])
    else:
        require(bool(prompt.text.strip()), f"{prefix}.text", "the prompt is empty (set text or messages)")
        text = backend.template(text=prompt.text)
    params = prompt.sampling if prompt.HasField("sampling") else fallback
    sampling = resolve(params, defaults, prefix=f"{prefix}.sampling")
    # unseeded candidates draw seeds from (prompt_id, version, index): same id, same text
    return backend.prepare(Job(prompt_text=text, sampling=sampling, prompt_id=prompt_id_of(prompt, text)), prefix)


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def to_rollout(prompt: common_pb2.Prompt, sampling: SamplingConfig, completion: Completion) -> common_pb2.Rollout:
    pid = prompt_id_of(prompt, completion.prompt_text)
    return common_pb2.Rollout(
        rollout_id=rollout_id(pid, completion.policy_version, completion.candidate_index, sampling.seed),
        prompt_id=pid,
        prompt_text=completion.prompt_text,
        response_text=completion.text,
        prompt_token_ids=completion.prompt_token_ids,
        response_token_ids=completion.token_ids,
        token_logprobs=completion.logprobs,
        policy_version=completion.policy_version,
        finish_reason=FINISH_REASONS.get(completion.finish_reason, common_pb2.FINISH_REASON_UNSPECIFIED),
        candidate_index=completion.candidate_index,
        sampling=sampling.to_proto(),
        created_at=_timestamp(completion.created_at),
        completed_at=_timestamp(completion.completed_at),
        split=prompt.split,
        raw_prompt=raw_prompt(prompt),
    )
