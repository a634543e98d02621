"""The gRPC PolicyService on loopback with the real SmolLM2 weights: fields, validation, batching,
streaming, overload and deadlines."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from flywheel.policy.app import build_components
from flywheel.policy.backends import LocalBackend
from flywheel.policy.engine import PolicyEngine
from flywheel.policy.rollouts import rollout_id
from flywheel.policy.settings import PolicySettings
from flywheel.runtime.client import aio_channel
from flywheel.v1 import common_pb2, policy_pb2, policy_pb2_grpc
from waiting import wait_until_async


@pytest.fixture(scope="module")
def engine():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_policy_engine.py
    yield PolicyEngine.from_checkpoint()
    torch.set_num_threads(threads)


@pytest.fixture
def start_policy(engine, settings_factory, serve):
    async def start(**overrides):
        opts = dict(policy_http_enabled=False, policy_worker_enabled=False, policy_reload_enabled=False)
        opts.update(overrides)
        settings = settings_factory(PolicySettings, **opts)
        backend = LocalBackend(engine, max_batch_size=settings.policy_max_batch_size,
                               batch_wait_ms=settings.policy_batch_wait_ms, max_queue=settings.policy_max_queue)
        parts = build_components(settings, backend)
        target = await serve(parts.runtime)
        channel = aio_channel(target, retries=False)
        return parts, policy_pb2_grpc.PolicyServiceStub(channel)

    return start


def prompt(pid: str, text: str = "Say hello.", **sampling) -> common_pb2.Prompt:
    p = common_pb2.Prompt(prompt_id=pid, text=text, split="eval", metadata={"source": "test"})
    if sampling:
        p.sampling.CopyFrom(common_pb2.SamplingParams(**sampling))
    return p


async def test_generate_fills_every_rollout_field(start_policy) -> None:
    parts, stub = await start_policy()
    request = policy_pb2.GenerateRequest(
        prompts=[prompt("p-1"), common_pb2.Prompt(prompt_id="p-2", split="train", messages=[
            common_pb2.ChatMessage(role="system", content="You are terse."),
            common_pb2.ChatMessage(role="user", content="Name a fruit.")])],
        sampling=common_pb2.SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=8, n=2, seed=42))
    response = await stub.Generate(request, timeout=120)
    assert response.policy_version == "policy-0000"
    assert [(r.prompt_id, r.candidate_index) for r in response.rollouts] == [
        ("p-1", 0), ("p-1", 1), ("p-2", 0), ("p-2", 1)]
    for r in response.rollouts:
        assert r.rollout_id == rollout_id(r.prompt_id, "policy-0000", r.candidate_index, 42)
        assert r.prompt_text.startswith("<|im_start|>") and r.prompt_text.endswith("<|im_start|>assistant\n")
        assert r.prompt_token_ids and r.response_token_ids
        assert len(r.token_logprobs) == len(r.response_token_ids) <= 8
        assert all(lp <= 0 for lp in r.token_logprobs)
        assert r.finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_EOS_TOKEN)
        assert r.policy_version == "policy-0000"
        assert r.sampling.temperature == pytest.approx(0.8) and r.sampling.seed == 42 and r.sampling.n == 2
        assert r.created_at.ToNanoseconds() <= r.completed_at.ToNanoseconds()
        assert r.created_at.seconds > 0
    assert [r.split for r in response.rollouts] == ["eval", "eval", "train", "train"]
    assert response.rollouts[0].raw_prompt == "Say hello."
    assert response.rollouts[2].raw_prompt == "Name a fruit."
    assert "You are terse." in response.rollouts[2].prompt_text
    assert len({r.rollout_id for r in response.rollouts}) == 4
    # same request again: identical ids and tokens (seeded), i.e. redelivery is idempotent
    again = await stub.Generate(request, timeout=120)
    assert [r.rollout_id for r in again.rollouts] == [r.rollout_id for r in response.rollouts]
    assert [list(r.response_token_ids) for r in again.rollouts] == [
        list(r.response_token_ids) for r in response.rollouts]
    version = await stub.GetModelVersion(common_pb2.GetModelVersionRequest())
    assert version.version == "policy-0000" and version.kind == common_pb2.MODEL_KIND_POLICY
    assert version.checkpoint_uri.startswith("file://")


@pytest.mark.parametrize("request_, field", [
    (policy_pb2.GenerateRequest(prompts=[prompt("a", temperature=-0.5, n=1)]), "temperature"),
    (policy_pb2.GenerateRequest(prompts=[prompt("a", top_p=1.5, n=1)]), "top_p"),
    (policy_pb2.GenerateRequest(prompts=[prompt("a", text="   ")]), "text"),
    (policy_pb2.GenerateRequest(prompts=[prompt("a", temperature=1.0, n=-1)]), "n"),
    (policy_pb2.GenerateRequest(prompts=[prompt("a")], sampling=common_pb2.SamplingParams(n=-3)), "n"),
    (policy_pb2.GenerateRequest(), "prompts"),
    (policy_pb2.GenerateRequest(prompts=[common_pb2.Prompt(messages=[
        common_pb2.ChatMessage(role="wizard", content="hi")])]), "role"),
])
async def test_bad_params_are_invalid_argument(start_policy, request_, field) -> None:
    _, stub = await start_policy()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(request_, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details()


async def test_concurrent_requests_are_batched(start_policy) -> None:
    parts, stub = await start_policy(policy_batch_wait_ms=50)
    requests = [policy_pb2.GenerateRequest(prompts=[prompt(f"c{i}", text=f"Tell me about the number {i}.",
                                                           temperature=1.0, max_new_tokens=4, n=1, seed=i)])
                for i in range(6)]
    responses = await asyncio.gather(*(stub.Generate(r, timeout=120) for r in requests))
    assert [r.rollouts[0].prompt_id for r in responses] == [f"c{i}" for i in range(6)]
    stats = parts.backend.batcher.stats
    assert stats.sequences == 6
    assert stats.batches < 6 and stats.max_batch > 1


async def test_generate_stream_yields_tokens_then_rollout(start_policy) -> None:
    _, stub = await start_policy()
    request = policy_pb2.GenerateStreamRequest(prompt=prompt("s-1", text="Say hi.", temperature=0.0, n=1,
                                                             max_new_tokens=8))
    chunks = [c async for c in stub.GenerateStream(request, timeout=120)]
    tokens = [c.token for c in chunks if c.HasField("token")]
    assert chunks[-1].HasField("rollout") and not chunks[-1].HasField("token")
    rollout = chunks[-1].rollout
    assert [t.id for t in tokens] == list(rollout.response_token_ids)
    assert [t.logprob for t in tokens] == pytest.approx(list(rollout.token_logprobs))
    assert "".join(t.text for t in tokens if not t.special) == rollout.response_text
    unary = await stub.Generate(policy_pb2.GenerateRequest(prompts=[request.prompt]), timeout=120)
    assert list(unary.rollouts[0].response_token_ids) == list(rollout.response_token_ids)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.GenerateStream(policy_pb2.GenerateStreamRequest(
                prompt=prompt("s-2", temperature=1.0, n=2)), timeout=30):
            pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_full_queue_is_resource_exhausted_and_deadlines_are_honoured(start_policy) -> None:
    parts, stub = await start_policy(policy_max_queue=2, policy_max_batch_size=1, policy_batch_wait_ms=0)
    long = policy_pb2.GenerateRequest(prompts=[prompt("q", temperature=1.0, n=2, max_new_tokens=48, seed=1)])
    first = asyncio.ensure_future(stub.Generate(long, timeout=300))  # occupies the engine, then queues 1 row
    await wait_until_async(lambda: parts.backend.batcher.stats.steps > 0, 120, what="the engine decoding")
    results = await asyncio.gather(*(stub.Generate(long, timeout=300) for _ in range(3)), return_exceptions=True)
    codes = [r.code() for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    # a deadline shorter than the work: DEADLINE_EXCEEDED, and the engine stops working for it
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(policy_pb2.GenerateRequest(prompts=[prompt("d", temperature=1.0, n=1,
                                                                       max_new_tokens=256)]), timeout=0.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    first.cancel()


async def test_documented_limits_n_zero_and_prompt_bytes(start_policy) -> None:
    """9 prompts x n=64 exceed the 512-sequence queue; n = 0 means 1; an 8 MB prompt is refused by
    its byte size, before tokenizing (findings 3, 6)."""
    _, stub = await start_policy()
    too_many = policy_pb2.GenerateRequest(prompts=[prompt(f"m{i}") for i in range(9)],
                                          sampling=common_pb2.SamplingParams(n=64, max_new_tokens=1))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(too_many, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompts" in info.value.details() and "576 sequences" in info.value.details()

    one = await stub.Generate(policy_pb2.GenerateRequest(prompts=[prompt("z", temperature=0.0, n=0,
                                                                         max_new_tokens=1)]), timeout=60)
    assert len(one.rollouts) == 1 and one.rollouts[0].sampling.n == 1

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(policy_pb2.GenerateRequest(prompts=[prompt("big", text="a" * 8_000_000)]), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompts[0].text" in info.value.details() and "bytes" in info.value.details()


async def test_http_api_status_codes_for_malformed_input(start_policy) -> None:
    """422 `validation` for every malformed parameter, 413 before reading an oversized body,
    unknown parameters ignored as TGI does (finding 4)."""
    import json
    import socket
    import urllib.error
    import urllib.request

    parts, _ = await start_policy(policy_http_enabled=True, policy_http_port=0)
    url = f"http://127.0.0.1:{parts.http.port}"

    def post(body: bytes, path: str = "/generate") -> tuple[int, dict]:
        req = urllib.request.Request(url + path, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def post_json(parameters, inputs: str = "hi") -> tuple[int, dict]:
        return post(json.dumps({"inputs": inputs, "parameters": parameters}).encode())

    for parameters, field in (([1, 2], "parameters"), ("x", "parameters"), ({"max_new_tokens": 1.5}, "max_new_tokens"),
                              ({"top_k": 10**12}, "top_k"), ({"seed": -1}, "seed"), ({"do_sample": "yes"}, "do_sample"),
                              ({"temperature": "hot"}, "temperature"), ({"stop": "x"}, "stop"),
                              ({"details": 1}, "details"), ({"max_new_tokens": 2**40}, "max_new_tokens")):
        status, body = await asyncio.to_thread(post_json, parameters)
        assert (status, body["error_type"]) == (422, "validation"), (parameters, body)
        assert field in body["error"], (parameters, body)
    for path in ("/generate", "/", "/generate_stream"):
        status, body = await asyncio.to_thread(post, b'{"inputs": "hi", "parameters": [1, 2]}', path)
        assert status == 422 and body["error_type"] == "validation", path
    for raw in (b'{"inputs": "hi", "parameters": {"seed": ' + b"9" * 5000 + b"}}", b"[" * 100_000 + b"]" * 100_000,
                b'{"inputs": "\xff"}'):
        status, body = await asyncio.to_thread(post, raw)
        assert (status, body["error_type"]) == (422, "validation"), raw[:40]
    status, body = await asyncio.to_thread(post_json, {"max_new_tokens": 1}, "x" * 100_000)
    assert status == 422 and "bytes" in body["error"]
    status, body = await asyncio.to_thread(post_json, {"max_new_tokens": 1, "no_such_parameter": True})
    assert status == 200 and isinstance(body["generated_text"], str)

    status, body = await asyncio.to_thread(post, b'{"inputs": "' + b"a" * 9_000_000 + b'"}')
    assert (status, body["error_type"]) == (413, "validation")

    def declared_only() -> bytes:
        """Declare 9 MB, send 10 bytes: the answer must not wait for the rest."""
        with socket.create_connection(("127.0.0.1", parts.http.port), timeout=10) as sock:
            sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 9000000\r\n\r\n{\"inputs\":")
            return sock.recv(4096)

    assert (await asyncio.to_thread(declared_only)).startswith(b"HTTP/1.1 413")
