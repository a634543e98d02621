"""Generation backends: the local transformers engine, or a remote Text Generation Inference server.

Both turn `Job`s (a templated prompt + resolved sampling) into `Completion`s carrying token ids,
behaviour logprobs, finish reason and the policy version. The gRPC service, the TGI-compatible
HTTP API and the Kafka worker are written against `Backend` only.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

from flywheel.policy import metrics
from flywheel.policy.batching import Batcher
from flywheel.policy.engine import (
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    LoadedPolicy,
    PolicyEngine,
    apply_template,
    Generation,
)
from flywheel.policy.sampling import UINT64_MASK, SamplingConfig, derived_seed
from flywheel.runtime.errors import FlywheelError, InvalidArgument, NotReady, Overloaded, require
from flywheel.v1 import common_pb2
from flywheel.versions import version_order

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One prompt of a request: templated text, resolved sampling, token ids once validated."""

    prompt_text: str
    sampling: SamplingConfig
    prompt_ids: list[int] | None = None
    # a Prompt's id: unseeded candidates then draw `derived_seed(prompt_id, version, index)`
    prompt_id: str | None = None


@dataclass
class Completion:
    prompt_text: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    policy_version: str
    candidate_index: int
    seed: int | None
    created_at: float
    completed_at: float


@dataclass
class StreamToken:
    id: int
    text: str
    logprob: float
    special: bool


@dataclass
class StreamEnd:
    """Last item of a stream: the complete result."""

    completion: Completion
    extra: dict[str, Any] = field(default_factory=dict)


class Backend(abc.ABC):
    name: str = "backend"

    async def start(self) -> None:  # BackgroundWorker protocol
        pass

    async def stop(self) -> None:
        pass

    @property
    @abc.abstractmethod
    def version(self) -> str: ...

    @abc.abstractmethod
    def model_version(self) -> common_pb2.ModelVersion: ...

    @abc.abstractmethod
    def template(self, text: str | None = None, messages: Sequence[dict[str, str]] | None = None) -> str: ...

    @abc.abstractmethod
    def prepare(self, job: Job, field_name: str = "prompt") -> Job:
        """Validate the job against the model (prompt length); raises InvalidArgument."""

    @abc.abstractmethod
    async def generate(self, jobs: list[Job], *, timeout: float | None = None,
                       block: bool = False) -> list[list[Completion]]:
        """`job.sampling.n` completions per job, in job order and candidate order."""

    @abc.abstractmethod
    def stream(self, job: Job, *, timeout: float | None = None) -> AsyncIterator[StreamToken | StreamEnd]: ...

    async def ready(self) -> bool:
        return True


