"""The reward service over HTTP/JSON: the contracts RL frameworks and inference clients already speak.

One port (`reward_http_port`), the same servicers, dynamic batcher, limits, deadlines and metrics
as the gRPC APIs:

- Open Inference Protocol v2 REST (KServe, Triton clients): `GET /v2/health/live`,
  `GET /v2/health/ready`, `GET /v2`, `GET /v2/models/{name}[/versions/{v}]`, `.../ready`,
  `POST .../infer` with BYTES inputs `prompt` (optional) and `response`, FP32 output `score` -
  the tensor names of the gRPC ModelInfer.
- OpenRLHF's remote reward model (`--remote_rm_url http://host:port/get_reward`):
  `{"query": [...], "prompts": [...], "labels": [...]}` -> `{"rewards", "scores", "extra_logs"}`.
  `query` is prompt + response as the trainer decoded it; when it starts with the matching
  prompt, the rest is the response, otherwise (or with no prompt) the whole query is scored as
  the response. `labels` are accepted and not used (a reward model has no reference answer).
- slime's remote reward model (`--rm-type remote_rm --rm-url http://host:port/slime/reward`):
  one `{"prompt", "response", "label"}` -> a bare JSON number.
- Flywheel's own `POST /v1/score`: the JSON form of `ScoreRequest` -> `ScoreResponse`.

Deadline: the `X-Flywheel-Timeout-S` header (seconds), else `reward_default_timeout_s`. Errors are
JSON with the offending field (see `runtime.http`); health routes are public, the rest need an API
key with scope `score` unless auth is disabled. Frameworks that send no headers may put the key in
the URL: `/key/<key>/get_reward`, `/key/<key>/slime/reward`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from aiohttp import web
from google.protobuf import json_format

from flywheel.kserve.v2 import open_inference_grpc_pb2 as kserve_pb2
from flywheel.reward.service import KServeServicer, RewardServicer, check_pairs
from flywheel.reward.settings import RewardSettings
from flywheel.runtime.auth import SCOPE_SCORE, Guard, charge_http_items, http_middleware
from flywheel.runtime.errors import InvalidArgument, require
from flywheel.runtime.http import HttpServer, error_middleware, json_body
from flywheel.v1 import reward_pb2

TIMEOUT_HEADER = "X-Flywheel-Timeout-S"
PUBLIC_PREFIX = "/v2/health/"


def _str_list(value: Any, field: str) -> list[str]:
    require(isinstance(value, list), field, "must be a list of strings")
    for i, item in enumerate(value):
        require(isinstance(item, str), f"{field}[{i}]", "must be a string")
    return value


def _object(body: Any) -> dict[str, Any]:
    require(isinstance(body, dict), "body", "must be a JSON object")
    return body


def _flatten_bytes(data: Any, field: str) -> list[bytes]:
    """OIP REST BYTES data: strings, flat or nested one level ([N] or [N, 1] tensors)."""
    require(isinstance(data, list), field, "must be a list of strings")
    flat: list[bytes] = []
    for i, item in enumerate(data):
        if isinstance(item, list):
            require(len(item) == 1 and isinstance(item[0], str), f"{field}[{i}]", "must be a string or [string]")
            item = item[0]
        require(isinstance(item, str), f"{field}[{i}]", "must be a string")
        flat.append(item.encode("utf-8", "surrogatepass"))
    return flat


def infer_request(body: Any, name: str, version: str) -> kserve_pb2.ModelInferRequest:
    """An OIP REST inference body as the gRPC ModelInferRequest (so both share one validation)."""
    body = _object(body)
    inputs = body.get("inputs")
    require(isinstance(inputs, list) and inputs, "inputs", "must be a non-empty list of tensors")
    request = kserve_pb2.ModelInferRequest(model_name=name, model_version=version)
    request_id = body.get("id", "")
    require(isinstance(request_id, str), "id", "must be a string")
    request.id = request_id
    for i, tensor in enumerate(inputs):
        field = f"inputs[{i}]"
        require(isinstance(tensor, dict), field, "must be an object with name, datatype, shape, data")
        tname, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
        require(isinstance(tname, str), f"{field}.name", "must be a string")
        require(isinstance(datatype, str), f"{field}.datatype", "must be a string")
        require(isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31
                                                for d in shape), f"{field}.shape", "must be a list of integers")
        require(not (tensor.get("parameters") or {}).get("binary_data_size"), f"{field}.parameters",
                "the binary tensor data extension is not supported; send data as JSON strings")
        out = request.inputs.add(name=tname, datatype=datatype, shape=shape)
        out.contents.bytes_contents.extend(_flatten_bytes(tensor.get("data"), f"{field}.data"))
    outputs = body.get("outputs") or []
    require(isinstance(outputs, list), "outputs", "must be a list")
    for i, output in enumerate(outputs):
        require(isinstance(output, dict) and isinstance(output.get("name"), str), f"outputs[{i}].name",
                "must be a string")
        request.outputs.add(name=output["name"])
    return request


def split_query(query: str, prompt: str | None) -> tuple[str, str]:
    """OpenRLHF sends prompt + response as one decoded text; score the response given the prompt."""
    if prompt and query.startswith(prompt):
        return prompt, query[len(prompt):]
    return "", query


def _message_text(value: Any, field: str) -> str:
    """slime's prompt: a string, or chat messages (their contents, one per line)."""
    if isinstance(value, str):
        return value
    require(isinstance(value, list), field, "must be a string or a list of chat messages")
    parts = []
    for i, message in enumerate(value):
        require(isinstance(message, dict) and isinstance(message.get("content"), str), f"{field}[{i}].content",
                "must be a string")
        parts.append(message["content"])
    return "\n".join(parts)


