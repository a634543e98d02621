"""The reward service over real loopback gRPC: RewardService, KServe v2, errors, remote scorer."""

from __future__ import annotations

import asyncio
import math
import struct
import time

import grpc
import pytest
from grpc import aio

from flywheel.kserve.v2 import open_inference_grpc_pb2 as kserve_pb2
from flywheel.kserve.v2 import open_inference_grpc_pb2_grpc as kserve_pb2_grpc
from flywheel.reward.app import build_app
from flywheel.reward.scorers import EnsembleScorer, RemoteScorer, TransformerRewardScorer, VaderScorer
from flywheel.reward.settings import RewardSettings
from flywheel.reward.testing import GatedScorer, tiny_reward_checkpoint
from flywheel.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from waiting import wait_until_async

PAIRS = [
    ("How was your day?", "It was wonderful, thank you so much!"),
    ("Tell me about the weather.", "Terrible storms all week, I hate it."),
    ("What do you think of this film?", "A boring film."),
    ("Hi", "ok"),
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_reward_checkpoint(tmp_path_factory.mktemp("tiny") / "reward-0001", version="reward-0001", seed=3)


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> TransformerRewardScorer:
    return TransformerRewardScorer(tiny_dir, max_length=64)


def reward_settings(settings_factory, **overrides) -> RewardSettings:
    base = dict(reward_worker_enabled=False, reward_reload_enabled=False, reward_max_wait_ms=20.0)
    base.update(overrides)
    return settings_factory(RewardSettings, **base)


def request_of(pairs, prefix="i") -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(id=f"{prefix}{k}", prompt=p, response=r)
                                          for k, (p, r) in enumerate(pairs)])


async def start(settings_factory, serve, scorer, **overrides):
    app = build_app(reward_settings(settings_factory, **overrides), scorer=scorer)
    target = await serve(app.runtime)
    return app, target