class IncrementalDecoder:
    """Text of each streamed token, robust to multi-token characters (TGI's prefix/read offsets)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self._tokenizer.decode(self.ids[self._prefix:self._read], skip_special_tokens=False)
        new_text = self._tokenizer.decode(self.ids[self._prefix:], skip_special_tokens=False)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return new_text[len(prefix_text):]
        return ""


# --------------------------------------------------------------------------------------------------
# Local: the in-process engine behind the batcher
# --------------------------------------------------------------------------------------------------
class LocalBackend(Backend):
    name = "local"

    def __init__(self, engine: PolicyEngine, *, max_batch_size: int = 32, batch_wait_ms: float = 5.0,
                 max_queue: int = 512, max_input_tokens: int = 2048) -> None:
        self.engine = engine
        self.batcher = Batcher(engine, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms,
                               max_queue=max_queue)
        self.max_input_tokens = max_input_tokens
        set_version_metrics(None, engine.version)

    async def start(self) -> None:
        await self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()

    @property
    def version(self) -> str:
        return self.engine.version

    def swap(self, policy: LoadedPolicy) -> None:
        old = self.engine.swap(policy)
        set_version_metrics(old.version, policy.version)

    def model_version(self) -> common_pb2.ModelVersion:
        policy = self.engine.current
        mv = common_pb2.ModelVersion(kind=common_pb2.MODEL_KIND_POLICY, version=policy.version,
                                     checkpoint_uri=policy.path.resolve().as_uri(), model_name=policy.model_name)
        mv.created_at.FromSeconds(int(policy.loaded_at))
        return mv

    def template(self, text: str | None = None, messages: Sequence[dict[str, str]] | None = None) -> str:
        return self.engine.current.template(text=text, messages=messages)

    def prepare(self, job: Job, field_name: str = "prompt") -> Job:
        policy = self.engine.current
        ids = job.prompt_ids if job.prompt_ids is not None else policy.encode(job.prompt_text)
        require(len(ids) > 0, field_name, "the prompt is empty")
        require(len(ids) <= self.max_input_tokens, field_name,
                f"{len(ids)} prompt tokens exceed the limit of {self.max_input_tokens}")
        require(len(ids) < policy.max_positions, field_name,
                f"{len(ids)} prompt tokens leave no room in the model's {policy.max_positions}-token context")
        job.prompt_ids = list(ids)
        return job

    def _sequences(self, job: Job) -> list[Generation]:
        if job.prompt_ids is None:
            self.prepare(job)
        return [Generation.from_config(job.prompt_text, job.sampling, c, list(job.prompt_ids or []),
                                       seed_key=(job.prompt_id, c) if job.prompt_id is not None else None)
                for c in range(job.sampling.n)]

    @staticmethod
    def _completion(job: Job, seq: Generation, candidate_index: int, created_at: float) -> Completion:
        return Completion(prompt_text=job.prompt_text, prompt_token_ids=list(seq.prompt_ids or []),
                          token_ids=list(seq.token_ids), logprobs=list(seq.logprobs), text=seq.text,
                          finish_reason=seq.finish_reason or FINISH_LENGTH, policy_version=seq.policy_version,
                          candidate_index=candidate_index, seed=seq.seed_used, created_at=created_at,
                          completed_at=seq.completed_at or time.time())

    async def generate(self, jobs: list[Job], *, timeout: float | None = None,
                       block: bool = False) -> list[list[Completion]]:
        created = time.time()
        grouped = [self._sequences(job) for job in jobs]
        flat = [s for group in grouped for s in group]
        await self.batcher.generate(flat, timeout=timeout, block=block)
        return [[self._completion(job, s, c, created) for c, s in enumerate(group)]
                for job, group in zip(jobs, grouped)]

    async def stream(self, job: Job, *, timeout: float | None = None) -> AsyncIterator[StreamToken | StreamEnd]:
        created = time.time()
        [seq] = self._sequences(Job(job.prompt_text, job.sampling.with_n(1), job.prompt_ids))
        decoder: IncrementalDecoder | None = None
        async for token, logprob in self.batcher.stream(seq, timeout=timeout):
            if decoder is None:
                decoder = IncrementalDecoder(self.engine.current.tokenizer)
            special = token in self.engine.current.special_ids
            yield StreamToken(id=token, text=decoder.push(token), logprob=logprob, special=special)
        yield StreamEnd(self._completion(job, seq, 0, created))


def set_version_metrics(old: str | None, new: str) -> None:
    if old is not None and old != new:
        try:
            metrics.VERSION_INFO.remove(old)
        except KeyError:
            pass
    metrics.VERSION_INFO.labels(new).set(1)
    metrics.VERSION_NUMBER.set(version_order(new))


# --------------------------------------------------------------------------------------------------
# Remote: a Text Generation Inference server through the `text-generation` client
# --------------------------------------------------------------------------------------------------
_TGI_FINISH = {"length": FINISH_LENGTH, "eos_token": FINISH_EOS, "stop_sequence": FINISH_STOP}


class TGIBackend(Backend):
    """Forwards generation to a TGI server (or another Flywheel policy's TGI-compatible API).

    Prompts are templated locally with `tokenizer_dir`'s chat template and sent as raw inputs, as
    TGI expects. Each candidate is one `generate(details=True, decoder_input_details=True)` call
    with seed = request seed + candidate index, so candidates differ and replay exactly. The
    policy version is the server's /info `model_sha` (a Flywheel server reports its policy
    version there) unless `version` is configured.
    """

    name = "tgi"

    def __init__(self, base_url: str, *, tokenizer_dir: Path | None = None, timeout_s: float = 60.0,
                 version: str | None = None, max_input_tokens: int = 2048) -> None:
        from text_generation import AsyncClient
        from transformers import AutoTokenizer

        if tokenizer_dir is None:
            from flywheel.models import smollm2_checkpoint

            tokenizer_dir = smollm2_checkpoint()
        self.base_url = base_url.rstrip("/")
        self.client = AsyncClient(self.base_url, timeout=int(max(1, timeout_s)))
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.timeout_s = timeout_s
        self.max_input_tokens = max_input_tokens
        self._configured_version = version
        self._info: dict[str, Any] = {}
        self._session: Any = None

    async def _http(self) -> Any:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        return self._session

    async def start(self) -> None:
        try:
            await self.refresh_info()
        except NotReady as exc:
            log.warning("TGI server not reachable yet: %s", exc)

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def refresh_info(self) -> dict[str, Any]:
        import aiohttp

        session = await self._http()
        try:
            async with session.get(f"{self.base_url}/info") as resp:
                if resp.status != 200:
                    raise NotReady(f"TGI /info answered {resp.status}")
                info = await resp.json()
        except aiohttp.ClientError as exc:
            raise NotReady(f"TGI server {self.base_url} unreachable: {exc}") from exc
        if self._info.get("model_sha") != info.get("model_sha"):
            set_version_metrics(self.version if self._info else None, self._version_from(info))
        self._info = info
        return info

    def _version_from(self, info: dict[str, Any]) -> str:
        if self._configured_version:
            return self._configured_version
        return str(info.get("model_sha") or f"tgi:{info.get('model_id', 'unknown')}")

    async def ready(self) -> bool:
        import aiohttp

        session = await self._http()
        try:
            async with session.get(f"{self.base_url}/health") as resp:
                return resp.status == 200
        except aiohttp.ClientError:
            return False

    @property
    def version(self) -> str:
        return self._version_from(self._info)

    def model_version(self) -> common_pb2.ModelVersion:
        return common_pb2.ModelVersion(kind=common_pb2.MODEL_KIND_POLICY, version=self.version,
                                       checkpoint_uri=self.base_url,
                                       model_name=str(self._info.get("model_id", "")))

    def template(self, text: str | None = None, messages: Sequence[dict[str, str]] | None = None) -> str:
        return apply_template(self.tokenizer, text, messages)

    def prepare(self, job: Job, field_name: str = "prompt") -> Job:
        ids = self.tokenizer(job.prompt_text, add_special_tokens=False)["input_ids"]
        require(len(ids) > 0, field_name, "the prompt is empty")
        require(len(ids) <= self.max_input_tokens, field_name,
                f"{len(ids)} prompt tokens exceed the limit of {self.max_input_tokens}")
        job.prompt_ids = list(ids)
        return job

    @staticmethod
    def _parameters(sampling: SamplingConfig, seed: int) -> dict[str, Any]:
        greedy = sampling.greedy
        return dict(
            do_sample=not greedy,
            max_new_tokens=sampling.max_new_tokens,
            stop_sequences=list(sampling.stop),
            temperature=None if greedy else sampling.temperature,
            top_k=sampling.top_k or None,
            top_p=sampling.top_p if sampling.top_p < 1.0 else None,
            seed=seed,
        )

    def _seed(self, job: Job, candidate_index: int) -> int:
        seed = job.sampling.candidate_seed(candidate_index)
        if seed is not None:
            return seed
        if job.prompt_id is not None:
            return derived_seed(job.prompt_id, self.version, candidate_index)
        return random.getrandbits(63)

    async def _call(self, coro: Any) -> Any:
        import aiohttp
        from text_generation import errors

        try:
            return await coro
        except errors.ValidationError as exc:
            raise InvalidArgument("sampling", f"rejected by the TGI server: {exc}") from exc
        except errors.OverloadedError as exc:
            raise Overloaded(f"TGI server overloaded: {exc}") from exc
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise NotReady(f"TGI server {self.base_url} unreachable: {exc}") from exc
        except asyncio.TimeoutError:
            raise
        except errors.UnknownError as exc:
            raise FlywheelError(f"TGI server error: {exc}") from exc

    async def generate(self, jobs: list[Job], *, timeout: float | None = None,
                       block: bool = False) -> list[list[Completion]]:
        for job in jobs:
            if job.prompt_ids is None:
                self.prepare(job)
        await self.refresh_info()
        version = self.version
        created = time.time()

        async def one(job: Job, c: int) -> Completion:
            seed = self._seed(job, c)
            response = await self._call(self.client.generate(
                job.prompt_text, decoder_input_details=True, **self._parameters(job.sampling, seed)))
            details = response.details
            prompt_ids = [t.id for t in details.prefill] or list(job.prompt_ids or [])
            return Completion(
                prompt_text=job.prompt_text, prompt_token_ids=prompt_ids,
                token_ids=[t.id for t in details.tokens],
                logprobs=[float(t.logprob) if t.logprob is not None else float("nan") for t in details.tokens],
                text=response.generated_text, finish_reason=_TGI_FINISH.get(details.finish_reason.value,
                                                                            FINISH_LENGTH),
                policy_version=version, candidate_index=c, seed=details.seed if details.seed is not None else seed,
                created_at=created, completed_at=time.time())

        calls = [asyncio.gather(*(one(job, c) for c in range(job.sampling.n))) for job in jobs]
        try:
            results = await asyncio.wait_for(asyncio.gather(*calls), timeout)
        except asyncio.TimeoutError:
            from flywheel.runtime.errors import DeadlineExceeded

            raise DeadlineExceeded("deadline exceeded waiting for the TGI server") from None
        tokens = sum(len(c.token_ids) for group in results for c in group)
        metrics.GENERATED_TOKENS.inc(tokens)
        return [list(group) for group in results]

    async def stream(self, job: Job, *, timeout: float | None = None) -> AsyncIterator[StreamToken | StreamEnd]:
        if job.prompt_ids is None:
            self.prepare(job)
        await self.refresh_info()
        created = time.time()
        seed = self._seed(job, 0)
        ids: list[int] = []
        logprobs: list[float] = []
        text = ""
        finish = FINISH_LENGTH
        iterator = self.client.generate_stream(job.prompt_text, **self._parameters(job.sampling, seed))
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                response = await asyncio.wait_for(self._call(iterator.__anext__()), remaining)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                from flywheel.runtime.errors import DeadlineExceeded

                raise DeadlineExceeded("deadline exceeded streaming from the TGI server") from None
            token = response.token
            ids.append(token.id)
            logprobs.append(float(token.logprob) if token.logprob is not None else float("nan"))
            metrics.GENERATED_TOKENS.inc()
            yield StreamToken(id=token.id, text=token.text, logprob=logprobs[-1], special=token.special)
            if response.details is not None:
                finish = _TGI_FINISH.get(response.details.finish_reason.value, FINISH_LENGTH)
                if response.details.seed is not None:
                    seed = response.details.seed
                text = response.generated_text or ""
        yield StreamEnd(Completion(
            prompt_text=job.prompt_text, prompt_token_ids=list(job.prompt_ids or []), token_ids=ids,
            logprobs=logprobs, text=text, finish_reason=finish, policy_version=self.version, candidate_index=0,
            seed=seed & UINT64_MASK, created_at=created, completed_at=time.time()))
