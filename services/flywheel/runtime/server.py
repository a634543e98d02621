"""The one service runtime: every Flywheel service is started, observed and stopped by this.

A service hands `ServiceRuntime` its servicers and background workers; the runtime gives it a
grpc.aio server with health checking (per service, NOT_SERVING until the service says it is
ready), server reflection, message-size and keepalive options, metrics and exception-mapping
interceptors, a Prometheus /metrics endpoint, TLS (or mutual TLS) on both from the settings'
`tls_*` files (runtime/tls.py), and graceful shutdown on SIGTERM/SIGINT:
health goes NOT_SERVING first, then in-flight RPCs get `shutdown_grace_s` to finish.

Composition: `add_lifecycle(start, stop)` for anything that runs beside the server (Kafka
consumers, batchers, the HTTP API): started in order before the service reports SERVING, stopped
in reverse before the server drains; `on_stop` for what must outlive in-flight RPCs (models,
producers). Health follows the one `Readiness` object (`runtime.readiness`): SERVING while every
registered condition holds, from whichever thread sets it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from typing import Awaitable, Callable, Protocol

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from flywheel import __version__
from flywheel.runtime import metrics
from flywheel.runtime.config import ServiceSettings
from flywheel.runtime.interceptors import ExceptionMappingInterceptor, MetricsInterceptor
from flywheel.runtime.process import freeze_startup_heap
from flywheel.runtime.readiness import Readiness
from flywheel.runtime.tls import TlsFiles

log = logging.getLogger(__name__)

# Health name that is SERVING from the moment the server listens until shutdown, whatever the
# service's readiness: liveness and startup probes ask about it, so a long start-up (the
# preference service replaying its topics) keeps the pod alive while readiness stays false.
LIVENESS_SERVICE = "flywheel.liveness"


class BackgroundWorker(Protocol):
    """Something that runs beside the gRPC server (a Kafka consumer loop, a trainer loop)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass
class _Lifecycle:
    start: Callable[[], Awaitable[None]]
    stop: Callable[[], Awaitable[None]] | None


@dataclass
class _Registration:
    full_name: str
    register: Callable[[aio.Server], None]


def grpc_options(settings: ServiceSettings) -> list[tuple[str, int]]:
    """Channel/server options shared by servers and clients."""
    return [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", settings.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", settings.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", min(settings.keepalive_time_ms, 10_000)),
    ]


