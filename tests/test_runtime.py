"""The shared service runtime on a real loopback server: health, reflection, errors, metrics, shutdown."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from flywheel.runtime import InvalidArgument, Overloaded, ServiceRuntime, require
from flywheel.v1 import common_pb2, reward_pb2, reward_pb2_grpc

SERVICE = "flywheel.v1.RewardService"


class LengthScorer(reward_pb2_grpc.RewardServiceServicer):
    """A deliberately simple servicer: the runtime, not the scoring, is under test here."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.release.set()

    async def Score(self, request, context):
        require(len(request.items) > 0, "items", "must not be empty")
        for i, item in enumerate(request.items):
            require(bool(item.response), f"items[{i}].response", "must not be empty")
        if len(request.items) > 100:
            raise Overloaded("queue full")
        await self.release.wait()
        return reward_pb2.ScoreResponse(
            scores=[reward_pb2.ItemScore(id=it.id, score=len(it.response)) for it in request.items],
            scorer="length", scorer_version="1")

    async def ScoreStream(self, request_iterator, context):
        async for request in request_iterator:
            yield await self.Score(request, context)

    async def Compare(self, request, context):
        raise ZeroDivisionError("boom")

    async def GetModelVersion(self, request, context):
        return common_pb2.ModelVersion(kind=common_pb2.MODEL_KIND_REWARD, version="length-1")


def build(settings, servicer=None) -> tuple[ServiceRuntime, LengthScorer]:
    servicer = servicer or LengthScorer()
    runtime = ServiceRuntime(settings)
    runtime.add_service(SERVICE, lambda server: reward_pb2_grpc.add_RewardServiceServicer_to_server(servicer, server))
    return runtime, servicer


def item(response: str, id: str = "") -> reward_pb2.ScoreItem:
    return reward_pb2.ScoreItem(id=id, prompt="p", response=response)


async def test_health_reports_serving_per_service(settings_factory, serve) -> None:
    runtime, _ = build(settings_factory())
    target = await serve(runtime)
    async with aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE):
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=name))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(aio.AioRpcError) as err:
            await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_not_ready_until_service_says_so(settings_factory, serve) -> None:
    runtime, _ = build(settings_factory())
    target = await serve(runtime, ready=False)
    async with aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        req = health_pb2.HealthCheckRequest(service=SERVICE)
        assert (await stub.Check(req)).status == health_pb2.HealthCheckResponse.NOT_SERVING
        await runtime.set_serving(True)
        assert (await stub.Check(req)).status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_services(settings_factory, serve) -> None:
    runtime, _ = build(settings_factory())
    target = await serve(runtime)
    async with aio.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def requests():
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        names = []
        async for resp in stub.ServerReflectionInfo(requests()):
            names = [s.name for s in resp.list_services_response.service]
        assert SERVICE in names
        assert "grpc.health.v1.Health" in names
        assert "grpc.reflection.v1alpha.ServerReflection" in names


