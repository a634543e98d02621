"""Numeric precision, one vocabulary for every service: float32 | bfloat16 | auto (| float16).

`resolve_dtype("auto")` picks bfloat16 where the hardware computes it natively (CUDA with bf16
support; a CPU with AMX-BF16 or AVX512-BF16, read from /proc/cpuinfo) and float32 otherwise.
The policy loads its weights in the resolved dtype; the reward scorer and the PPO step keep fp32
weights and run their forward passes under `autocast` (matmuls in bf16, reductions in fp32).
"""

from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path
from typing import ContextManager

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when this CPU computes bf16 matmuls natively (AMX-BF16 or AVX512-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def resolve_dtype(dtype: str, device: str = "cpu") -> str:
    """The concrete dtype name for a setting: `auto` -> bfloat16 where native, else float32."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} (auto, {', '.join(DTYPES)})")
        return dtype
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if device == "cpu" and cpu_has_bf16() else "float32"


def autocast(dtype: str, device: str | torch.device = "cpu") -> ContextManager[object]:
    """`torch.autocast` to a resolved lower precision on `device`'s type; a no-op for float32."""
    device_type = torch.device(device).type
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=DTYPES[dtype])
