"""gRPC servicers: flywheel.v1.RewardService and the KServe v2 `inference.GRPCInferenceService`.

Both go through the same `DynamicBatcher`, so KServe/Triton clients and Flywheel clients share
batches, the queue bound and the served model version. Validation raises `InvalidArgument`;
the shared runtime's interceptor maps errors to status codes.
"""

from __future__ import annotations

import math
import struct
from typing import AsyncIterator, Callable

from grpc import aio

from flywheel import __version__
from flywheel.kserve.v2 import open_inference_grpc_pb2 as kserve_pb2
from flywheel.kserve.v2 import open_inference_grpc_pb2_grpc as kserve_pb2_grpc
from flywheel.reward.batching import DynamicBatcher, ScoredBatch
from flywheel.reward.settings import RewardSettings
from flywheel.runtime.errors import NotFound, NotReady, clip, require
from flywheel.v1 import common_pb2, reward_pb2, reward_pb2_grpc

KSERVE_SERVICE = "inference.GRPCInferenceService"
REWARD_SERVICE = "flywheel.v1.RewardService"
KSERVE_PLATFORM = "flywheel_reward"


def _timeout(context: aio.ServicerContext, default_s: float) -> float:
    """The caller's remaining deadline, or the service default when the call has none."""
    remaining = context.time_remaining() if context is not None else None
    return default_s if remaining is None else float(remaining)


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def model_version_of(batcher: DynamicBatcher) -> common_pb2.ModelVersion:
    scorer = batcher.scorer
    return common_pb2.ModelVersion(kind=common_pb2.MODEL_KIND_REWARD, version=scorer.version,
                                   checkpoint_uri=scorer.checkpoint_uri, model_name=scorer.model_name)


def check_text(settings: RewardSettings, value: str, field: str) -> None:
    require(len(value) <= settings.reward_max_text_chars, field,
            f"longer than {settings.reward_max_text_chars} characters")


def check_pairs(settings: RewardSettings, prompts: list[str], responses: list[str],
                field: Callable[[int, str], str], items: str) -> None:
    """The limits every scoring route applies; `field(i, "prompt")` names an item's part in errors."""
    n = len(responses)
    require(n > 0, items, "must not be empty")
    require(n <= settings.reward_max_items_per_request, items,
            f"at most {settings.reward_max_items_per_request} per request, got {n}")
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        check_text(settings, prompt, field(i, "prompt"))
        check_text(settings, response, field(i, "response"))
        require(bool(prompt or response), field(i, "response"), "prompt and response are both empty")


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, batcher: DynamicBatcher, settings: RewardSettings) -> None:
        self.batcher = batcher
        self.settings = settings

    def _check_text(self, value: str, field: str) -> None:
        check_text(self.settings, value, field)

    def _validate(self, request: reward_pb2.ScoreRequest) -> None:
        check_pairs(self.settings, [it.prompt for it in request.items], [it.response for it in request.items],
                    lambda i, part: f"items[{i}].{part}", "items")

    async def score_request(self, request: reward_pb2.ScoreRequest, timeout_s: float) -> reward_pb2.ScoreResponse:
        """Validate and score one request (gRPC Score and the HTTP /v1/score route)."""
        self._validate(request)
        result = await self.batcher.score([it.prompt for it in request.items], [it.response for it in request.items],
                                          timeout_s=timeout_s)
        return _score_response(request, result)

    async def _score(self, request: reward_pb2.ScoreRequest, context: aio.ServicerContext) -> reward_pb2.ScoreResponse:
        return await self.score_request(request, _timeout(context, self.settings.reward_default_timeout_s))

    async def Score(self, request, context):  # noqa: N802 - gRPC method name
        return await self._score(request, context)

    async def ScoreStream(self, request_iterator, context) -> AsyncIterator[reward_pb2.ScoreResponse]:  # noqa: N802
        async for request in request_iterator:
            yield await self._score(request, context)

    async def Compare(self, request, context):  # noqa: N802
        self._check_text(request.prompt, "prompt")
        self._check_text(request.response_a, "response_a")
        self._check_text(request.response_b, "response_b")
        require(bool(request.response_a or request.prompt), "response_a", "must not be empty")
        require(bool(request.response_b or request.prompt), "response_b", "must not be empty")
        result = await self.batcher.score([request.prompt, request.prompt], [request.response_a, request.response_b],
                                          timeout_s=_timeout(context, self.settings.reward_default_timeout_s))
        a, b = result.values
        return reward_pb2.CompareResponse(score_a=a, score_b=b, probability_a_preferred=_sigmoid(a - b),
                                          scorer=result.scorer, scorer_version=result.scorer_version)

    async def GetModelVersion(self, request, context):  # noqa: N802
        return model_version_of(self.batcher)


