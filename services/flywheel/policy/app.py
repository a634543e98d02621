"""Wiring: backend + gRPC servicer + TGI-compatible HTTP API + Kafka rollout worker + hot reload."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field

from flywheel.bus import ConsumerWorker, Topic, TypedProducer, ensure_topics_for, producer_for, worker_for
from flywheel.policy.backends import Backend, LocalBackend, TGIBackend
from flywheel.policy.engine import PolicyEngine, machine_threads
from flywheel.policy.http_api import TGIHttpApi
from flywheel.policy.reload import PolicyReloader
from flywheel.policy.sampling import SamplingDefaults
from flywheel.policy.service import PolicyServicer
from flywheel.policy.settings import PolicySettings
from flywheel.policy.worker import RolloutWorker
from flywheel.runtime import ServiceRuntime
from flywheel.v1 import common_pb2, policy_pb2_grpc

log = logging.getLogger(__name__)

Settings = PolicySettings
SERVICE_NAME = "flywheel.v1.PolicyService"


class _LoopBound:
    """Starts a component that needs the running event loop (the worker's handler uses it)."""

    def __init__(self, start, stop) -> None:  # type: ignore[no-untyped-def]
        self._start, self._stop = start, stop

    async def start(self) -> None:
        await self._start()

    async def stop(self) -> None:
        await self._stop()


@dataclass
class PolicyComponents:
    """Everything `build` wires, for tests, benchmarks and embedding."""

    runtime: ServiceRuntime
    backend: Backend
    servicer: PolicyServicer
    http: TGIHttpApi | None = None
    reloader: PolicyReloader | None = None
    reload_worker: ConsumerWorker | None = None
    rollout_worker: RolloutWorker | None = None
    producer: TypedProducer | None = None
    instance_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    @property
    def engine(self) -> PolicyEngine:
        return self.backend.engine  # type: ignore[attr-defined,no-any-return]


def make_backend(settings: PolicySettings) -> Backend:
    if settings.policy_backend == "tgi":
        return TGIBackend(settings.policy_tgi_url, tokenizer_dir=settings.policy_tgi_tokenizer_dir,
                          timeout_s=settings.policy_tgi_timeout_s, version=settings.policy_tgi_version,
                          max_input_tokens=settings.policy_max_input_tokens)
    engine = PolicyEngine.from_checkpoint(settings.policy_model_dir, settings.policy_model_version,
                                          device=settings.policy_device, dtype=settings.policy_dtype,
                                          torch_threads=settings.policy_torch_threads or machine_threads())
    return LocalBackend(engine, max_batch_size=settings.policy_max_batch_size,
                        batch_wait_ms=settings.policy_batch_wait_ms, max_queue=settings.policy_max_queue,
                        max_input_tokens=settings.policy_max_input_tokens)


def build_components(settings: PolicySettings, backend: Backend | None = None) -> PolicyComponents:
    runtime = ServiceRuntime(settings)
    backend = backend or make_backend(settings)
    defaults = SamplingDefaults.from_settings(settings)
    servicer = PolicyServicer(backend, defaults)
    runtime.add_service(SERVICE_NAME, lambda server: policy_pb2_grpc.add_PolicyServiceServicer_to_server(
        servicer, server))
    parts = PolicyComponents(runtime=runtime, backend=backend, servicer=servicer)

    async def nothing() -> None:
        pass

    # The backend starts before the HTTP API and the Kafka workers, and stops only after the gRPC
    # server drained its in-flight RPCs (on_stop runs after the server stopped).
    runtime.add_worker(_LoopBound(backend.start, nothing))
    runtime.on_stop(backend.stop)

    if settings.policy_http_enabled:
        parts.http = TGIHttpApi(backend, defaults, host=settings.host, port=settings.policy_http_port,
                                max_concurrent_requests=settings.policy_max_queue,
                                max_input_tokens=settings.policy_max_input_tokens)
        runtime.add_worker(parts.http)

    reload = settings.policy_reload_enabled and isinstance(backend, LocalBackend)
    if reload or settings.policy_worker_enabled:
        prompts = Topic(settings.policy_prompts_topic, common_pb2.Prompt)
        rollouts = Topic(settings.policy_rollouts_topic, common_pb2.Rollout)
        versions = Topic(settings.policy_model_versions_topic, common_pb2.ModelVersion)
        ensure_topics_for(settings, [prompts, rollouts, versions])
        parts.producer = producer_for(settings)

        if reload:
            assert isinstance(backend, LocalBackend)
            parts.reloader = PolicyReloader(lambda: backend.version, backend.swap,
                                            cache_dir=settings.home / "checkpoints",
                                            device=settings.policy_device, dtype=settings.policy_dtype)
            group = f"{settings.policy_consumer_group}-reload-{parts.instance_id}"
            parts.reload_worker = worker_for(settings, versions, group, parts.reloader.handle, parts.producer)
            runtime.add_worker(parts.reload_worker)

        if settings.policy_worker_enabled:
            holder: dict[str, object] = {}

            async def start_worker() -> None:
                parts.rollout_worker = RolloutWorker(
                    backend, parts.producer, rollouts, defaults, asyncio.get_running_loop(),  # type: ignore[arg-type]
                    max_prompts=settings.policy_worker_max_prompts)
                consumer = worker_for(settings, prompts, settings.policy_consumer_group,
                                      parts.rollout_worker.handle, parts.producer)  # type: ignore[arg-type]
                holder["worker"] = consumer
                await consumer.start()

            async def stop_worker() -> None:
                consumer = holder.get("worker")
                if consumer is not None:
                    await consumer.stop()  # type: ignore[attr-defined]

            runtime.add_worker(_LoopBound(start_worker, stop_worker))

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
    _settings = Settings()
    logging.basicConfig(level=_settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(_settings))