async def test_score_stream_compare_and_version(settings_factory, serve, tiny) -> None:
    app, target = await start(settings_factory, serve, tiny)
    expected = tiny.score([p for p, _ in PAIRS], [r for _, r in PAIRS])
    async with aio.insecure_channel(target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        reply = await stub.Score(request_of(PAIRS))
        assert [s.id for s in reply.scores] == ["i0", "i1", "i2", "i3"]
        assert [s.score for s in reply.scores] == pytest.approx(expected, abs=1e-5)
        assert (reply.scorer, reply.scorer_version) == ("transformer", "reward-0001")
        assert [(c.scorer, c.scorer_version) for c in reply.scores[0].components] == [("transformer", "reward-0001")]

        async def requests():
            for k in range(3):
                yield request_of(PAIRS[k:k + 2], prefix=f"s{k}-")

        streamed = [r async for r in stub.ScoreStream(requests())]
        assert [[s.id for s in r.scores] for r in streamed] == [["s0-0", "s0-1"], ["s1-0", "s1-1"], ["s2-0", "s2-1"]]
        assert streamed[1].scores[0].score == pytest.approx(expected[1], abs=1e-5)

        cmp = await stub.Compare(reward_pb2.CompareRequest(prompt=PAIRS[0][0], response_a=PAIRS[0][1],
                                                           response_b="I hate this."))
        b = tiny.score([PAIRS[0][0]], ["I hate this."])[0]
        assert cmp.score_a == pytest.approx(expected[0], abs=1e-5) and cmp.score_b == pytest.approx(b, abs=1e-5)
        assert cmp.probability_a_preferred == pytest.approx(1 / (1 + math.exp(-(cmp.score_a - cmp.score_b))), abs=1e-6)

        mv = await stub.GetModelVersion(common_pb2.GetModelVersionRequest())
        assert (mv.kind, mv.version, mv.model_name) == (common_pb2.MODEL_KIND_REWARD, "reward-0001", "tiny-bert-reward")
        assert mv.checkpoint_uri.endswith("reward-0001")


async def test_malformed_input_is_invalid_argument(settings_factory, serve) -> None:
    _, target = await start(settings_factory, serve, VaderScorer(), reward_max_items_per_request=4,
                            reward_max_text_chars=100)
    async with aio.insecure_channel(target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        bad = [
            (reward_pb2.ScoreRequest(), "items"),
            (request_of([("p", "r")] * 5), "items"),
            (request_of([("p", "x" * 101)]), "items[0].response"),
            (request_of([("p", "r"), ("", "")]), "items[1]"),
        ]
        for request, field in bad:
            with pytest.raises(aio.AioRpcError) as err:
                await stub.Score(request)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in err.value.details()
        with pytest.raises(aio.AioRpcError) as err:
            await stub.Compare(reward_pb2.CompareRequest(prompt="p", response_a="a", response_b="b" * 101))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # Bytes that are not a ScoreRequest (a string field holding invalid UTF-8).
        raw = channel.unary_unary("/flywheel.v1.RewardService/Score", request_serializer=lambda b: b,
                                  response_deserializer=lambda b: b)
        item = b"\x1a\x02\xff\xfe"  # ScoreItem.response (field 3) = invalid UTF-8
        with pytest.raises(aio.AioRpcError) as err:
            await raw(b"\x0a" + bytes([len(item)]) + item)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_queue_overflow_is_resource_exhausted_and_deadline_exceeded(settings_factory, serve) -> None:
    gated = GatedScorer()
    app, target = await start(settings_factory, serve, gated, reward_max_batch_size=2, reward_max_wait_ms=0.0,
                              reward_max_queue_items=4)
    async with aio.insecure_channel(target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        first = asyncio.ensure_future(stub.Score(request_of([("p", "a")]), timeout=30))
        await wait_until_async(lambda: gated.entered == [1], what="the first forward pass to block")
        queued = [asyncio.ensure_future(stub.Score(request_of([("p", "bb"), ("p", "ccc")]), timeout=30))
                  for _ in range(2)]
        await wait_until_async(lambda: app.batcher.queued_items == 4, what="a full queue")
        with pytest.raises(aio.AioRpcError) as err:
            await stub.Score(request_of([("p", "dddd")]), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        gated.gate.set()
        assert [s.score for s in (await first).scores] == [1.0]
        for q in queued:
            assert [s.score for s in (await q).scores] == [2.0, 3.0]
        # A deadline the service cannot meet: the call ends DEADLINE_EXCEEDED, the item is dropped.
        gated.gate.clear()
        blocker = asyncio.ensure_future(stub.Score(request_of([("p", "x")]), timeout=30))
        await wait_until_async(lambda: len(gated.entered) == 4, what="the blocker's forward pass")
        with pytest.raises(aio.AioRpcError) as err:
            await stub.Score(request_of([("p", "late")]), timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        gated.gate.set()
        await blocker
        await wait_until_async(lambda: app.batcher.queued_items == 0, what="the dropped item to leave the queue")
        assert 4 not in gated.calls and sum(gated.calls) == 6  # "late" never reached the scorer


async def test_concurrent_clients_match_unbatched_real_minilm(settings_factory, serve) -> None:
    """The real MiniLM (fresh head: reward-0000): 24 concurrent clients, results equal to unbatched."""
    scorer = TransformerRewardScorer(max_length=64)
    assert scorer.version == "reward-0000"
    app, target = await start(settings_factory, serve, scorer, reward_max_batch_size=8, reward_max_wait_ms=50.0)
    pairs = [(PAIRS[k % 4][0], f"{PAIRS[(k * 3) % 4][1]} (variant {k})") for k in range(24)]
    expected = [scorer.score([p], [r])[0] for p, r in pairs]
    async with aio.insecure_channel(target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        replies = await asyncio.gather(*(stub.Score(request_of([pair])) for pair in pairs))
    assert [r.scores[0].score for r in replies] == pytest.approx(expected, abs=1e-4)
    assert app.batcher.batches < len(pairs)  # they shared forward passes


async def test_kserve_v2_client_with_raw_generated_stubs(settings_factory, serve, tiny) -> None:
    _, target = await start(settings_factory, serve, tiny, reward_kserve_model_name="reward")
    prompts = [p for p, _ in PAIRS]
    responses = [r for _, r in PAIRS]
    expected = tiny.score(prompts, responses)
    channel = grpc.insecure_channel(target)  # a plain blocking client, as a Triton/KServe user would write
    try:
        stub = kserve_pb2_grpc.GRPCInferenceServiceStub(channel)
        call = lambda method, request: asyncio.to_thread(method, request, timeout=30)  # noqa: E731
        assert (await call(stub.ServerLive, kserve_pb2.ServerLiveRequest())).live
        assert (await call(stub.ServerReady, kserve_pb2.ServerReadyRequest())).ready
        assert (await call(stub.ModelReady, kserve_pb2.ModelReadyRequest(name="reward"))).ready
        meta = await call(stub.ModelMetadata, kserve_pb2.ModelMetadataRequest(name="reward"))
        assert [(t.name, t.datatype) for t in meta.inputs] == [("prompt", "BYTES"), ("response", "BYTES")]
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("score", "FP32", [-1])]
        assert list(meta.versions) == ["reward-0001"]
        server = await call(stub.ServerMetadata, kserve_pb2.ServerMetadataRequest())
        assert server.name == "flywheel-reward"

        tensor = kserve_pb2.ModelInferRequest.InferInputTensor
        request = kserve_pb2.ModelInferRequest(model_name="reward", id="req-1", inputs=[
            tensor(name="prompt", datatype="BYTES", shape=[4], contents=kserve_pb2.InferTensorContents(
                bytes_contents=[p.encode() for p in prompts])),
            tensor(name="response", datatype="BYTES", shape=[4, 1], contents=kserve_pb2.InferTensorContents(
                bytes_contents=[r.encode() for r in responses])),
        ])
        reply = await call(stub.ModelInfer, request)
        assert (reply.model_name, reply.model_version, reply.id) == ("reward", "reward-0001", "req-1")
        (out,) = reply.outputs
        assert (out.name, out.datatype, list(out.shape)) == ("score", "FP32", [4])
        assert list(out.contents.fp32_contents) == pytest.approx(expected, abs=1e-5)

        # Raw contents, as tritonclient sends them: length-prefixed BYTES in, little-endian FP32 out.
        def raw_bytes(texts):
            return b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)

        raw_request = kserve_pb2.ModelInferRequest(
            model_name="reward", inputs=[tensor(name="prompt", datatype="BYTES", shape=[4]),
                                         tensor(name="response", datatype="BYTES", shape=[4])],
            raw_input_contents=[raw_bytes(prompts), raw_bytes(responses)])
        raw_reply = await call(stub.ModelInfer, raw_request)
        assert list(struct.unpack("<4f", raw_reply.raw_output_contents[0])) == pytest.approx(expected, abs=1e-5)

        errors = {
            "wrong datatype": (kserve_pb2.ModelInferRequest(model_name="reward", inputs=[
                tensor(name="response", datatype="FP32", shape=[1])]), grpc.StatusCode.INVALID_ARGUMENT),
            "shape mismatch": (kserve_pb2.ModelInferRequest(model_name="reward", inputs=[
                tensor(name="response", datatype="BYTES", shape=[3],
                       contents=kserve_pb2.InferTensorContents(bytes_contents=[b"a"]))]),
                grpc.StatusCode.INVALID_ARGUMENT),
            "unknown input": (kserve_pb2.ModelInferRequest(model_name="reward", inputs=[
                tensor(name="image", datatype="BYTES", shape=[1])]), grpc.StatusCode.INVALID_ARGUMENT),
            "unknown model": (kserve_pb2.ModelInferRequest(model_name="nope"), grpc.StatusCode.NOT_FOUND),
        }
        for what, (bad, code) in errors.items():
            with pytest.raises(grpc.RpcError) as err:
                await call(stub.ModelInfer, bad)
            assert err.value.code() == code, what
        with pytest.raises(grpc.RpcError) as err:
            await call(stub.ModelReady, kserve_pb2.ModelReadyRequest(name="other"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        channel.close()


async def test_remote_and_ensemble_scorers_over_grpc(settings_factory, serve, tiny) -> None:
    _, backend = await start(settings_factory, serve, tiny)
    remote = RemoteScorer(backend, timeout_s=10, retries=1)
    ensemble = EnsembleScorer([(remote, 1.0), (VaderScorer(), 0.5)])
    _, front = await start(settings_factory, serve, ensemble)
    prompts = [p for p, _ in PAIRS]
    responses = [r for _, r in PAIRS]
    expected_t = tiny.score(prompts, responses)
    expected_v = VaderScorer().score(prompts, responses)
    async with aio.insecure_channel(front) as channel:
        reply = await reward_pb2_grpc.RewardServiceStub(channel).Score(request_of(PAIRS))
    assert [s.score for s in reply.scores] == pytest.approx([t + 0.5 * v for t, v in zip(expected_t, expected_v)],
                                                            abs=1e-5)
    components = reply.scores[1].components
    assert [(c.scorer, c.scorer_version) for c in components][0] == ("remote:transformer", "reward-0001")
    assert components[0].value == pytest.approx(expected_t[1], abs=1e-5)
    assert components[1].scorer == "vader" and components[1].value == pytest.approx(expected_v[1])
    assert reply.scorer == "ensemble" and "remote:transformer@reward-0001" in reply.scorer_version
    await asyncio.to_thread(remote.refresh_identity)  # blocking client: off the loop serving it
    assert remote.version == "reward-0001"


async def test_remote_scorer_retries_then_fails_on_unreachable_backend() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    remote = RemoteScorer(f"127.0.0.1:{port}", timeout_s=0.5, retries=2, backoff_s=0.2)
    start_time = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        await asyncio.to_thread(remote.score, ["p"], ["r"])
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - start_time >= 0.2 + 0.4  # two backoffs: it did retry
    remote.close()


async def test_kserve_readiness_follows_the_service(settings_factory, serve) -> None:
    app = build_app(reward_settings(settings_factory), scorer=VaderScorer())
    target = await serve(app.runtime, ready=False)
    tensor = kserve_pb2.ModelInferRequest.InferInputTensor
    infer = kserve_pb2.ModelInferRequest(model_name="reward", inputs=[tensor(
        name="response", datatype="BYTES", shape=[1], contents=kserve_pb2.InferTensorContents(bytes_contents=[b"ok"]))])
    async with aio.insecure_channel(target) as channel:
        stub = kserve_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert (await stub.ServerLive(kserve_pb2.ServerLiveRequest())).live
        assert not (await stub.ServerReady(kserve_pb2.ServerReadyRequest())).ready
        assert not (await stub.ModelReady(kserve_pb2.ModelReadyRequest(name="reward"))).ready
        with pytest.raises(aio.AioRpcError) as err:
            await stub.ModelInfer(infer)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        await app.runtime.set_serving(True)
        assert (await stub.ServerReady(kserve_pb2.ServerReadyRequest())).ready
        reply = await stub.ModelInfer(infer)  # prompt is optional
        assert list(reply.outputs[0].contents.fp32_contents) == pytest.approx(VaderScorer().score([""], ["ok"]))


async def test_documented_limits_and_costly_items(settings_factory, serve) -> None:
    """KServe shapes only [N] / [N, 1]; empty items refused by both APIs alike; 20,000 emoji
    no longer stall the scorer past a caller's deadline; long ids are clipped (findings 3, 5, 6)."""
    _, target = await start(settings_factory, serve, VaderScorer())
    tensor = kserve_pb2.ModelInferRequest.InferInputTensor

    def infer(shape, texts, name="reward"):
        return kserve_pb2.ModelInferRequest(model_name=name, inputs=[tensor(
            name="response", datatype="BYTES", shape=shape,
            contents=kserve_pb2.InferTensorContents(bytes_contents=texts))])

    async with aio.insecure_channel(target) as channel:
        kserve = kserve_pb2_grpc.GRPCInferenceServiceStub(channel)
        reward = reward_pb2_grpc.RewardServiceStub(channel)
        for shape in ([2, 1, 1], [2] + [1] * 1000, [1, 2], [], [-1]):
            with pytest.raises(aio.AioRpcError) as err:
                await kserve.ModelInfer(infer(shape, [b"good", b"bad"]))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, shape
            assert "inputs[0].shape" in err.value.details()
        assert len((await kserve.ModelInfer(infer([2, 1], [b"good", b"bad"]))).outputs[0].contents.fp32_contents) == 2

        with pytest.raises(aio.AioRpcError) as err:
            await kserve.ModelInfer(infer([2], [b"", b""]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "inputs[0].contents[0]" in err.value.details()
        with pytest.raises(aio.AioRpcError) as err:
            await reward.Score(request_of([("", ""), ("", "")]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "items[0]" in err.value.details()

        for call in (kserve.ModelReady(kserve_pb2.ModelReadyRequest(name="m" * 2_000_000)),
                     kserve.ModelMetadata(kserve_pb2.ModelMetadataRequest(name="reward", version="v" * 2_000_000)),
                     kserve.ModelInfer(infer([1], [b"x"], name="m" * 2_000_000))):
            with pytest.raises(aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.NOT_FOUND and len(err.value.details()) < 1100

        emoji = await reward.Score(request_of([("p", "🙂" * 20_000)]), timeout=20)
        assert emoji.scores[0].score > 0


def test_sigterm_stops_a_busy_service_within_its_grace(tmp_path) -> None:
    """A long request being scored does not hold the process past its shutdown grace (finding 3):
    the RPC is cancelled when the grace ends and the batcher stops between slices."""
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from conftest import REPO, free_port
    from waiting import wait_until

    grpc_port, metrics_port = free_port(), free_port()
    env = dict(os.environ, FLYWHEEL_HOST="127.0.0.1", FLYWHEEL_GRPC_PORT=str(grpc_port),
               FLYWHEEL_METRICS_PORT=str(metrics_port), FLYWHEEL_REWARD_SCORER="vader",
               FLYWHEEL_REWARD_WORKER_ENABLED="false", FLYWHEEL_REWARD_RELOAD_ENABLED="false",
               FLYWHEEL_SHUTDOWN_GRACE_S="2", FLYWHEEL_SHUTDOWN_DELAY_S="0", FLYWHEEL_HOME=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "serve", "reward"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    try:
        health = health_pb2_grpc.HealthStub(channel)
        wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                   == health_pb2.HealthCheckResponse.SERVING, timeout_s=120, what="reward serving")
        # ~256 x 0.1 s of VADER work even with the per-item cap.
        busy = reward_pb2_grpc.RewardServiceStub(channel).Score.future(
            request_of([("p", "not very good but " * 150)] * 256), timeout=300)

        def started() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
                return 'grpc_method="Score"' in resp.read().decode()

        wait_until(started, timeout_s=30, what="the Score call reached the server")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)  # grace 2 s + one slice of scoring; once it took minutes
        assert busy.exception(timeout=10) is not None
    finally:
        channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
