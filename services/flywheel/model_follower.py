"""Hot reload, once for every service: follow the model-versions topic and swap in the newest model.

`ModelVersionFollower` is a batch handler for `ConsumerWorker` over `flywheel.model-versions.v1`
(each instance reads it from the beginning with its own group, so a restarted instance converges on
the newest version). Of the messages of its kind in a batch the newest wins; it is loaded and
validated on the consumer's thread while serving continues on the old model, then swapped in.

Failure policy (the same for policy and reward): a version that cannot be loaded or validated is
*rejected* - logged, counted, remembered - and never retried; the old model keeps serving and any
newer version is still applied. Whatever the error, the handler never raises, so a poison version
can not make the consumer rewind and retry it forever. Versions not newer than the one serving are
*ignored*. Outcomes are counted as `<service>_reloads_total{outcome=loaded|rejected|ignored}`.

Anyone who can write to the topic chooses the checkpoint_uri, so it is checked against the
operator's `UriPolicy` (settings `checkpoint_roots`, `checkpoint_remote`) before anything is read
or fetched. A version pointing elsewhere is rejected unread, and it does not count as considered:
a forged message with a high version number hides neither the versions after it nor an older
allowed version in the same batch.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Generic, Sequence, TypeVar

from prometheus_client import Counter, Histogram

from flywheel.bus.codec import Delivery
from flywheel.bus.consumer import Rejection
from flywheel.runtime.errors import FlywheelError, clip
from flywheel.runtime.uris import UriPolicy, check_uri
from flywheel.v1 import common_pb2
from flywheel.versions import POLICY, REWARD, version_order

log = logging.getLogger(__name__)

Model = TypeVar("Model")

LOADED, REJECTED, IGNORED = "loaded", "rejected", "ignored"
_KINDS = {POLICY: common_pb2.MODEL_KIND_POLICY, REWARD: common_pb2.MODEL_KIND_REWARD}


class ModelVersionFollower(Generic[Model]):
    """Newest-wins loader of `kind` ("policy" or "reward") model versions."""

    def __init__(self, kind: str, load: Callable[[common_pb2.ModelVersion], Model],
                 validate: Callable[[Model], None], swap: Callable[[Model], None], *,
                 current_version: Callable[[], str], uri_policy: UriPolicy, reloads: Counter,
                 reload_seconds: Histogram | None = None) -> None:
        self.kind = kind
        self._uri_policy = uri_policy
        self._kind_enum = _KINDS[kind]
        self._load, self._validate, self._swap = load, validate, swap
        self._current_version = current_version
        self._reloads, self._reload_seconds = reloads, reload_seconds
        self._newest_considered = version_order(current_version())
        self.loaded: list[str] = []
        self.rejected: dict[str, str] = {}  # version -> why

    @property
    def newest_considered(self) -> int:
        """Number of the newest version loaded or rejected so far (older ones are ignored); versions
        refused for their location do not count."""
        return self._newest_considered

    def __call__(self, batch: Sequence[Delivery[common_pb2.ModelVersion]]) -> list[Rejection]:
        candidates = [d.value for d in batch
                      if d.value.kind == self._kind_enum and d.value.version and d.value.checkpoint_uri]
        if not candidates:
            return []
        allowed = [mv for mv in candidates if not self._refused(mv)]
        if not allowed:
            return []
        newest = max(allowed, key=lambda mv: (version_order(mv.version), mv.step))
        ignored = len(allowed) - 1
        if not self.apply(newest):
            ignored += 1
        if ignored:
            self._reloads.labels(IGNORED).inc(ignored)
        return []

    def apply(self, mv: common_pb2.ModelVersion) -> bool:
        """Load, validate and swap in `mv`; False when it was ignored (not newer than what serves)."""
        current = self._current_version()
        if not self._is_new(mv):
            log.info("ignoring %s %s: not newer than %s", self.kind, mv.version, current)
            return False
        if self._refused(mv):
            return True
        self._newest_considered = version_order(mv.version)
        started = time.perf_counter()
        try:
            model = self._load(mv)
            self._validate(model)
        except Exception as exc:  # noqa: BLE001 - any failure rejects the version, never the consumer
            self._reject(mv, f"{type(exc).__name__}: {exc}", exc_info=True)
            return True
        if self._reload_seconds is not None:
            self._reload_seconds.observe(time.perf_counter() - started)
        self._swap(model)
        self.loaded.append(mv.version)
        self._reloads.labels(LOADED).inc()
        log.info("now serving %s %s (loaded in %.2fs from %s)", self.kind, mv.version,
                 time.perf_counter() - started, clip(mv.checkpoint_uri))
        return True

    def _is_new(self, mv: common_pb2.ModelVersion) -> bool:
        current = self._current_version()
        return mv.version != current and mv.version not in self.rejected and version_order(mv.version) > max(
            self._newest_considered, version_order(current))

    def _refused(self, mv: common_pb2.ModelVersion) -> bool:
        """True when `mv` points where the operator did not allow; a new one is rejected, unread."""
        try:
            check_uri(mv.checkpoint_uri, self._uri_policy)
            return False
        except FlywheelError as exc:  # InvalidArgument or PermissionDenied, naming checkpoint_uri
            if self._is_new(mv):
                self._reject(mv, f"{type(exc).__name__}: {exc}", exc_info=False)
            else:
                self._reloads.labels(IGNORED).inc()
            return True

    def _reject(self, mv: common_pb2.ModelVersion, why: str, *, exc_info: bool) -> None:
        self.rejected[mv.version] = why
        self._reloads.labels(REJECTED).inc()
        log.error("rejected %s %s from %s (still serving %s): %s", self.kind, clip(mv.version),
                  clip(mv.checkpoint_uri), self._current_version(), why, exc_info=exc_info)
