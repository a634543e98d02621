"""Preference service clients: record human feedback (pairwise choices, rankings, demonstrations).

Each event gets a fresh event id unless the caller passes one; pass your own (e.g. derived from
your app's feedback row) to make resubmission after a crash idempotent. A response is a string
(free text: the service must allow external responses) or a `ResponseRef` (a policy rollout id
and its text, so the preference keeps its lineage).
"""

from __future__ import annotations

import uuid
from typing import Any, Sequence

from flywheel.client._calls import ClientOptions, acall, async_channel, blocking_channel, call
from flywheel.v1 import common_pb2, preference_pb2, preference_pb2_grpc

ResponseLike = str | common_pb2.ResponseRef
_CHOICES = {"a": common_pb2.CHOICE_A, "b": common_pb2.CHOICE_B, "tie": common_pb2.CHOICE_TIE}


def _ref(response: ResponseLike) -> common_pb2.ResponseRef:
    return response if isinstance(response, common_pb2.ResponseRef) else common_pb2.ResponseRef(text=response)


def comparison(prompt_id: str, prompt_text: str, response_a: ResponseLike, response_b: ResponseLike, choice: str,
               *, rater_id: str = "", strength: float = 0.0, event_id: str = "") -> common_pb2.Comparison:
    """`choice`: "a", "b" or "tie". `rater_id` empty: the token's rater."""
    if choice not in _CHOICES:
        raise ValueError(f"choice must be one of {sorted(_CHOICES)}, got {choice!r}")
    return common_pb2.Comparison(event_id=event_id or uuid.uuid4().hex, rater_id=rater_id, prompt_id=prompt_id,
                                 prompt_text=prompt_text, response_a=_ref(response_a), response_b=_ref(response_b),
                                 choice=_CHOICES[choice], strength=strength)


def ranking(prompt_id: str, prompt_text: str, responses: Sequence[ResponseLike], ranks: Sequence[int], *,
            rater_id: str = "", event_id: str = "") -> common_pb2.Ranking:
    return common_pb2.Ranking(event_id=event_id or uuid.uuid4().hex, rater_id=rater_id, prompt_id=prompt_id,
                              prompt_text=prompt_text, responses=[_ref(r) for r in responses], ranks=list(ranks))


class PreferenceClient:
    """Blocking client; authenticate with a rater token (`flywheel preference issue-token`)."""

    def __init__(self, target: str, options: ClientOptions | None = None, **option_fields: Any) -> None:
        self.options = options or ClientOptions(**option_fields)
        self._channel = blocking_channel(target, self.options)
        self._stub = preference_pb2_grpc.PreferenceServiceStub(self._channel)

    def compare(self, prompt_id: str, prompt_text: str, response_a: ResponseLike, response_b: ResponseLike,
                choice: str, **fields: Any) -> preference_pb2.SubmitAck:
        event = comparison(prompt_id, prompt_text, response_a, response_b, choice, **fields)
        return call(self._stub.SubmitComparison, event, self.options)

    def rank(self, prompt_id: str, prompt_text: str, responses: Sequence[ResponseLike], ranks: Sequence[int],
             **fields: Any) -> preference_pb2.SubmitAck:
        return call(self._stub.SubmitRanking, ranking(prompt_id, prompt_text, responses, ranks, **fields), self.options)

    def consensus(self, prompt_id: str) -> common_pb2.AggregatedPreference:
        return call(self._stub.GetConsensus, preference_pb2.GetConsensusRequest(prompt_id=prompt_id), self.options)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "PreferenceClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncPreferenceClient:
    def __init__(self, target: str, options: ClientOptions | None = None, **option_fields: Any) -> None:
        self.options = options or ClientOptions(**option_fields)
        self._channel = async_channel(target, self.options)
        self._stub = preference_pb2_grpc.PreferenceServiceStub(self._channel)

    async def compare(self, prompt_id: str, prompt_text: str, response_a: ResponseLike, response_b: ResponseLike,
                      choice: str, **fields: Any) -> preference_pb2.SubmitAck:
        event = comparison(prompt_id, prompt_text, response_a, response_b, choice, **fields)
        return await acall(self._stub.SubmitComparison, event, self.options)

    async def rank(self, prompt_id: str, prompt_text: str, responses: Sequence[ResponseLike], ranks: Sequence[int],
                   **fields: Any) -> preference_pb2.SubmitAck:
        return await acall(self._stub.SubmitRanking, ranking(prompt_id, prompt_text, responses, ranks, **fields),
                           self.options)

    async def consensus(self, prompt_id: str) -> common_pb2.AggregatedPreference:
        return await acall(self._stub.GetConsensus, preference_pb2.GetConsensusRequest(prompt_id=prompt_id),
                           self.options)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncPreferenceClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
