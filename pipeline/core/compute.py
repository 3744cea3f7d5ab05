"""How much arithmetic a network needs and how fast this machine can do it.

* :func:`forward_macs`: multiply-accumulates of a module's convolutions and linear layers;
* :func:`matmul_gflops`: this CPU's measured FP32 matrix-product rate (the practical ceiling);
* :func:`cpu_peak_gflops`: the theoretical FP32 peak, cores x clock x FLOP per cycle of the
  widest vector unit with FMA (an estimate: two FMA units assumed on AVX-512 and AVX2 CPUs).

Used by ``bench`` (GFLOP/s sustained next to the peak) and ``bench-finetune``.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any


def forward_macs(module: Any, x: Any) -> int:
    """Multiply-accumulates of ``module``'s convolutions and linear layers on input ``x``."""
    import torch
    from torch import nn

    total = 0

    def count(layer: nn.Module, _inputs: Any, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(layer, nn.Conv2d):
            kh, kw = layer.kernel_size
            total += out.numel() * (layer.in_channels // layer.groups) * kh * kw
        elif isinstance(layer, nn.Linear):
            total += out.numel() * layer.in_features

    handles = [m.register_forward_hook(count) for m in module.modules()]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for handle in handles:
            handle.remove()
    return total


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    """This CPU's FP32 matrix-product rate (GFLOP/s) at the current torch thread count
    (best of ``repeats``; on a shared machine single products vary by 20 % and more)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best / 1e9


def cpu_peak_gflops(cores: int | None = None) -> dict[str, Any]:
    """Theoretical FP32 peak from /proc/cpuinfo: cores x clock x FLOP/cycle (FMA = 2 FLOP;
    AVX-512: 16 lanes, AVX2: 8, SSE: 4; two FMA units assumed)."""
    flags: set[str] = set()
    mhz = 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("cpu MHz"):
                mhz = max(mhz, float(line.split(":", 1)[1]))
    except OSError:
        pass
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    fma = 2 if "fma" in flags or "avx512f" in flags else 1
    flop_per_cycle = lanes * fma * 2  # two vector units
    cores = cores or os.cpu_count() or 1
    return {"cores": cores, "clock_ghz": round(mhz / 1000, 3), "flop_per_cycle": flop_per_cycle,
            "vector_unit": "AVX-512" if lanes == 16 else "AVX2" if lanes == 8 else "SSE",
            "peak_gflops": round(cores * mhz / 1000 * flop_per_cycle, 1) if mhz else None}
