"""Hostile input against every RPC and HTTP route of every service, on loopback.

Each service runs for real (its own event loop on a background thread, as in production: clients
never share the server's loop) with the cheapest parts that still run the real code: VADER for
reward, SmolLM2 with tight generation limits for policy, the real preference store on the real
broker, and a tiny Llama for the trainer. Hypothesis generates, per RPC, messages built from the
proto descriptors (boundary integers, NaN, out-of-range timestamps, hostile URIs, megabyte ids,
random enums and nesting) and raw bytes; per HTTP route, random JSON and raw bodies. Runs are
derandomized and bounded in count (see EXAMPLES) so CI is stable.

Asserted for every call: no INTERNAL or UNKNOWN status, no 5xx. Throughout each service's run,
a separate thread on its own channel checks health (gRPC, and the policy's HTTP /health, each timed
on its own) every 20 ms: 99% of answers within 100 ms (in a run of under 100 checks, all but one)
and none over 500 ms. Process RSS growth over a service's run stays under RSS_GROWTH_LIMIT.

Health latency, measured on 2 cores shared with other work: the slow answers (up to 503 ms) were
full garbage-collector passes, not the services' event loops (asyncio debug mode logged no callback
over 40 ms while fuzzing): with torch and transformers loaded, a generation-2 collection walks
~500,000 objects in 0.1-0.45 s with the GIL held, stopping every thread. Services freeze their
start-up heap (`ServiceRuntime.serve` -> `freeze_startup_heap`), and so do these tests; with it,
in three runs of this file at load average 3-8, the slowest answer per service was 11-78 ms (p50
2-12 ms). In the clean-clone suite run of 2026-12-01 (load 2.5) the reward service's slowest of
108 answers was 264 ms with p99 47 ms, so the bound on every answer is 500 ms: room for the
scheduler on a 2-core runner, and still below the half-second stalls the collector caused.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor as F
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flywheel.runtime.process import freeze_startup_heap
from waiting import wait_until_async

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

EXAMPLES = 12  # generated messages per RPC
RAW_EXAMPLES = 6  # raw byte strings per RPC
CALL_TIMEOUT_S = 10.0
HEALTH_BUDGET_S = 0.100  # 99% of health answers (see the module docstring for what was measured)
HEALTH_STALL_S = 0.500  # every health answer (see the module docstring)
RSS_GROWTH_LIMIT = 768 * 1024 * 1024
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
FUZZ_RAW = settings(FUZZ, max_examples=RAW_EXAMPLES)

# -- generated messages ---------------------------------------------------------------------------

HOSTILE_TEXT = ["", " ", "\x00", "a" * 300, "🙂" * 3000, "/etc/passwd", "file:///etc/passwd",
                "http://127.0.0.1:9/x", "bogusproto://x", "../../../../etc/shadow", "x" * 5000,
                "\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "replace"), "i" * 1_500_000]
INT_EDGES = [0, 1, -1, 2**31 - 1, -(2**31), 2**32 - 1, 2**62, -(2**62), 2**63 - 1, -(2**63), 253402300800,
             -62135596801, 2_000_000_000, -5, 10**12]

_texts = st.one_of(st.text(max_size=24), st.sampled_from(HOSTILE_TEXT))


def _ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(lo, hi), st.sampled_from([v for v in INT_EDGES if lo <= v <= hi]))


_SCALARS: dict[int, st.SearchStrategy[Any]] = {
    F.TYPE_STRING: _texts,
    F.TYPE_BYTES: st.one_of(st.binary(max_size=32), st.sampled_from([b"", b"\xff\xfe", b"\x00" * 4])),
    F.TYPE_BOOL: st.booleans(),
    F.TYPE_DOUBLE: st.floats(),
    F.TYPE_FLOAT: st.floats(width=32),
    F.TYPE_INT32: _ints(-(2**31), 2**31 - 1), F.TYPE_SINT32: _ints(-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: _ints(-(2**31), 2**31 - 1),
    F.TYPE_UINT32: _ints(0, 2**32 - 1), F.TYPE_FIXED32: _ints(0, 2**32 - 1),
    F.TYPE_INT64: _ints(-(2**63), 2**63 - 1), F.TYPE_SINT64: _ints(-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: _ints(-(2**63), 2**63 - 1),
    F.TYPE_UINT64: _ints(0, 2**64 - 1), F.TYPE_FIXED64: _ints(0, 2**64 - 1),
    F.TYPE_ENUM: st.integers(-2, 6),
}


@st.composite
def messages(draw: st.DrawFn, descriptor: Any, depth: int = 0) -> Any:
    """A random instance of `descriptor`: each field set or not, repeated fields 0-3 long."""
    msg = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        if field.type == F.TYPE_MESSAGE:
            if depth >= 3:
                continue
            if field.message_type.GetOptions().map_entry:
                value = field.message_type.fields_by_name["value"]
                if value.type == F.TYPE_MESSAGE:
                    continue
                target = getattr(msg, field.name)
                for k, v in draw(st.dictionaries(_SCALARS[F.TYPE_STRING], _SCALARS[value.type], max_size=3)).items():
                    target[k] = v
                continue
            if field.is_repeated:
                for item in draw(st.lists(messages(field.message_type, depth + 1), max_size=3)):
                    getattr(msg, field.name).add().CopyFrom(item)
            else:
                getattr(msg, field.name).CopyFrom(draw(messages(field.message_type, depth + 1)))
        elif field.is_repeated:
            getattr(msg, field.name).extend(draw(st.lists(_SCALARS[field.type], max_size=3)))
        else:
            setattr(msg, field.name, draw(_SCALARS[field.type]))
    return msg


# -- services on their own loops --------------------------------------------------------------------


class ServiceThread:
    """Runs an async service (a ServiceRuntime and friends) on its own event loop thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-service", daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 300.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


