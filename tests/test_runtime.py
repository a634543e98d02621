"""The shared service runtime on a real loopback server: health, reflection, errors, metrics, shutdown."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from flywheel.runtime import InvalidArgument, NotFound, Overloaded, ServiceRuntime, require
from waiting import wait_until_async
from flywheel.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from waiting import wait_until_async

SERVICE = "flywheel.v1.RewardService"


class LengthScorer(reward_pb2_grpc.RewardServiceServicer):
    """A deliberately simple servicer: the runtime, not the scoring, is under test here."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.release.set()
        self.waiting = 0  # calls held at `release`

    async def Score(self, request, context):
        require(len(request.items) > 0, "items", "must not be empty")
        for i, item in enumerate(request.items):
            require(bool(item.response), f"items[{i}].response", "must not be empty")
        if len(request.items) > 100:
            raise Overloaded("queue full")
        if request.items[0].id.startswith("missing"):
            raise NotFound(f"no item {request.items[0].id!r}")  # echoes input, as NOT_FOUND for an id does
        self.waiting += 1
        await self.release.wait()
        self.waiting -= 1
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
        await wait_until_async(lambda: servicer.waiting == 1, what="the RPC in the servicer")
        stopping = asyncio.ensure_future(runtime.stop())
        health = health_pb2_grpc.HealthStub(channel)

        async def not_serving() -> bool:
            status = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))
            return status.status == health_pb2.HealthCheckResponse.NOT_SERVING

        await wait_until_async(not_serving, what="NOT_SERVING during the shutdown delay")

        async def listener_closed() -> bool:  # a new connection is refused once the delay is over
            async with aio.insecure_channel(target) as fresh:
                try:
                    await health_pb2_grpc.HealthStub(fresh).Check(health_pb2.HealthCheckRequest(service=SERVICE),
                                                                  timeout=0.5)
                except aio.AioRpcError as exc:
                    return exc.code() == grpc.StatusCode.UNAVAILABLE
                return False

        await wait_until_async(listener_closed, 10, what="the listener to close")
        assert not in_flight.done(), "the in-flight RPC is still running after the listener closed"
        servicer.release.set()
        resp = await in_flight
        assert resp.scores[0].score == 4.0, "the in-flight RPC completes during the grace period"
        await stopping