class ServiceRuntime:
    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.health = health.aio.HealthServicer()
        self._registrations: list[_Registration] = []
        self._lifecycles: list[_Lifecycle] = []
        self._interceptors: list[aio.ServerInterceptor] = []
        self._on_stop: list[Callable[[], Awaitable[None]]] = []
        self._server: aio.Server | None = None
        self._metrics_server: metrics.MetricsServer | None = None
        self._stopped = asyncio.Event()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.grpc_port: int | None = None
        self.readiness = Readiness(settings.service_name)
        self.readiness.require("started", f"{settings.service_name} is starting")
        self.readiness.subscribe(self._readiness_changed)

    # -- composition -------------------------------------------------------------------------
    def add_service(self, full_name: str, register: Callable[[aio.Server], None]) -> None:
        """`register(server)` adds the servicer; `full_name` is e.g. "flywheel.v1.RewardService"."""
        self._registrations.append(_Registration(full_name, register))

    def add_interceptor(self, interceptor: aio.ServerInterceptor) -> None:
        """Runs inside the metrics and exception-mapping interceptors (its exceptions become statuses)."""
        self._interceptors.append(interceptor)

    def add_lifecycle(self, start: Callable[[], Awaitable[None]],
                      stop: Callable[[], Awaitable[None]] | None = None) -> None:
        """`start()` runs (in order of registration) before the service reports SERVING; `stop()`
        runs in reverse order on shutdown, before the server drains its in-flight RPCs."""
        self._lifecycles.append(_Lifecycle(start, stop))

    def add_worker(self, worker: BackgroundWorker) -> None:
        self.add_lifecycle(worker.start, worker.stop)

    def on_stop(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run after the server stopped accepting RPCs and workers stopped (release models, producers)."""
        self._on_stop.append(callback)

    @property
    def service_names(self) -> list[str]:
        return [r.full_name for r in self._registrations]

    # -- health ------------------------------------------------------------------------------
    async def set_serving(self, serving: bool) -> None:
        """Declare the service started (or not); health is SERVING once every readiness condition holds."""
        self.readiness.set("started", serving)
        await self._publish_health()

    async def _publish_health(self) -> None:
        serving = self.readiness.ready and not self._stopping
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)
        metrics.SERVICE_UP.labels(self.settings.service_name).set(1 if serving else 0)

    def _readiness_changed(self, ready: bool) -> None:
        loop = self._loop
        if loop is None or loop.is_closed() or self._stopping:
            return  # not started yet (start publishes) or shutting down (stays NOT_SERVING)
        loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._publish_health()))

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self, *, ready: bool = True) -> int:
        """Start the server (and metrics endpoint, workers). Returns the bound gRPC port.

        With ready=False, health stays NOT_SERVING until the service calls `set_serving(True)`.
        """
        settings = self.settings
        self._loop = asyncio.get_running_loop()
        metrics.BUILD_INFO.info({"version": __version__})
        self._server = aio.server(
            interceptors=[MetricsInterceptor(), ExceptionMappingInterceptor(), *self._interceptors],
            options=grpc_options(settings),
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        )
        for registration in self._registrations:
            registration.register(self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server
        )
        address = f"{settings.host}:{settings.grpc_port}"
        tls = TlsFiles.from_settings(settings)
        credentials = tls.grpc_server_credentials()
        if credentials is not None:
            self.grpc_port = self._server.add_secure_port(address, credentials)
        else:
            self.grpc_port = self._server.add_insecure_port(address)
        if self.grpc_port == 0:
            raise RuntimeError(f"could not bind gRPC server to {address}")
        await self._publish_health()
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self._server.start()
        if settings.metrics_enabled:
            self._metrics_server = metrics.MetricsServer(settings.host, settings.metrics_port,
                                                         **tls.metrics_server_kwargs())
        for lifecycle in self._lifecycles:
            await lifecycle.start()
        if ready:
            await self.set_serving(True)
        log.info(
            "%s serving %s on port %s (metrics on %s); home %s",
            settings.service_name, ", ".join(self.service_names), self.grpc_port, self.metrics_port, settings.home,
        )
        return self.grpc_port

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_server.port if self._metrics_server else None

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, wait shutdown_delay_s, stop workers, drain RPCs for `grace` s."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.settings.shutdown_grace_s if grace is None else grace
        log.info("%s shutting down (grace %.1fs)", self.settings.service_name, grace)
        await self.health.enter_graceful_shutdown()
        metrics.SERVICE_UP.labels(self.settings.service_name).set(0)
        if self.settings.shutdown_delay_s > 0:
            await asyncio.sleep(self.settings.shutdown_delay_s)
        for lifecycle in reversed(self._lifecycles):
            if lifecycle.stop is None:
                continue
            try:
                await lifecycle.stop()
            except Exception:  # noqa: BLE001 - keep shutting the rest down
                log.exception("%r failed to stop", lifecycle.stop)
        if self._server is not None:
            await self._server.stop(grace)
        for callback in reversed(self._on_stop):
            try:
                await callback()
            except Exception:  # noqa: BLE001
                log.exception("stop callback failed")
        if self._metrics_server is not None:
            # shutdown() waits out the HTTP server's 0.5 s poll: not on the event loop
            await asyncio.to_thread(self._metrics_server.stop)
        self._stopped.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.stop()))

    async def wait_for_termination(self) -> None:
        await self._stopped.wait()

    async def serve(self, *, ready: bool = True) -> None:
        """The process entry: start, then block until SIGTERM/SIGINT has been handled."""
        self.install_signal_handlers()
        frozen = freeze_startup_heap()  # built: a full GC pass over this would stall health for 0.1-0.45 s
        log.debug("%d start-up objects exempt from full GC passes", frozen)
        await self.start(ready=ready)
        await self.wait_for_termination()