class HealthWatch:
    """Checks health from its own thread every 20 ms; records every answer's latency, per check."""

    def __init__(self, checks: dict[str, Callable[[], None]]) -> None:
        self.checks = checks
        self.latencies: dict[str, list[float]] = {name: [] for name in checks}
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fuzz-health", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for name, check in self.checks.items():
                start = time.perf_counter()
                try:
                    check()
                except Exception as exc:  # noqa: BLE001 - reported by the assertion
                    self.failures.append(f"{name}: {exc!r}"[:200])
                self.latencies[name].append(time.perf_counter() - start)

    def __enter__(self) -> "HealthWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def watched(grpc_target: str, service: str, http_health: str | None = None) -> Iterator[HealthWatch]:
    channel = grpc.insecure_channel(grpc_target)
    stub = health_pb2_grpc.HealthStub(channel)

    def grpc_check() -> None:
        stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)

    def http_check() -> None:
        with urllib.request.urlopen(http_health, timeout=1.0) as resp:
            resp.read()

    checks = {"grpc": grpc_check, **({"http": http_check} if http_health else {})}
    for check in checks.values():
        check()  # connect first: the budget is for answers, not for establishing the channel
    freeze_startup_heap()  # as a service process does once built (ServiceRuntime.serve)
    rss_before = rss_bytes()
    try:
        with HealthWatch(checks) as watch:
            yield watch
    finally:
        channel.close()
        gc.unfreeze()  # this process goes on to other tests: let their garbage be collected
    assert not watch.failures, watch.failures[:3]
    for name, latencies in watch.latencies.items():
        assert latencies, f"{name} health was never checked"
        ordered = sorted(latencies)
        over = [t for t in ordered if t > HEALTH_BUDGET_S]
        detail = (f"{service} {name} health: {len(ordered)} checks, p50 {ordered[len(ordered) // 2] * 1000:.1f} ms, "
                  f"p99 {ordered[int(len(ordered) * 0.99)] * 1000:.1f} ms, slowest "
                  f"{[round(t * 1000) for t in ordered[-3:]]} ms, load {os.getloadavg()[0]:.1f}")
        print(detail)
        assert len(over) <= max(1, len(ordered) // 100), f"{len(over)} answers over {HEALTH_BUDGET_S * 1000:.0f} ms; {detail}"
        assert ordered[-1] <= HEALTH_STALL_S, f"health took {ordered[-1] * 1000:.0f} ms; {detail}"
    print(f"{service}: RSS +{(rss_bytes() - rss_before) / 2**20:.0f} MiB")
    assert rss_bytes() - rss_before < RSS_GROWTH_LIMIT


# -- calling any RPC ---------------------------------------------------------------------------------


def methods_of(*pb2_modules: Any) -> list[Any]:
    out = []
    for module in pb2_modules:
        for service in module.DESCRIPTOR.services_by_name.values():
            out.extend(service.methods)
    return out


def call(channel: grpc.Channel, method: Any, requests: list[Any] | list[bytes], metadata=None) -> None:
    """Invoke `method` with `requests` (messages or raw bytes); fail on a forbidden status."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    output = message_factory.GetMessageClass(method.output_type)
    serialize = (lambda b: b) if requests and isinstance(requests[0], bytes) else (lambda m: m.SerializeToString())
    kind = (method.client_streaming, method.server_streaming)
    factory = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
               (True, False): channel.stream_unary, (True, True): channel.stream_stream}[kind]
    stub = factory(path, request_serializer=serialize, response_deserializer=output.FromString)
    payload = iter(requests) if method.client_streaming else requests[0]
    try:
        result = stub(payload, timeout=CALL_TIMEOUT_S, metadata=metadata)
        if method.server_streaming:
            for _ in result:  # Watch-style streams never end: the first answer is enough
                result.cancel()
                break
    except grpc.RpcError as err:
        code = err.code()
        assert code not in FORBIDDEN, f"{path}: {code.name} {err.details()[:300]!r}"


def fuzz_service(channel: grpc.Channel, method: Any, metadata_choices: list[Any]) -> None:
    """Generated messages, then raw bytes, against one method."""

    @FUZZ
    @given(data=st.data())
    def generated(data: st.DataObject) -> None:
        count = data.draw(st.integers(1, 3)) if method.client_streaming else 1
        requests = [data.draw(messages(method.input_type)) for _ in range(count)]
        call(channel, method, requests, data.draw(st.sampled_from(metadata_choices)))

    @FUZZ_RAW
    @given(raw=st.binary(max_size=256), metadata=st.sampled_from(metadata_choices))
    def raw_bytes(raw: bytes, metadata: Any) -> None:
        call(channel, method, [raw], metadata)

    generated()
    raw_bytes()


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> int:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code


def fuzz_metrics_endpoint(port: int) -> None:
    @FUZZ_RAW
    @given(path=st.text(alphabet="abcdefghijklmnopqrstuvwxyz/?=&%.", max_size=40))
    def paths(path: str) -> None:
        status = http("GET", f"http://127.0.0.1:{port}/{path.lstrip('/')}")
        assert status < 500, (path, status)

    paths()


# -- reward ---------------------------------------------------------------------------------------


def test_fuzz_reward(tmp_path: Path) -> None:
    from flywheel.kserve.v2 import open_inference_grpc_pb2 as kserve_pb2
    from flywheel.reward.app import build_app
    from flywheel.reward.scorers import VaderScorer
    from flywheel.reward.settings import RewardSettings
    from grpc_reflection.v1alpha import reflection_pb2

    from flywheel.v1 import reward_pb2

    settings = RewardSettings(host="127.0.0.1", grpc_port=0, metrics_port=0, home=tmp_path, shutdown_grace_s=1.0,
                              shutdown_delay_s=0.0, reward_worker_enabled=False, reward_reload_enabled=False)
    service = ServiceThread()
    app = service.run(_build(lambda: build_app(settings, scorer=VaderScorer())))
    target = f"127.0.0.1:{app.runtime.grpc_port}"
    channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)])
    try:
        with watched(target, "flywheel.v1.RewardService"):
            for method in methods_of(reward_pb2, kserve_pb2, health_pb2, reflection_pb2):
                fuzz_service(channel, method, [None])
            fuzz_metrics_endpoint(app.runtime.metrics_port)
    finally:
        channel.close()
        service.run(app.runtime.stop(grace=0))
        service.close()


async def _build(factory: Callable[[], Any]) -> Any:
    built = factory()
    await built.runtime.start()
    return built


# -- policy (gRPC and the TGI-compatible HTTP API) ------------------------------------------------

_json = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), _texts),
                     lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_texts, inner, max_size=3)),
                     max_leaves=8)
_tgi_parameters = st.fixed_dictionaries({}, optional={
    name: st.one_of(_json, st.integers(-3, 5), st.floats(-1, 3))
    for name in ("temperature", "top_k", "top_p", "max_new_tokens", "seed", "best_of", "do_sample", "details",
                 "decoder_input_details", "return_full_text", "stop", "repetition_penalty", "typical_p",
                 "watermark", "truncate", "unknown_parameter")})
_tgi_bodies = st.one_of(
    st.fixed_dictionaries({"inputs": _texts}, optional={"parameters": st.one_of(_tgi_parameters, _json),
                                                         "stream": _json}),
    _json)


def test_fuzz_policy(tmp_path: Path) -> None:
    import torch

    from flywheel.policy.app import build_components
    from flywheel.policy.settings import PolicySettings
    from flywheel.v1 import policy_pb2

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    settings = PolicySettings(host="127.0.0.1", grpc_port=0, metrics_port=0, home=tmp_path, shutdown_grace_s=1.0,
                              shutdown_delay_s=0.0, policy_http_port=0, policy_worker_enabled=False,
                              policy_reload_enabled=False, policy_max_new_tokens_limit=4, policy_max_n=2,
                              policy_max_input_tokens=96, policy_max_queue=16, policy_default_max_new_tokens=2)
    service = ServiceThread()
    parts = service.run(_build(lambda: build_components(settings)))
    target = f"127.0.0.1:{parts.runtime.grpc_port}"
    base = f"http://127.0.0.1:{parts.http.port}"
    channel = grpc.insecure_channel(target)
    try:
        with watched(target, "flywheel.v1.PolicyService", http_health=base + "/health"):
            for method in methods_of(policy_pb2):
                fuzz_service(channel, method, [None])

            @FUZZ
            @given(route=st.sampled_from(["/", "/generate", "/generate_stream"]), body=_tgi_bodies)
            def json_routes(route: str, body: Any) -> None:
                status = http("POST", base + route, json.dumps(body).encode(), {"Content-Type": "application/json"})
                assert status < 500, (route, body, status)

            @FUZZ_RAW
            @given(route=st.sampled_from(["/", "/generate", "/generate_stream", "/info", "/health", "/metrics",
                                          "/nowhere"]), raw=st.binary(max_size=256))
            def raw_routes(route: str, raw: bytes) -> None:
                for verb, body in (("POST", raw), ("GET", None)):
                    status = http(verb, base + route, body)
                    assert status < 500, (verb, route, raw[:40], status)

            json_routes()
            raw_routes()
            fuzz_metrics_endpoint(parts.runtime.metrics_port)
    finally:
        channel.close()
        service.run(parts.runtime.stop(grace=0))
        service.close()
        torch.set_num_threads(threads)


# -- preference (real broker; tokens for a rater and an admin) ----------------------------------------


def test_fuzz_preference(kafka_bootstrap: str, tmp_path: Path) -> None:
    from flywheel.preference.app import build_service
    from flywheel.preference.auth import SCOPE_ADMIN, TokenStore
    from flywheel.preference.settings import PreferenceSettings
    from flywheel.v1 import preference_pb2

    settings = PreferenceSettings(host="127.0.0.1", grpc_port=0, metrics_port=0, home=tmp_path / "home",
                                  shutdown_grace_s=1.0, shutdown_delay_s=0.0, kafka_bootstrap_servers=kafka_bootstrap,
                                  preference_refresh_interval_s=3600.0,
                                  preference_export_roots=[tmp_path / "exports"])
    tokens = TokenStore(settings.auth_db_path())
    rater, admin = tokens.issue("fuzz-rater"), tokens.issue("fuzz-admin", scope=SCOPE_ADMIN)
    tokens.close()
    service = ServiceThread()

    async def start() -> Any:
        built = build_service(settings)
        await built.runtime.start()  # SERVING once the store caught up (its readiness condition)
        await wait_until_async(lambda: built.servicer.ready, 120, what="the store to catch up")
        return built

    built = service.run(start())
    target = f"127.0.0.1:{built.runtime.grpc_port}"
    channel = grpc.insecure_channel(target)
    auth = [None, (("authorization", f"Bearer {rater}"),), (("authorization", f"Bearer {admin}"),),
            (("authorization", "Bearer fwp_garbage"),)]
    try:
        with watched(target, "flywheel.v1.PreferenceService"):
            for method in methods_of(preference_pb2):
                fuzz_service(channel, method, auth)
            fuzz_metrics_endpoint(built.runtime.metrics_port)
    finally:
        channel.close()
        service.run(built.runtime.stop(grace=0))
        service.close()


# -- trainer (tiny Llama, paused loop, real broker) ---------------------------------------------------


def test_fuzz_trainer(kafka_bootstrap: str, tmp_path: Path, unique: str) -> None:
    from flywheel.trainer.app import build_app
    from flywheel.trainer.settings import TrainerSettings
    from flywheel.trainer.testing import tiny_llama_dir
    from flywheel.v1 import trainer_pb2

    model = tiny_llama_dir(tmp_path / "tiny-llama")
    settings = TrainerSettings(
        host="127.0.0.1", grpc_port=0, metrics_port=0, home=tmp_path / "home", shutdown_grace_s=1.0,
        shutdown_delay_s=0.0, kafka_bootstrap_servers=kafka_bootstrap, trainer_base_model=str(model),
        trainer_checkpoint_uri=(tmp_path / "ckpt").as_uri(), kafka_consumer_group=f"trainer-{unique}",
        trainer_scored_rollouts_topic=f"scored-{unique}", trainer_model_versions_topic=f"versions-{unique}",
        trainer_start_paused=True, torch_threads=1, kafka_poll_timeout_ms=200,
        trainer_reward_dataset_roots=[tmp_path / "datasets"], trainer_reward_output_dir=str(tmp_path / "reward"),
        trainer_reward_max_queued_jobs=1)
    service = ServiceThread()
    app = service.run(_build(lambda: build_app(settings)))
    target = f"127.0.0.1:{app.runtime.grpc_port}"
    channel = grpc.insecure_channel(target)
    try:
        with watched(target, "flywheel.v1.TrainerService"):
            for method in methods_of(trainer_pb2):
                fuzz_service(channel, method, [None])
            fuzz_metrics_endpoint(app.runtime.metrics_port)
        assert all(job.dataset_uri.startswith(str(tmp_path / "datasets")) or not job.dataset_uri
                   for job in app.jobs._jobs.values()), "a job was queued for a location outside the roots"
    finally:
        channel.close()
        service.run(app.runtime.stop(grace=0))
        service.close()
