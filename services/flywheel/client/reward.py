"""Reward service clients: score responses, compare two, read the serving model version."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from flywheel.client._calls import ClientOptions, acall, async_channel, blocking_channel, call
from flywheel.v1 import common_pb2, reward_pb2, reward_pb2_grpc


@dataclass(frozen=True)
class Score:
    response: str
    score: float
    components: dict[str, float]  # per scorer, for ensembles


@dataclass(frozen=True)
class Comparison:
    score_a: float
    score_b: float
    probability_a_preferred: float


def _request(prompt: str, responses: Sequence[str]) -> reward_pb2.ScoreRequest:
    if isinstance(responses, str):
        responses = [responses]
    return reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(id=str(i), prompt=prompt, response=r)
                                          for i, r in enumerate(responses)])


def _scores(request: reward_pb2.ScoreRequest, reply: reward_pb2.ScoreResponse) -> list[Score]:
    by_id = {s.id: s for s in reply.scores}
    return [Score(item.response, by_id[item.id].score, {c.scorer: c.value for c in by_id[item.id].components})
            for item in request.items]


def _comparison(reply: Any) -> Comparison:
    return Comparison(reply.score_a, reply.score_b, reply.probability_a_preferred)


class RewardClient:
    """Blocking client. `RewardClient("reward:50052").score("How was your day?", ["Great!", "Meh."])`."""

    def __init__(self, target: str, options: ClientOptions | None = None, **option_fields: Any) -> None:
        self.options = options or ClientOptions(**option_fields)
        self._channel = blocking_channel(target, self.options)
        self._stub = reward_pb2_grpc.RewardServiceStub(self._channel)

    def score(self, prompt: str, responses: Sequence[str] | str, *, timeout_s: float | None = None) -> list[Score]:
        request = _request(prompt, responses)
        return _scores(request, call(self._stub.Score, request, self.options, timeout_s))

    def compare(self, prompt: str, response_a: str, response_b: str, *, timeout_s: float | None = None) -> Comparison:
        request = reward_pb2.CompareRequest(prompt=prompt, response_a=response_a, response_b=response_b)
        return _comparison(call(self._stub.Compare, request, self.options, timeout_s))

    def model_version(self) -> common_pb2.ModelVersion:
        return call(self._stub.GetModelVersion, common_pb2.GetModelVersionRequest(), self.options)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "RewardClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRewardClient:
    """asyncio client (web apps): `await AsyncRewardClient(target).score(prompt, responses)`."""

    def __init__(self, target: str, options: ClientOptions | None = None, **option_fields: Any) -> None:
        self.options = options or ClientOptions(**option_fields)
        self._channel = async_channel(target, self.options)
        self._stub = reward_pb2_grpc.RewardServiceStub(self._channel)

    async def score(self, prompt: str, responses: Sequence[str] | str, *,
                    timeout_s: float | None = None) -> list[Score]:
        request = _request(prompt, responses)
        return _scores(request, await acall(self._stub.Score, request, self.options, timeout_s))

    async def compare(self, prompt: str, response_a: str, response_b: str, *,
                      timeout_s: float | None = None) -> Comparison:
        request = reward_pb2.CompareRequest(prompt=prompt, response_a=response_a, response_b=response_b)
        return _comparison(await acall(self._stub.Compare, request, self.options, timeout_s))

    async def model_version(self) -> common_pb2.ModelVersion:
        return await acall(self._stub.GetModelVersion, common_pb2.GetModelVersionRequest(), self.options)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncRewardClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