async def test_malformed_request_is_invalid_argument_naming_the_field(settings_factory, serve) -> None:
    runtime, _ = build(settings_factory())
    target = await serve(runtime)
    async with aio.insecure_channel(target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        with pytest.raises(aio.AioRpcError) as err:
            await stub.Score(reward_pb2.ScoreRequest(items=[item("ok"), item("")]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "items[1].response" in err.value.details()

        with pytest.raises(aio.AioRpcError) as err:
            await stub.Score(reward_pb2.ScoreRequest())
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "items" in err.value.details()

        # A message that is not a ScoreRequest at all: the wire bytes cannot be parsed.
        raw = channel.unary_unary(f"/{SERVICE}/Score", request_serializer=lambda b: b,
                                  response_deserializer=reward_pb2.ScoreResponse.FromString)
        with pytest.raises(aio.AioRpcError) as err:
            await raw(b"\xff\xff\xff\xff")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request" in err.value.details()


async def test_exception_mapping(settings_factory, serve) -> None:
    runtime, _ = build(settings_factory())
    target = await serve(runtime)
    async with aio.insecure_channel(target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        with pytest.raises(aio.AioRpcError) as err:
            await stub.Score(reward_pb2.ScoreRequest(items=[item("x")] * 101))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(aio.AioRpcError) as err:
            await stub.Compare(reward_pb2.CompareRequest(prompt="p", response_a="a", response_b="b"))
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "ZeroDivisionError" in err.value.details()
        assert "boom" not in err.value.details(), "internal messages are not leaked"

        # Streaming: an error mid-stream ends the stream with the mapped status.
        async def reqs():
            yield reward_pb2.ScoreRequest(items=[item("abc")])
            yield reward_pb2.ScoreRequest(items=[item("")])

        got = []
        with pytest.raises(aio.AioRpcError) as err:
            async for resp in stub.ScoreStream(reqs()):
                got.append(resp.scores[0].score)
        assert got == [3.0]
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


async def test_metrics_endpoint_counts_grpc_calls(settings_factory, serve) -> None:
    runtime, _ = build(settings_factory())
    target = await serve(runtime)
    before = scrape(runtime.metrics_port)
    async with aio.insecure_channel(target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        await stub.Score(reward_pb2.ScoreRequest(items=[item("hello")]))
        with pytest.raises(aio.AioRpcError):
            await stub.Score(reward_pb2.ScoreRequest())
    after = scrape(runtime.metrics_port)
    labels = dict(grpc_service=SERVICE, grpc_method="Score", grpc_type="unary")
    assert sample(after, "grpc_server_started_total", **labels) - sample(before, "grpc_server_started_total", **labels) == 2
    for code in ("OK", "INVALID_ARGUMENT"):
        delta = (sample(after, "grpc_server_handled_total", grpc_code=code, **labels)
                 - sample(before, "grpc_server_handled_total", grpc_code=code, **labels))
        assert delta == 1, code
    assert sample(after, "grpc_server_handling_seconds_count", **labels) >= 2


async def test_graceful_shutdown_finishes_in_flight_rpcs_and_goes_not_serving(settings_factory) -> None:
    runtime, servicer = build(settings_factory(shutdown_grace_s=5.0, shutdown_delay_s=1.0))
    await runtime.start()
    target = f"127.0.0.1:{runtime.grpc_port}"
    servicer.release.clear()
    async with aio.insecure_channel(target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        in_flight = asyncio.ensure_future(stub.Score(reward_pb2.ScoreRequest(items=[item("slow")])))
        await asyncio.sleep(0.2)
        stopping = asyncio.ensure_future(runtime.stop())
        await asyncio.sleep(0.2)
        health = health_pb2_grpc.HealthStub(channel)
        status = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await asyncio.sleep(1.0)  # past the delay: the listener is closed, the RPC is still running
        assert not in_flight.done()
        servicer.release.set()
        resp = await in_flight
        assert resp.scores[0].score == 4.0, "the in-flight RPC completes during the grace period"
        await stopping


async def test_liveness_is_serving_while_the_service_is_not_ready(settings_factory, serve) -> None:
    """Probes: liveness/startup ask about flywheel.liveness, readiness about the service, so a long
    start-up (a replay) is NOT ready but alive, and the kubelet never restarts it for that."""
    from flywheel.runtime.server import LIVENESS_SERVICE

    runtime, _ = build(settings_factory())
    target = await serve(runtime, ready=False)
    async with aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        async def status(name: str) -> int:
            return (await stub.Check(health_pb2.HealthCheckRequest(service=name))).status

        assert await status(LIVENESS_SERVICE) == health_pb2.HealthCheckResponse.SERVING
        for name in ("", SERVICE):
            assert await status(name) == health_pb2.HealthCheckResponse.NOT_SERVING
        await runtime.set_serving(True)
        assert await status(SERVICE) == health_pb2.HealthCheckResponse.SERVING
