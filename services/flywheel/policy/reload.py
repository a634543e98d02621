"""Hot reload: follow the model-versions topic and serve the newest policy checkpoint.

Each instance reads the topic from the beginning with its own consumer group, so a restarted
instance converges on the newest version. Loading happens on the consumer thread (generation
keeps running on the old weights); the swap is one reference assignment, so every batch runs
entirely on one version and no request is dropped. A checkpoint that fails to load or validate
is rejected (logged, counted in flywheel_policy_reloads_total{outcome="rejected"}) and the
previous version keeps serving.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import unquote, urlparse

from flywheel.bus import Rejection
from flywheel.bus.codec import Delivery
from flywheel.policy import metrics
from flywheel.policy.engine import CheckpointError, LoadedPolicy, load_policy
from flywheel.v1 import common_pb2

log = logging.getLogger(__name__)

_NUMBER = re.compile(r"(\d+)$")


def version_key(version: str, step: int = 0) -> tuple[int, int, str]:
    """Order of versions: numeric suffix ("policy-0012" -> 12), then step, then the name."""
    match = _NUMBER.search(version)
    return (int(match.group(1)) if match else -1, step, version)


def local_checkpoint(uri: str, cache_dir: Path, version: str) -> Path:
    """A local directory for `uri`: file:// and plain paths as-is, other fsspec URLs copied once."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path if parsed.scheme else uri))
    import fsspec

    target = cache_dir / re.sub(r"[^A-Za-z0-9._-]", "_", version)
    if not (target / "config.json").exists():
        fs, path = fsspec.core.url_to_fs(uri)
        tmp = target.with_name(target.name + ".part")
        fs.get(path.rstrip("/") + "/", str(tmp), recursive=True)
        tmp.rename(target)
    return target


class PolicyReloader:
    def __init__(self, current_version: Callable[[], str], swap: Callable[[LoadedPolicy], None], *,
                 cache_dir: Path, device: str = "cpu", dtype: str = "float32") -> None:
        self._current_version = current_version
        self._swap = swap
        self.cache_dir = cache_dir
        self.device = device
        self.dtype = dtype
        self.rejected: dict[str, str] = {}
        self.loaded: list[str] = []

    def handle(self, batch: list[Delivery[common_pb2.ModelVersion]]) -> Iterable[Rejection]:
        versions = [d.value for d in batch
                    if d.value.kind == common_pb2.MODEL_KIND_POLICY and d.value.version and d.value.checkpoint_uri]
        if versions:
            newest = max(versions, key=lambda mv: version_key(mv.version, mv.step))
            self.apply(newest)
        return []

    def apply(self, mv: common_pb2.ModelVersion) -> bool:
        current = self._current_version()
        if mv.version == current or mv.version in self.rejected:
            return False
        if version_key(mv.version)[0] <= version_key(current)[0]:
            log.info("ignoring policy %s: not newer than %s", mv.version, current)
            return False
        started = time.perf_counter()
        try:
            path = local_checkpoint(mv.checkpoint_uri, self.cache_dir, mv.version)
            policy = load_policy(path, mv.version, device=self.device, dtype=self.dtype)
        except (CheckpointError, OSError, ValueError) as exc:
            self.rejected[mv.version] = str(exc)
            metrics.RELOADS.labels("rejected").inc()
            log.error("rejected policy %s from %s (still serving %s): %s", mv.version, mv.checkpoint_uri,
                      current, exc)
            return False
        metrics.RELOAD_SECONDS.observe(time.perf_counter() - started)
        self._swap(policy)
        self.loaded.append(mv.version)
        metrics.RELOADS.labels("loaded").inc()
        log.info("now serving policy %s (loaded in %.2fs)", mv.version, time.perf_counter() - started)
        return True