class RewardHttpApi:
    def __init__(self, reward: RewardServicer, kserve: KServeServicer, settings: RewardSettings, guard: Guard,
                 is_ready: Callable[[], bool]) -> None:
        self.reward = reward
        self.kserve = kserve
        self.batcher = reward.batcher
        self.settings = settings
        self.guard = guard
        self.is_ready = is_ready
        limit = settings.reward_http_max_body_bytes
        self.app = web.Application(client_max_size=limit, middlewares=[
            error_middleware(settings.service_name),
            http_middleware(guard, lambda r: None if r.path.startswith(PUBLIC_PREFIX) else SCOPE_SCORE)])
        model = "/v2/models/{name}"
        versioned = "/v2/models/{name}/versions/{version}"
        self.app.add_routes([
            web.get("/v2/health/live", self.live),
            web.get("/v2/health/ready", self.ready),
            web.get("/v2", self.server_metadata),
            web.get(model, self.model_metadata), web.get(versioned, self.model_metadata),
            web.get(model + "/ready", self.model_ready), web.get(versioned + "/ready", self.model_ready),
            web.post(model + "/infer", self.infer), web.post(versioned + "/infer", self.infer),
            web.post("/get_reward", self.openrlhf),
            web.post("/slime/reward", self.slime),
            # OpenRLHF and slime take only a URL: the key may ride in it (the access log is off).
            web.post("/key/{api_key}/get_reward", self.openrlhf),
            web.post("/key/{api_key}/slime/reward", self.slime),
            web.post("/v1/score", self.score),
        ])
        self.server = HttpServer(self.app, settings.host, settings.reward_http_port, "reward")

    # BackgroundWorker protocol (the runtime starts it after the gRPC server)
    async def start(self) -> None:
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop()

    @property
    def port(self) -> int | None:
        return self.server.port

    # -- shared steps ------------------------------------------------------------------------
    def _timeout(self, request: web.Request) -> float:
        value = request.headers.get(TIMEOUT_HEADER)
        if value is None:
            return self.settings.reward_default_timeout_s
        try:
            timeout = float(value)
        except ValueError:
            raise InvalidArgument(TIMEOUT_HEADER, f"must be a number of seconds, got {value!r}") from None
        require(math.isfinite(timeout) and timeout > 0, TIMEOUT_HEADER, "must be a positive number of seconds")
        return timeout

    async def _body(self, request: web.Request) -> Any:
        return await json_body(request, self.settings.reward_http_max_body_bytes)

    async def _score(self, request: web.Request, prompts: list[str], responses: list[str],
                     field: Callable[[int, str], str], items: str):
        check_pairs(self.settings, prompts, responses, field, items)
        charge_http_items(self.guard, request, len(responses))
        return await self.batcher.score(prompts, responses, timeout_s=self._timeout(request))

    # -- Open Inference Protocol v2 ------------------------------------------------------------
    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = self.is_ready()
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        reply = await self.kserve.ServerMetadata(kserve_pb2.ServerMetadataRequest(), None)
        return web.json_response(json_format.MessageToDict(reply, preserving_proto_field_name=True))

    async def model_metadata(self, request: web.Request) -> web.Response:
        reply = await self.kserve.ModelMetadata(kserve_pb2.ModelMetadataRequest(
            name=request.match_info["name"], version=request.match_info.get("version", "")), None)
        body = json_format.MessageToDict(reply, preserving_proto_field_name=True)
        for tensor in body.get("inputs", []) + body.get("outputs", []):
            tensor["shape"] = [int(d) for d in tensor.get("shape", [])]  # int64 -> JSON numbers, not strings
        return web.json_response(body)

    async def model_ready(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        reply = await self.kserve.ModelReady(kserve_pb2.ModelReadyRequest(
            name=name, version=request.match_info.get("version", "")), None)
        return web.json_response({"name": name, "ready": reply.ready}, status=200 if reply.ready else 503)

    async def infer(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        infer = infer_request(body, request.match_info["name"], request.match_info.get("version", ""))
        charge_http_items(self.guard, request, max((len(t.contents.bytes_contents) for t in infer.inputs), default=0))
        reply = await self.kserve.infer(infer, self._timeout(request))
        out = reply.outputs[0]
        return web.json_response({
            "model_name": reply.model_name, "model_version": reply.model_version, "id": reply.id,
            "outputs": [{"name": out.name, "datatype": out.datatype, "shape": [int(d) for d in out.shape],
                         "data": list(out.contents.fp32_contents)}]})

    # -- RL frameworks -------------------------------------------------------------------------
    async def openrlhf(self, request: web.Request) -> web.Response:
        body = _object(await self._body(request))
        queries = _str_list(body.get("query"), "query")
        prompts_in = body.get("prompts")
        if prompts_in is not None:  # strings, or null where a query has no separate prompt
            require(isinstance(prompts_in, list), "prompts", "must be a list of strings")
            for i, p in enumerate(prompts_in):
                require(p is None or isinstance(p, str), f"prompts[{i}]", "must be a string or null")
            require(len(prompts_in) == len(queries), "prompts",
                    f"has {len(prompts_in)} entries, query has {len(queries)}")
        labels = body.get("labels")
        require(labels is None or (isinstance(labels, list) and len(labels) == len(queries)), "labels",
                "must be a list as long as query")
        pairs = [split_query(q, prompts_in[i] if prompts_in else None) for i, q in enumerate(queries)]
        result = await self._score(request, [p for p, _ in pairs], [r for _, r in pairs],
                                   lambda i, part: f"query[{i}]", "query")
        extra_logs = {f"{c.scorer}_scores": c.values for c in result.components} if len(result.components) > 1 else {}
        return web.json_response({"rewards": result.values, "scores": result.values, "extra_logs": extra_logs})

    async def slime(self, request: web.Request) -> web.Response:
        body = _object(await self._body(request))
        prompt = _message_text(body.get("prompt", ""), "prompt")
        response = body.get("response")
        require(isinstance(response, str), "response", "must be a string")
        result = await self._score(request, [prompt], [response], lambda i, part: part, "response")
        return web.json_response(result.values[0])

    async def score(self, request: web.Request) -> web.Response:
        body = _object(await self._body(request))
        try:
            message = json_format.ParseDict(body, reward_pb2.ScoreRequest())
        except (json_format.ParseError, TypeError, ValueError) as exc:
            raise InvalidArgument("body", f"not a ScoreRequest: {exc}") from None
        charge_http_items(self.guard, request, len(message.items))
        reply = await self.reward.score_request(message, self._timeout(request))
        return web.json_response(json_format.MessageToDict(reply, preserving_proto_field_name=True,
                                                           always_print_fields_with_no_presence=True))
