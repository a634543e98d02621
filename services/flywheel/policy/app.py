"""Wiring: backend + gRPC servicer + TGI-compatible HTTP API + Kafka rollout worker + hot reload."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field

from flywheel.bus import ConsumerWorker, Topic, TypedProducer, ensure_topics_for, producer_for, worker_for
from flywheel.bus.probe import BrokerProbe
from flywheel.policy.backends import Backend, LocalBackend, TGIBackend
from flywheel.policy.engine import PolicyEngine
from flywheel.policy.http_api import TGIHttpApi
from flywheel.model_follower import ModelVersionFollower
from flywheel.policy.reload import policy_follower
from flywheel.policy.sampling import SamplingDefaults
from flywheel.policy.service import PolicyServicer
from flywheel.policy.settings import PolicySettings
from flywheel.policy.worker import RolloutWorker
from flywheel.runtime import ServiceRuntime
from flywheel.runtime.auth import SCOPE_GENERATE, AuthInterceptor, Guard, http_middleware
from flywheel.runtime.tls import TlsFiles
from flywheel.v1 import common_pb2, policy_pb2, policy_pb2_grpc

log = logging.getLogger(__name__)

Settings = PolicySettings
SERVICE_NAME = "flywheel.v1.PolicyService"


@dataclass
class PolicyComponents:
    """Everything `build` wires, for tests, benchmarks and embedding."""

    runtime: ServiceRuntime
    backend: Backend
    servicer: PolicyServicer
    http: TGIHttpApi | None = None
    reloader: ModelVersionFollower | None = None
    reload_worker: ConsumerWorker | None = None
    rollout_worker: RolloutWorker | None = None
    prompt_worker: ConsumerWorker | None = None
    producer: TypedProducer | None = None
    instance_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    @property
    def engine(self) -> PolicyEngine:
        return self.backend.engine  # type: ignore[attr-defined,no-any-return]


def _sequences(request: policy_pb2.GenerateRequest) -> int:
    """Sequences a Generate call asks for (what the items/s quota counts)."""
    fallback = request.sampling.n if request.HasField("sampling") else 0
    return sum(max(1, p.sampling.n if p.HasField("sampling") and p.sampling.n else fallback) for p in request.prompts)


def auth_interceptor(guard: Guard) -> AuthInterceptor:
    return AuthInterceptor(guard, {SERVICE_NAME: SCOPE_GENERATE},
                           items={f"/{SERVICE_NAME}/Generate": _sequences, f"/{SERVICE_NAME}/GenerateStream": lambda r: 1})


def _tgi_scope(request) -> str | None:  # type: ignore[no-untyped-def]
    """The TGI API's health probe is public; everything else needs scope `generate`."""
    return None if request.path in ("/health", "/metrics") else SCOPE_GENERATE


def make_backend(settings: PolicySettings) -> Backend:
    if settings.policy_backend == "tgi":
        return TGIBackend(settings.policy_tgi_url, tokenizer_dir=settings.policy_tgi_tokenizer_dir,
                          timeout_s=settings.policy_tgi_timeout_s, version=settings.policy_tgi_version,
                          max_input_tokens=settings.policy_max_input_tokens)
    engine = PolicyEngine.from_checkpoint(settings.policy_model_dir, settings.policy_model_version,
                                          device=settings.policy_device, dtype=settings.policy_dtype,
                                          prepack=settings.policy_prepack)
    return LocalBackend(engine, max_batch_size=settings.policy_max_batch_size,
                        batch_wait_ms=settings.policy_batch_wait_ms, max_queue=settings.policy_max_queue,
                        max_input_tokens=settings.policy_max_input_tokens)


