"""The gRPC PolicyService: Generate, GenerateStream, GetModelVersion, on top of a Backend."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from grpc import aio

from flywheel.policy.backends import Backend, StreamEnd
from flywheel.policy.rollouts import prompt_job, to_rollout
from flywheel.policy.sampling import SamplingDefaults
from flywheel.runtime.errors import require
from flywheel.v1 import common_pb2, policy_pb2, policy_pb2_grpc


def _timeout(context: aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else max(0.0, remaining)


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, backend: Backend, defaults: SamplingDefaults, *, max_prompts: int = 256,
                 max_sequences: int = 512) -> None:
        self.backend = backend
        self.defaults = defaults
        self.max_prompts = max_prompts
        self.max_sequences = max_sequences  # the policy queue: a request that can never fit is refused

    async def Generate(self, request: policy_pb2.GenerateRequest,
                       context: aio.ServicerContext) -> policy_pb2.GenerateResponse:
        require(len(request.prompts) > 0, "prompts", "at least one prompt is required")
        require(len(request.prompts) <= self.max_prompts, "prompts",
                f"at most {self.max_prompts} prompts per request, got {len(request.prompts)}")
        fallback = request.sampling if request.HasField("sampling") else None
        # Templating and tokenizing are CPU work: off the event loop, so health checks stay fast.
        jobs = await asyncio.to_thread(lambda: [
            prompt_job(self.backend, p, fallback, self.defaults, prefix=f"prompts[{i}]")
            for i, p in enumerate(request.prompts)])
        sequences = sum(job.sampling.n for job in jobs)
        require(sequences <= self.max_sequences, "prompts",
                f"{sequences} sequences (prompts x n) exceed the queue limit of {self.max_sequences}")
        grouped = await self.backend.generate(jobs, timeout=_timeout(context))
        rollouts = [to_rollout(prompt, job.sampling, completion)
                    for prompt, job, group in zip(request.prompts, jobs, grouped) for completion in group]
        versions = {r.policy_version for r in rollouts}
        # A swap can land between two batches of one large request: report the newest version seen.
        version = max(versions) if versions else self.backend.version
        return policy_pb2.GenerateResponse(rollouts=rollouts, policy_version=version)

    async def GenerateStream(self, request: policy_pb2.GenerateStreamRequest,
                             context: aio.ServicerContext) -> AsyncIterator[policy_pb2.GenerateStreamChunk]:
        require(request.HasField("prompt"), "prompt", "is required")
        fallback = request.sampling if request.HasField("sampling") else None
        job = await asyncio.to_thread(prompt_job, self.backend, request.prompt, fallback, self.defaults,
                                      prefix="prompt")
        require(job.sampling.n == 1, "prompt.sampling.n", f"streaming supports n = 1 only, got {job.sampling.n}")
        async for item in self.backend.stream(job, timeout=_timeout(context)):
            if isinstance(item, StreamEnd):
                yield policy_pb2.GenerateStreamChunk(rollout=to_rollout(request.prompt, job.sampling, item.completion))
            else:
                yield policy_pb2.GenerateStreamChunk(token=policy_pb2.GeneratedToken(
                    id=item.id, text=item.text, logprob=item.logprob, special=item.special))

    async def GetModelVersion(self, request: common_pb2.GetModelVersionRequest,
                              context: aio.ServicerContext) -> common_pb2.ModelVersion:
        return self.backend.model_version()