async def test_error_messages_clip_echoed_input(settings_factory, serve) -> None:
    """A megabyte id echoed in NOT_FOUND must not overflow the trailing metadata (finding 5)."""
    runtime, _ = build(settings_factory())
    target = await serve(runtime)
    async with aio.insecure_channel(target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        with pytest.raises(aio.AioRpcError) as err:
            await stub.Score(reward_pb2.ScoreRequest(items=[item("x", id="missing" + "x" * 2_000_000)]))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert err.value.details().startswith("no item 'missingxxx")
        assert len(err.value.details()) <= 1100
        assert "more characters" in err.value.details()


async def test_metrics_record_client_deadline_and_cancel_not_unknown(settings_factory, serve) -> None:
    """Calls the client saw as DEADLINE_EXCEEDED / CANCELLED are counted so, never UNKNOWN (finding 7)."""
    runtime, servicer = build(settings_factory())
    target = await serve(runtime)
    servicer.release.clear()
    labels = dict(grpc_service=SERVICE, grpc_method="Score", grpc_type="unary")

    before = scrape(runtime.metrics_port)  # the registry is process-wide: count deltas

    def delta(name: str, **extra: str) -> float:
        return sample(scrape(runtime.metrics_port), name, **extra, **labels) - sample(before, name, **extra, **labels)

    def handled(code: str) -> float:
        return delta("grpc_server_handled_total", grpc_code=code)

    async with aio.insecure_channel(target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        with pytest.raises(aio.AioRpcError) as err:
            await stub.Score(reward_pb2.ScoreRequest(items=[item("slow")]), timeout=0.3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await wait_until_async(lambda: handled("DEADLINE_EXCEEDED") == 1, timeout_s=10,
                               what="DEADLINE_EXCEEDED counted")

        call = stub.Score(reward_pb2.ScoreRequest(items=[item("slow")]))
        await wait_until_async(lambda: delta("grpc_server_started_total") == 2, timeout_s=10,
                               what="second call started")
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await wait_until_async(lambda: handled("CANCELLED") == 1, timeout_s=10, what="CANCELLED counted")
        assert handled("UNKNOWN") == 0

        # A Health.Watch stream the client closes (what every load balancer does) is CANCELLED too.
        watch_labels = dict(grpc_service="grpc.health.v1.Health", grpc_method="Watch", grpc_type="server_stream")

        def watches(code: str) -> float:
            return (sample(scrape(runtime.metrics_port), "grpc_server_handled_total", grpc_code=code, **watch_labels)
                    - sample(before, "grpc_server_handled_total", grpc_code=code, **watch_labels))

        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE))
        await stream.read()
        stream.cancel()
        await wait_until_async(lambda: watches("CANCELLED") == 1, timeout_s=10, what="Watch counted CANCELLED")
        assert watches("UNKNOWN") == 0


def test_uri_policy_confines_locations(tmp_path) -> None:
    """Local paths only under configured roots (symlinks resolved), remote only listed scheme://host."""
    from flywheel.runtime.errors import PermissionDenied
    from flywheel.runtime.uris import UriPolicy, check_uri

    root = tmp_path / "root"
    root.mkdir()
    (root / "escape").symlink_to("/etc")
    policy = UriPolicy("dataset_uri", [root], remote=["s3://datasets"])
    assert check_uri(str(root / "a.jsonl"), policy).local_path == root.resolve() / "a.jsonl"
    assert check_uri((root / "b").as_uri(), policy).local_path == root.resolve() / "b"
    assert check_uri("s3://datasets/x.jsonl", policy).local_path is None
    for uri in ("/etc/passwd", "file:///etc/passwd", str(root / "escape" / "passwd"), str(root / ".." / "x"),
                "http://127.0.0.1:9/x", "s3://other/x", "bogusproto://x", "relative.jsonl",
                f"file://{root}/%2E%2E/x", f"file://{root}/escape%2Fpasswd"):  # checked as opened: decoded
        with pytest.raises(PermissionDenied, match="dataset_uri"):
            check_uri(uri, policy)
    for uri in ("x" * 1025, str(root / ("a" * 256)), "a\nb", "http://[::1/x", "mailto:someone", ""):
        with pytest.raises(InvalidArgument) as err:
            check_uri(uri, policy)
        assert err.value.field == "dataset_uri"


async def test_serving_process_freezes_its_start_up_heap(settings_factory) -> None:
    """A full GC pass over a built service (~500,000 objects with torch loaded) stops every thread,
    health included, for 0.1-0.45 s; `serve` (the process entry) takes them out of full passes."""
    import gc
    import signal

    runtime, _ = build(settings_factory())
    gc.unfreeze()
    serving = asyncio.ensure_future(runtime.serve())
    try:
        await wait_until_async(lambda: runtime.grpc_port is not None, 30, what="the runtime started")
        assert gc.get_freeze_count() > 0
    finally:
        await runtime.stop(grace=0)
        await serving
        gc.unfreeze()  # the rest of the test process collects as usual
        for sig in (signal.SIGTERM, signal.SIGINT):  # serve() installed them: Ctrl-C stops pytest again
            asyncio.get_running_loop().remove_signal_handler(sig)


def test_checkpoint_locations_default_to_the_home_checkpoints(tmp_path) -> None:
    from flywheel.runtime.config import ServiceSettings

    policy = ServiceSettings(home=tmp_path).checkpoint_policy()
    assert policy.field == "checkpoint_uri" and policy.local_roots == [tmp_path / "checkpoints"]
    assert policy.remote == []
    configured = ServiceSettings(home=tmp_path, checkpoint_roots=["/ckpt"], checkpoint_remote=["s3://ckpt"])
    assert configured.checkpoint_policy().local_roots == [Path("/ckpt")]
    assert configured.checkpoint_policy().remote == ["s3://ckpt"]


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