def build_components(settings: PolicySettings, backend: Backend | None = None) -> PolicyComponents:
    runtime = ServiceRuntime(settings)
    backend = backend or make_backend(settings)
    defaults = SamplingDefaults.from_settings(settings)
    servicer = PolicyServicer(backend, defaults, max_sequences=settings.policy_max_queue)
    runtime.add_service(SERVICE_NAME, lambda server: policy_pb2_grpc.add_PolicyServiceServicer_to_server(
        servicer, server))
    parts = PolicyComponents(runtime=runtime, backend=backend, servicer=servicer)
    guard = Guard.from_settings(settings)
    runtime.add_interceptor(auth_interceptor(guard))

    # The backend starts before the HTTP API and the Kafka workers, and stops only after the gRPC
    # server drained its in-flight RPCs (on_stop runs after the server stopped).
    runtime.add_lifecycle(backend.start)
    runtime.on_stop(backend.stop)

    if settings.policy_http_enabled:
        parts.http = TGIHttpApi(backend, defaults, host=settings.host, port=settings.policy_http_port,
                                max_concurrent_requests=settings.policy_max_queue,
                                max_input_tokens=settings.policy_max_input_tokens,
                                max_body_bytes=settings.policy_http_max_body_bytes,
                                ssl_context=TlsFiles.from_settings(settings).http_server_context())
        # TGI routes generate one sequence per request (best_of = 1).
        parts.http.app.middlewares.append(http_middleware(
            guard, _tgi_scope, items_for=lambda r: 0 if _tgi_scope(r) is None or r.method != "POST" else 1))
        runtime.add_worker(parts.http)

    reload = settings.policy_reload_enabled and isinstance(backend, LocalBackend)
    if reload or settings.policy_worker_enabled:
        prompts = Topic(settings.policy_prompts_topic, common_pb2.Prompt)
        rollouts = Topic(settings.policy_rollouts_topic, common_pb2.Rollout)
        versions = Topic(settings.policy_model_versions_topic, common_pb2.ModelVersion)
        ensure_topics_for(settings, [prompts, rollouts, versions])
        parts.producer = producer_for(settings)
        # Generation works without the broker: the service stays ready and reports the dependency.
        runtime.add_worker(BrokerProbe(settings, runtime.readiness, gate=False))

        if reload:
            assert isinstance(backend, LocalBackend)
            parts.reloader = policy_follower(backend, cache_dir=settings.home / "checkpoints",
                                             uri_policy=settings.checkpoint_policy(), device=settings.policy_device,
                                             dtype=settings.policy_dtype, prepack=settings.policy_prepack)
            group = f"{settings.kafka_consumer_group}-reload-{parts.instance_id}"
            parts.reload_worker = worker_for(settings, versions, group, parts.reloader, parts.producer,
                                             static=False)
            runtime.add_worker(parts.reload_worker)

        if settings.policy_worker_enabled:
            async def start_worker() -> None:  # generation runs on the server's event loop
                parts.rollout_worker = RolloutWorker(
                    backend, parts.producer, rollouts, defaults, asyncio.get_running_loop(),  # type: ignore[arg-type]
                    max_prompts=settings.policy_worker_max_prompts)
                # Each chunk of prompts generated together is committed once its rollouts are
                # durable: a crash replays at most one chunk, not the whole poll.
                parts.prompt_worker = worker_for(settings, prompts, None, parts.rollout_worker.handle,
                                                 parts.producer,  # type: ignore[arg-type]
                                                 commit_every=settings.policy_worker_max_prompts)
                await parts.prompt_worker.start()

            async def stop_worker() -> None:
                if parts.prompt_worker is not None:
                    await parts.prompt_worker.stop()

            runtime.add_lifecycle(start_worker, stop_worker)

        async def close_producer() -> None:
            if parts.producer is not None:
                await asyncio.to_thread(parts.producer.close)

        runtime.on_stop(close_producer)
    return parts


def build(settings: PolicySettings) -> ServiceRuntime:
    return build_components(settings).runtime


async def serve(settings: PolicySettings) -> None:
    runtime = build(settings)
    await runtime.serve(ready=True)


if __name__ == "__main__":  # `python -m flywheel.policy.app` (same as `flywheel serve policy`)
    from flywheel.runtime.process import start_service_process

    _settings = Settings()
    logging.basicConfig(level=_settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start_service_process(_settings)
    asyncio.run(serve(_settings))
