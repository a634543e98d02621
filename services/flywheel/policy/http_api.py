"""A Text Generation Inference compatible HTTP API (aiohttp), so TGI clients work against Flywheel.

Routes: POST `/` (TGI's compat route: `stream` selects SSE), POST `/generate`, POST
`/generate_stream` (server-sent events), GET `/info`, GET `/health`, GET `/metrics`.
Inputs are used verbatim, as TGI does (no chat template). Error bodies are TGI's
`{"error", "error_type"}`: 413 body too large (from Content-Length, before reading it), 422
validation, 429 overloaded, 424 generation, 503 not ready.

Parameters are typed as strictly as TGI's router (serde): integers must be JSON integers within
their Rust type (`max_new_tokens` u32, `top_k` i32, `seed` u64), flags booleans, `stop` a list of
strings, `parameters` an object; anything else is 422 `validation`. Unknown parameters are ignored,
as TGI does (its GenerateParameters struct does not deny unknown fields), so newer clients work.
`/info`'s `model_sha` is the policy version now serving. Token logprobs follow the engine's
convention (log-softmax of logits / temperature, before top-k/top-p); prefill logprobs are null.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import ssl
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from flywheel import __version__
from flywheel.policy.backends import Backend, Completion, Job, StreamEnd
from flywheel.policy.sampling import SamplingConfig, SamplingDefaults
from flywheel.runtime.errors import DeadlineExceeded, FlywheelError, InvalidArgument, NotReady, Overloaded, clip

log = logging.getLogger(__name__)

_NEUTRAL = {"repetition_penalty": 1.0, "frequency_penalty": 0.0, "typical_p": 1.0}
_UNSUPPORTED_TRUTHY = ("watermark", "grammar", "top_n_tokens", "truncate", "adapter_id")


def _error(status: int, message: str, error_type: str) -> web.Response:
    return web.json_response({"error": message, "error_type": error_type}, status=status)


def _error_for(exc: BaseException) -> tuple[int, str, str]:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):  # a chunked body grew past the limit
        return 413, "request body too large", "validation"
    if isinstance(exc, InvalidArgument):
        return 422, str(exc), "validation"
    if isinstance(exc, Overloaded):
        return 429, str(exc), "overloaded"
    if isinstance(exc, NotReady):
        return 503, str(exc), "unavailable"
    if isinstance(exc, DeadlineExceeded):
        return 408, str(exc), "timeout"
    if isinstance(exc, FlywheelError):
        return 424, str(exc), "generation"
    log.exception("HTTP generation failed", exc_info=exc)
    return 424, f"generation failed ({type(exc).__name__})", "generation"


_INT_RANGES = {"top_k": (-(2**31), 2**31 - 1), "max_new_tokens": (0, 2**32 - 1), "seed": (0, 2**64 - 1),
               "best_of": (0, 2**64 - 1), "top_n_tokens": (0, 2**32 - 1), "truncate": (0, 2**64 - 1)}
_FLAGS = ("do_sample", "details", "decoder_input_details", "return_full_text", "watermark")


def tgi_sampling(parameters: Any, defaults: SamplingDefaults) -> tuple[SamplingConfig, dict[str, Any]]:
    """TGI parameters -> SamplingConfig, with TGI's rules (sampling iff do_sample or any warper set)."""
    if parameters is not None and not isinstance(parameters, dict):
        raise InvalidArgument("parameters", "must be a JSON object")
    p = dict(parameters or {})

    def number(name: str, kind: type) -> Any:
        value = p.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgument(f"parameters.{name}", "must be a number")
        if kind is int:
            low, high = _INT_RANGES[name]
            if not isinstance(value, int):
                raise InvalidArgument(f"parameters.{name}", f"must be an integer, got {value!r}")
            if not low <= value <= high:
                raise InvalidArgument(f"parameters.{name}", f"must be in [{low}, {high}]")
            return value
        if not math.isfinite(value) or abs(value) > 3.4e38:  # an f32 in TGI
            raise InvalidArgument(f"parameters.{name}", "must be a finite 32-bit float")
        return float(value)

    for flag in _FLAGS:
        if p.get(flag) is not None and not isinstance(p[flag], bool):
            raise InvalidArgument(f"parameters.{flag}", "must be a boolean")
    temperature = number("temperature", float)
    top_k = number("top_k", int)
    top_p = number("top_p", float)
    max_new_tokens = number("max_new_tokens", int)
    seed = number("seed", int)
    best_of = number("best_of", int)
    for name in ("top_n_tokens", "truncate"):
        number(name, int)
    if temperature is not None and temperature <= 0:
        raise InvalidArgument("parameters.temperature", "must be strictly positive")
    if top_k is not None and top_k <= 0:
        raise InvalidArgument("parameters.top_k", "must be strictly positive")
    if top_p is not None and not 0 < top_p <= 1:
        raise InvalidArgument("parameters.top_p", "must be > 0.0 and <= 1.0")
    if max_new_tokens is not None and max_new_tokens <= 0:
        raise InvalidArgument("parameters.max_new_tokens", "must be strictly positive")
    if seed is not None and seed < 0:
        raise InvalidArgument("parameters.seed", "must be positive")
    if best_of is not None and best_of != 1:
        raise InvalidArgument("parameters.best_of", "only best_of = 1 is supported (use gRPC n for candidates)")
    for name, neutral in _NEUTRAL.items():
        value = number(name, float)
        if value is not None and value != neutral and not (name == "frequency_penalty" and value == 1.0):
            raise InvalidArgument(f"parameters.{name}", "is not supported by Flywheel (it would change the "
                                  "behaviour distribution the logprobs describe)")
    for name in _UNSUPPORTED_TRUTHY:
        if p.get(name):
            raise InvalidArgument(f"parameters.{name}", "is not supported by Flywheel")
    stop = p.get("stop")
    stop = [] if stop is None else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise InvalidArgument("parameters.stop", "must be a list of strings")
    sampling = bool(p.get("do_sample")) or (temperature not in (None, 1.0)) or bool(top_k) or (
        top_p is not None and top_p < 1.0)
    config = SamplingConfig(
        temperature=(temperature or 1.0) if sampling else 0.0,
        top_k=top_k or 0,
        top_p=top_p if top_p is not None else 1.0,
        max_new_tokens=max_new_tokens or defaults.max_new_tokens,
        stop=tuple(stop),
        seed=seed,
        n=1,
    ).validate(defaults, "parameters")
    options = {"details": bool(p.get("details", False)),
               "decoder_input_details": bool(p.get("decoder_input_details", False)),
               "return_full_text": bool(p.get("return_full_text", False))}
    return config, options


