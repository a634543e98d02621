"""Policy service clients: generate candidates for a prompt (each a Rollout with its lineage)."""

from __future__ import annotations

from typing import Any

from flywheel.client._calls import ClientOptions, acall, async_channel, blocking_channel, call
from flywheel.v1 import common_pb2, policy_pb2, policy_pb2_grpc


def _request(prompt: str | list[dict[str, str]], n: int, max_new_tokens: int, temperature: float | None,
             prompt_id: str) -> policy_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(n=n, max_new_tokens=max_new_tokens)
    if temperature is not None:
        sampling.temperature = temperature
    message = common_pb2.Prompt(prompt_id=prompt_id, sampling=sampling)
    if isinstance(prompt, str):
        message.messages.add(role="user", content=prompt)  # the chat template is applied server-side
    else:
        for m in prompt:
            message.messages.add(role=m["role"], content=m["content"])
    return policy_pb2.GenerateRequest(prompts=[message])


class PolicyClient:
    """Blocking client: `PolicyClient(target).generate("Tell me a joke", n=2)` -> list of Rollouts."""

    def __init__(self, target: str, options: ClientOptions | None = None, **option_fields: Any) -> None:
        self.options = options or ClientOptions(**option_fields)
        self._channel = blocking_channel(target, self.options)
        self._stub = policy_pb2_grpc.PolicyServiceStub(self._channel)

    def generate(self, prompt: str | list[dict[str, str]], *, n: int = 1, max_new_tokens: int = 0,
                 temperature: float | None = None, prompt_id: str = "",
                 timeout_s: float | None = None) -> list[common_pb2.Rollout]:
        """`max_new_tokens=0` and `temperature=None` use the service defaults."""
        request = _request(prompt, n, max_new_tokens, temperature, prompt_id)
        return list(call(self._stub.Generate, request, self.options, timeout_s).rollouts)

    def model_version(self) -> common_pb2.ModelVersion:
        return call(self._stub.GetModelVersion, common_pb2.GetModelVersionRequest(), self.options)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncPolicyClient:
    def __init__(self, target: str, options: ClientOptions | None = None, **option_fields: Any) -> None:
        self.options = options or ClientOptions(**option_fields)
        self._channel = async_channel(target, self.options)
        self._stub = policy_pb2_grpc.PolicyServiceStub(self._channel)

    async def generate(self, prompt: str | list[dict[str, str]], *, n: int = 1, max_new_tokens: int = 0,
                       temperature: float | None = None, prompt_id: str = "",
                       timeout_s: float | None = None) -> list[common_pb2.Rollout]:
        request = _request(prompt, n, max_new_tokens, temperature, prompt_id)
        return list((await acall(self._stub.Generate, request, self.options, timeout_s)).rollouts)

    async def model_version(self) -> common_pb2.ModelVersion:
        return await acall(self._stub.GetModelVersion, common_pb2.GetModelVersionRequest(), self.options)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncPolicyClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
