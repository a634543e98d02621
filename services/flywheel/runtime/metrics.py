"""Prometheus metrics shared by every service, and the /metrics endpoint.

gRPC metrics use the names of go-grpc-prometheus (grpc_server_started_total,
grpc_server_handled_total, grpc_server_handling_seconds, grpc_server_msg_*_total) so existing
dashboards and alerts work unchanged.
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info, start_http_server

log = logging.getLogger(__name__)

_GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")

GRPC_STARTED = Counter(
    "grpc_server_started_total", "Total number of RPCs started on the server.", _GRPC_LABELS
)
GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "Total number of RPCs completed on the server, regardless of success or failure.",
    (*_GRPC_LABELS, "grpc_code"),
)
GRPC_HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
    _GRPC_LABELS,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
GRPC_MSG_RECEIVED = Counter(
    "grpc_server_msg_received_total", "Total number of RPC stream messages received on the server.", _GRPC_LABELS
)
GRPC_MSG_SENT = Counter(
    "grpc_server_msg_sent_total", "Total number of gRPC stream messages sent by the server.", _GRPC_LABELS
)

BUILD_INFO = Info("flywheel_build", "Flywheel build information.")
SERVICE_UP = Gauge("flywheel_service_serving", "1 while the service reports SERVING.", ("service",))


class MetricsServer:
    """The /metrics HTTP endpoint, on its own thread."""

    def __init__(self, host: str, port: int, **tls: object) -> None:
        """`tls`: TlsFiles.metrics_server_kwargs() (certfile, keyfile, client CA) for HTTPS."""
        self._server: WSGIServer
        self._thread: threading.Thread
        self._server, self._thread = start_http_server(port, addr=host, registry=REGISTRY, **tls)  # type: ignore[arg-type]

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