class TGIHttpApi:
    def __init__(self, backend: Backend, defaults: SamplingDefaults, *, host: str = "0.0.0.0", port: int = 8080,
                 max_concurrent_requests: int = 512, max_input_tokens: int = 2048,
                 max_body_bytes: int = 2_000_000, ssl_context: ssl.SSLContext | None = None) -> None:
        self.backend = backend
        self.ssl_context = ssl_context  # HTTPS (TlsFiles.http_server_context()) when set
        self.defaults = defaults
        self.host = host
        self.requested_port = port
        self.max_concurrent_requests = max_concurrent_requests
        self.max_input_tokens = max_input_tokens
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self.max_body_bytes = max_body_bytes
        # client_max_size also bounds chunked bodies (no Content-Length) while they are read.
        self.app = web.Application(client_max_size=max_body_bytes, middlewares=[self._body_limit])
        self.app.add_routes([
            web.post("/", self.compat),
            web.post("/generate", self.generate),
            web.post("/generate_stream", self.generate_stream),
            web.get("/info", self.info),
            web.get("/health", self.health),
            web.get("/metrics", self.metrics),
        ])

    # BackgroundWorker protocol ---------------------------------------------------------------------
    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.requested_port, ssl_context=self.ssl_context)
        await site.start()
        server = site._server  # aiohttp exposes the bound sockets only here
        self.port = server.sockets[0].getsockname()[1] if server and server.sockets else self.requested_port
        log.info("TGI-compatible HTTP%s API on %s:%s", "S" if self.ssl_context else "", self.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # request parsing -------------------------------------------------------------------------------
    @web.middleware
    async def _body_limit(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """413 from the declared length, before any of the body is read (a chunked body that grows
        past client_max_size while being read is mapped to 413 by `_error_for`)."""
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            return _error(413, f"request body of {request.content_length} bytes exceeds the limit of "
                          f"{self.max_body_bytes}", "validation")
        return await handler(request)

    async def _body(self, request: web.Request) -> Any:
        try:
            return await request.json()
        except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, a 5,000-digit number, deep nesting
            raise InvalidArgument("body", f"not JSON: {clip(exc)}") from exc

    async def _job(self, request: web.Request) -> tuple[Job, dict[str, Any], dict[str, Any]]:
        body = await self._body(request)
        if not isinstance(body, dict):
            raise InvalidArgument("body", "must be a JSON object")
        inputs = body.get("inputs")
        if not isinstance(inputs, str) or not inputs:
            raise InvalidArgument("inputs", "`inputs` cannot be empty")
        size = len(inputs.encode("utf-8", "surrogatepass"))
        if size > self.defaults.max_input_bytes:  # before tokenizing: bounds the tokenizer's work
            raise InvalidArgument("inputs", f"{size} bytes exceed the limit of {self.defaults.max_input_bytes}")
        sampling, options = tgi_sampling(body.get("parameters"), self.defaults)
        # Tokenizing is CPU work: off the event loop, so /health stays fast.
        job = await asyncio.to_thread(self.backend.prepare, Job(prompt_text=inputs, sampling=sampling), "inputs")
        return job, options, body

    def _response(self, job: Job, completion: Completion, options: dict[str, Any]) -> dict[str, Any]:
        text = completion.text
        if options["return_full_text"]:
            text = job.prompt_text + text
        body: dict[str, Any] = {"generated_text": text}
        if options["details"]:
            tokens = self._token_texts(completion)
            body["details"] = {
                "finish_reason": completion.finish_reason,
                "generated_tokens": len(completion.token_ids),
                "seed": completion.seed if not job.sampling.greedy else None,
                "prefill": ([{"id": i, "text": t, "logprob": None}
                             for i, t in zip(completion.prompt_token_ids, self._texts(completion.prompt_token_ids))]
                            if options["decoder_input_details"] else []),
                "tokens": tokens,
                "top_tokens": None,
                "best_of_sequences": None,
            }
        return body

    def _texts(self, ids: list[int]) -> list[str]:
        tokenizer = self._tokenizer()
        from flywheel.policy.backends import IncrementalDecoder

        decoder = IncrementalDecoder(tokenizer)
        return [decoder.push(i) for i in ids]

    def _tokenizer(self) -> Any:
        engine = getattr(self.backend, "engine", None)
        return engine.current.tokenizer if engine is not None else getattr(self.backend, "tokenizer")

    def _token_texts(self, completion: Completion) -> list[dict[str, Any]]:
        special = set(self._tokenizer().all_special_ids)
        return [{"id": i, "text": t, "logprob": lp, "special": i in special}
                for i, t, lp in zip(completion.token_ids, self._texts(completion.token_ids), completion.logprobs)]

    # handlers --------------------------------------------------------------------------------------
    async def _generate(self, request: web.Request) -> dict[str, Any]:
        job, options, _ = await self._job(request)
        [[completion]] = await self.backend.generate([job])
        return self._response(job, completion, options)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        try:
            return web.json_response(await self._generate(request))
        except Exception as exc:  # noqa: BLE001 - mapped to TGI's error body
            return _error(*_error_for(exc))

    async def compat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._body(request)
        except InvalidArgument:
            body = {}
        if isinstance(body, dict) and body.get("stream") is True:
            return await self.generate_stream(request)
        try:
            return web.json_response([await self._generate(request)])  # TGI's `/` answers a list
        except Exception as exc:  # noqa: BLE001
            return _error(*_error_for(exc))

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        try:
            job, options, _ = await self._job(request)
        except Exception as exc:  # noqa: BLE001
            return _error(*_error_for(exc))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)

        async def send(payload: dict[str, Any]) -> None:
            await response.write(b"data:" + json.dumps(payload).encode() + b"\n\n")

        pending: dict[str, Any] | None = None
        index = 0
        try:
            async for item in self.backend.stream(job):
                if isinstance(item, StreamEnd):
                    c = item.completion
                    text = (job.prompt_text + c.text) if options["return_full_text"] else c.text
                    last = pending or {"index": index, "token": {"id": 0, "text": "", "logprob": 0.0,
                                                                 "special": True}, "top_tokens": None}
                    last.update(generated_text=text, details={
                        "finish_reason": c.finish_reason, "generated_tokens": len(c.token_ids),
                        "seed": c.seed if not job.sampling.greedy else None,
                        "input_length": len(c.prompt_token_ids)})
                    await send(last)
                    pending = None
                    break
                if pending is not None:
                    await send(pending)
                index += 1
                pending = {"index": index, "token": {"id": item.id, "text": item.text, "logprob": item.logprob,
                                                     "special": item.special},
                           "top_tokens": None, "generated_text": None, "details": None}
        except Exception as exc:  # noqa: BLE001 - TGI reports mid-stream errors as an event
            _, message, error_type = _error_for(exc)
            await send({"error": message, "error_type": error_type})
        await response.write_eof()
        return response

    async def info(self, request: web.Request) -> web.Response:
        mv = self.backend.model_version()
        return web.json_response({
            "model_id": mv.model_name or mv.version,
            "model_sha": mv.version,
            "model_dtype": "float32",
            "model_device_type": "cpu",
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": self.max_concurrent_requests,
            "max_best_of": 1,
            "max_stop_sequences": self.defaults.max_stop_sequences,
            "max_input_tokens": self.max_input_tokens,
            "max_input_length": self.max_input_tokens,
            "max_total_tokens": self.max_input_tokens + self.defaults.max_new_tokens_limit,
            "validation_workers": 1,
            "max_client_batch_size": 1,
            "router": "flywheel-policy",
            "version": __version__,
            "sha": None,
            "docker_label": None,
            "flywheel_policy_version": mv.version,
            "checkpoint_uri": mv.checkpoint_uri,
        })

    async def health(self, request: web.Request) -> web.Response:
        ok = await self.backend.ready()
        return web.Response(status=200 if ok else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})
