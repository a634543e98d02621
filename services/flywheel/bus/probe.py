"""Is the broker reachable? A small admin client asks it every second and tells the readiness object.

Consumers and producers retry on their own and never raise while the broker is away, so
"reachable" has to be asked: a DescribeCluster round trip with a short timeout. With `gate`, the
answer is a readiness condition (preference cannot acknowledge anything without the broker, so it
reports NOT_SERVING); without, a dependency (`flywheel_dependency_up`), for services whose RPCs
keep working.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from kafka import KafkaAdminClient

from flywheel.runtime.config import ServiceSettings
from flywheel.runtime.readiness import Readiness

log = logging.getLogger(__name__)

KAFKA = "kafka"


class BrokerProbe:
    def __init__(self, settings: ServiceSettings, readiness: Readiness, *, gate: bool, interval_s: float = 1.0,
                 timeout_s: float = 3.0) -> None:
        self._settings = settings
        self._readiness = readiness
        self._gate = gate
        self._interval_s = interval_s
        self._timeout_ms = int(timeout_s * 1000)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._admin: KafkaAdminClient | None = None
        self.up: bool | None = None
        if gate:
            readiness.require(KAFKA, "the Kafka broker is unreachable")

    def check(self) -> bool:
        """One round trip to the broker (on the probe's thread)."""
        try:
            if self._admin is None:
                s = self._settings
                self._admin = KafkaAdminClient(
                    bootstrap_servers=s.bootstrap_servers, client_id=f"{s.kafka_client_id}-{s.service_name}-probe",
                    security_protocol=s.kafka_security_protocol, request_timeout_ms=self._timeout_ms,
                    bootstrap_timeout_ms=self._timeout_ms,
                    reconnect_backoff_max_ms=s.kafka_reconnect_backoff_max_ms)
            self._admin.describe_cluster()
            return True
        except Exception as exc:  # noqa: BLE001 - any failure means: not reachable now
            log.debug("broker probe failed: %s", exc)
            self._close_admin()
            return False

    def _report(self, up: bool) -> None:
        if up != self.up:
            (log.info if up else log.warning)("Kafka broker %s", "reachable" if up else "UNREACHABLE")
        self.up = up
        self._readiness.set_dependency(KAFKA, up)
        if self._gate:
            self._readiness.set(KAFKA, up)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._report(self.check())
            self._stop.wait(self._interval_s)
        self._close_admin()

    def _close_admin(self) -> None:
        if self._admin is not None:
            try:
                self._admin.close()
            except Exception:  # noqa: BLE001
                pass
            self._admin = None

    async def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="broker-probe", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, self._timeout_ms / 1000 + 5)