def _score_response(request: reward_pb2.ScoreRequest, result: ScoredBatch) -> reward_pb2.ScoreResponse:
    scores = []
    for i, item in enumerate(request.items):
        scores.append(reward_pb2.ItemScore(
            id=item.id, score=result.values[i],
            components=[common_pb2.Score(scorer=c.scorer, scorer_version=c.version, value=c.values[i])
                        for c in result.components]))
    return reward_pb2.ScoreResponse(scores=scores, scorer=result.scorer, scorer_version=result.scorer_version)


# -- KServe v2 / Open Inference Protocol ----------------------------------------------------------

def _decode_raw_bytes(raw: bytes, field: str) -> list[bytes]:
    """BYTES tensor raw encoding: each element is a 4-byte little-endian length, then the bytes."""
    out = []
    pos = 0
    while pos < len(raw):
        require(pos + 4 <= len(raw), field, "truncated BYTES element length")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        require(pos + n <= len(raw), field, "BYTES element runs past the end")
        out.append(raw[pos:pos + n])
        pos += n
    return out


def _element_count(shape: list[int], field: str) -> int:
    """N for shape [N] or [N, 1], the only shapes docs/reward.md allows."""
    require(len(shape) in (1, 2) and (len(shape) == 1 or shape[1] == 1), f"{field}.shape",
            f"must be [N] or [N, 1], got {len(shape)} dimensions" if len(shape) != 2 else "must be [N] or [N, 1]")
    require(shape[0] >= 0, f"{field}.shape", f"dimension {shape[0]} is negative")
    return shape[0]


