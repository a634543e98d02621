"""Process-wide state, set once when a process starts and never by constructors.

torch's intra-op thread count and the global random seeds belong to the whole process: a library
object that changed them would silently slow down or perturb whatever else runs in the process
(the trainer's PPO, a benchmark's baseline). Entry points (`flywheel serve`, `python -m
flywheel.trainer`, `flywheel reward train`) call `configure_process` first (services through
`start_service_process`, which also refuses unknown FLYWHEEL_* variables); nothing else does.
`ServiceRuntime.serve`, the one place a service process starts serving, freezes its start-up heap.
"""

from __future__ import annotations

import gc
import logging
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from flywheel.runtime.config import ServiceSettings

log = logging.getLogger(__name__)


def configure_process(*, torch_threads: int = 0, seed: int | None = None) -> None:
    """Set torch's intra-op threads (0: leave torch's default) and, when given, the global seeds.

    torch is imported only when there is something to set: services without models (preference)
    never pay for it."""
    if seed is not None:
        random.seed(seed)
    if torch_threads <= 0 and seed is None:
        return
    import torch

    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    if seed is not None:
        torch.manual_seed(seed)
    log.debug("process configured: %d torch threads, seed %s", torch.get_num_threads(), seed)


def start_service_process(settings: "ServiceSettings") -> None:
    """What every service process does before it serves: check the environment, set its threads."""
    from flywheel.docs import known_env_names
    from flywheel.runtime.config import check_environment

    check_environment(known_env_names())
    configure_process(torch_threads=settings.torch_threads)


def freeze_startup_heap() -> int:
    """Take everything alive once a service is built (imports, the loaded model) out of the cyclic
    garbage collector's full passes; returns how many objects that is.

    A full (generation 2) collection walks every tracked object holding the GIL, so every thread
    stops: with torch and transformers loaded that is ~500,000 objects and 0.1-0.45 s measured on
    2 cores, during which no health check, RPC or Kafka poll is answered. What a service creates
    later (requests, hot-reloaded models) is collected as before, and frozen objects are still freed
    by reference counting; only a reference cycle among start-up objects would never be collected."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def machine_threads() -> int:
    """CPUs this process may use: its affinity set, capped by a cgroup CPU quota (containers)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)
