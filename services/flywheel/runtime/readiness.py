"""One readiness object per service: what it can do now, and why not.

A service is ready (gRPC health SERVING, KServe ServerReady true, RPCs accepted) when every
*condition* it registered holds: the runtime's own "started", plus whatever the service needs
("store caught up", "kafka reachable" for preference). Conditions are set from any thread.

*Dependencies* are tracked the same way but do not gate readiness: a service whose RPCs still
work without Kafka (scoring, generation) stays SERVING while the broker is away and reports
`flywheel_dependency_up{dependency="kafka"} 0` instead, which the KafkaUnreachable alert watches.
Liveness is never derived from either (a broker outage must not restart every pod).
"""

from __future__ import annotations

import threading
from typing import Callable

from prometheus_client import Gauge

DEPENDENCY_UP = Gauge("flywheel_dependency_up", "1 while the service can reach the dependency, else 0.",
                      ("service", "dependency"))


class Readiness:
    def __init__(self, service: str = "flywheel") -> None:
        self.service = service
        self._lock = threading.Lock()
        self._conditions: dict[str, tuple[bool, str]] = {}
        self._dependencies: dict[str, bool] = {}
        self._listeners: list[Callable[[bool], None]] = []

    # -- conditions (gate readiness) ------------------------------------------------------------
    def require(self, name: str, reason: str) -> None:
        """Register a condition, initially unmet; `reason` says what is missing while it is."""
        self.set(name, False, reason)

    def set(self, name: str, ok: bool, reason: str = "") -> None:
        with self._lock:
            before = self._ready_locked()
            previous_reason = self._conditions.get(name, (False, ""))[1]
            self._conditions[name] = (ok, reason or previous_reason)
            after = self._ready_locked()
            listeners = list(self._listeners) if after != before else []
        for listener in listeners:
            listener(after)

    def _ready_locked(self) -> bool:
        return all(ok for ok, _ in self._conditions.values())

    @property
    def ready(self) -> bool:
        with self._lock:
            return self._ready_locked()

    def is_set(self, name: str) -> bool:
        with self._lock:
            return self._conditions.get(name, (False, ""))[0]

    def why_not(self) -> str:
        """A message for UNAVAILABLE answers: every unmet condition's reason."""
        with self._lock:
            missing = [reason or name for name, (ok, reason) in self._conditions.items() if not ok]
        return "; ".join(missing) or "ready"

    def subscribe(self, listener: Callable[[bool], None]) -> None:
        """`listener(ready)` on every change of the overall state (called on the setter's thread)."""
        with self._lock:
            self._listeners.append(listener)

    # -- dependencies (reported, not gating) ----------------------------------------------------
    def set_dependency(self, name: str, up: bool) -> None:
        with self._lock:
            self._dependencies[name] = up
        DEPENDENCY_UP.labels(self.service, name).set(1 if up else 0)

    def dependency_up(self, name: str) -> bool | None:
        with self._lock:
            return self._dependencies.get(name)