class KServeServicer(kserve_pb2_grpc.GRPCInferenceServiceServicer):
    """One model (settings.reward_kserve_model_name): BYTES inputs `prompt`, `response`
    (shape [N] or [N, 1]), FP32 output `score` (shape [N])."""

    INPUTS = ("prompt", "response")
    OUTPUT = "score"

    def __init__(self, batcher: DynamicBatcher, settings: RewardSettings,
                 is_ready: Callable[[], bool] | None = None) -> None:
        self.batcher = batcher
        self.settings = settings
        self.model_name = settings.reward_kserve_model_name
        self._is_ready = is_ready or (lambda: True)

    def _check_model(self, name: str, version: str) -> None:
        if name != self.model_name:
            raise NotFound(f"model {clip(name)!r} is not served here (serving {self.model_name!r})")
        current = self.batcher.scorer.version
        if version and version != current:
            raise NotFound(f"model {clip(name)!r} version {clip(version)!r} is not served (serving {current!r})")

    async def ServerLive(self, request, context):  # noqa: N802
        return kserve_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802
        return kserve_pb2.ServerReadyResponse(ready=self._is_ready())

    async def ModelReady(self, request, context):  # noqa: N802
        self._check_model(request.name, request.version)
        return kserve_pb2.ModelReadyResponse(ready=self._is_ready())

    async def ServerMetadata(self, request, context):  # noqa: N802
        return kserve_pb2.ServerMetadataResponse(name="flywheel-reward", version=__version__, extensions=[])

    async def ModelMetadata(self, request, context):  # noqa: N802
        self._check_model(request.name, request.version)
        tensor = kserve_pb2.ModelMetadataResponse.TensorMetadata
        return kserve_pb2.ModelMetadataResponse(
            name=self.model_name, versions=[self.batcher.scorer.version], platform=KSERVE_PLATFORM,
            inputs=[tensor(name=n, datatype="BYTES", shape=[-1]) for n in self.INPUTS],
            outputs=[tensor(name=self.OUTPUT, datatype="FP32", shape=[-1])])

    def _inputs(self, request: kserve_pb2.ModelInferRequest) -> tuple[dict[str, list[str]], bool]:
        raw = list(request.raw_input_contents)
        require(not raw or len(raw) == len(request.inputs), "raw_input_contents",
                "must have one entry per input")
        found: dict[str, list[str]] = {}
        for i, tensor in enumerate(request.inputs):
            field = f"inputs[{i}]"
            require(tensor.name in self.INPUTS, f"{field}.name",
                    f"unknown input {tensor.name!r} (expected {', '.join(self.INPUTS)})")
            require(tensor.name not in found, f"{field}.name", f"duplicate input {tensor.name!r}")
            require(tensor.datatype == "BYTES", f"{field}.datatype", f"must be BYTES, got {tensor.datatype!r}")
            count = _element_count(list(tensor.shape), field)
            if raw:
                require(not tensor.contents.bytes_contents, f"{field}.contents",
                        "must be empty when raw_input_contents is used")
                elements = _decode_raw_bytes(raw[i], f"raw_input_contents[{i}]")
            else:
                elements = list(tensor.contents.bytes_contents)
            require(len(elements) == count, f"{field}.contents",
                    f"has {len(elements)} elements, shape says {count}")
            texts = []
            for j, element in enumerate(elements):
                try:
                    text = element.decode("utf-8")
                except UnicodeDecodeError:
                    require(False, f"{field}.contents[{j}]", "is not valid UTF-8")
                require(len(text) <= self.settings.reward_max_text_chars, f"{field}.contents[{j}]",
                        f"longer than {self.settings.reward_max_text_chars} characters")
                texts.append(text)
            found[tensor.name] = texts
        require("response" in found, "inputs", "missing BYTES input 'response'")
        n = len(found["response"])
        prompts = found.setdefault("prompt", [""] * n)
        require(len(prompts) == n, "inputs", f"'prompt' has {len(prompts)} elements, 'response' has {n}")
        require(n > 0, "inputs", "must hold at least one element")
        require(n <= self.settings.reward_max_items_per_request, "inputs",
                f"at most {self.settings.reward_max_items_per_request} elements per request")
        # The same rule as RewardService.Score, so both APIs accept and refuse the same items.
        where = next(i for i, t in enumerate(request.inputs) if t.name == "response")
        for j, (prompt, response) in enumerate(zip(prompts, found["response"])):
            require(bool(prompt or response), f"inputs[{where}].contents[{j}]", "prompt and response are both empty")
        return found, bool(raw)

    async def ModelInfer(self, request, context):  # noqa: N802
        return await self.infer(request, _timeout(context, self.settings.reward_default_timeout_s))

    async def infer(self, request: kserve_pb2.ModelInferRequest, timeout_s: float) -> kserve_pb2.ModelInferResponse:
        """Validate and score one inference request (gRPC ModelInfer and the REST infer route)."""
        self._check_model(request.model_name, request.model_version)
        for i, out in enumerate(request.outputs):
            require(out.name == self.OUTPUT, f"outputs[{i}].name", f"unknown output {out.name!r} (only 'score')")
        if not self._is_ready():
            raise NotReady("reward model not ready")
        inputs, raw = self._inputs(request)
        result = await self.batcher.score(inputs["prompt"], inputs["response"], timeout_s=timeout_s)
        n = len(result.values)
        output = kserve_pb2.ModelInferResponse.InferOutputTensor(name=self.OUTPUT, datatype="FP32", shape=[n])
        response = kserve_pb2.ModelInferResponse(model_name=self.model_name, model_version=result.scorer_version,
                                                  id=request.id)
        if raw:  # answer in the encoding the client used (Triton clients use raw contents)
            response.raw_output_contents.append(struct.pack(f"<{n}f", *result.values))
        else:
            output.contents.fp32_contents.extend(result.values)
        response.outputs.append(output)
        return response


def registrations(reward: RewardServicer, kserve: KServeServicer) -> list[tuple[str, Callable[[aio.Server], None]]]:
    """(service name, register) pairs for ServiceRuntime.add_service."""
    return [
        (REWARD_SERVICE, lambda server: reward_pb2_grpc.add_RewardServiceServicer_to_server(reward, server)),
        (KSERVE_SERVICE, lambda server: kserve_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(kserve, server)),
    ]
