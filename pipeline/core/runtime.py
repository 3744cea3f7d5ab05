"""Runtime settings shared by every stage: threads follow the CPUs this process may use;
CUDA's TF32 switches."""

from __future__ import annotations

import contextlib
import math
import os
import platform
from pathlib import Path
from typing import Iterator


def available_cpus() -> int:
    """CPUs this process may run on: affinity mask, capped by a cgroup CPU quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def _cgroup_cpu_quota() -> float | None:
    v2 = Path("/sys/fs/cgroup/cpu.max")
    try:
        if v2.exists():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        q = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
        p = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
        if q.exists() and p.exists():
            quota_us = int(q.read_text())
            return None if quota_us <= 0 else quota_us / int(p.read_text())
    except (OSError, ValueError):
        return None
    return None


def resolve_threads(threads: int) -> int:
    """``threads`` from params: 0 means one per available CPU."""
    return threads if threads > 0 else available_cpus()


def resolve_workers(workers: int | None) -> int:
    """Image-loading processes: ``workers`` from params, or (None) one per 2 available CPUs,
    at most 4, none on a single CPU. On a 2-core CPU one worker overlaps the loading with the
    network: ``features`` on 1,000 VGA copies took 18.8 s instead of 21.2 s (AMD EPYC)."""
    if workers is not None:
        return workers
    cpus = available_cpus()
    return 0 if cpus < 2 else min(4, cpus // 2)


def set_cuda_tf32(allowed: bool) -> tuple[bool, bool]:
    """Set PyTorch's TF32 switches (cuDNN convolutions, CUDA matrix products); return the old
    values."""
    import torch

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allowed
    return saved


@contextlib.contextmanager
def cuda_tf32(allowed: bool) -> Iterator[None]:
    """PyTorch's TF32 switches for CUDA convolutions and matrix products, restored on exit.

    PyTorch runs CUDA convolutions as TF32 by default (matrix products not); ``allowed=False``
    gives strict FP32, which matches the CPU to ~1e-5 instead of ~1e-2. No effect on CPU.
    """
    import torch

    saved = set_cuda_tf32(allowed)
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def cpu_name() -> str:
    """The CPU's model name (every benchmark figure names the machine it ran on)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_models() -> list[str]:
    """NVIDIA GPUs from the driver's /proc entries (no CUDA library is loaded to find them)."""
    models = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        try:
            for line in info.read_text().splitlines():
                if line.startswith("Model:"):
                    models.append(line.split(":", 1)[1].strip())
        except OSError:
            continue
    return models


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.machine()


def _version(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def machine_fingerprint() -> dict[str, object]:
    """What decides inference speed on this machine: CPU model and instruction-set flags, the
    CPUs this process may use, GPUs, and the engines' versions. Equal on one machine from run
    to run; ``id`` is its short hash (a bench report from another machine is not used to
    choose an engine here)."""
    import hashlib
    import json

    ort = _version("onnxruntime") or _version("onnxruntime-gpu")
    fields: dict[str, object] = {
        "cpu": cpu_name(),
        "cpu_flags_sha256": hashlib.sha256(_cpu_flags().encode()).hexdigest()[:16],
        "available_cpus": available_cpus(),
        "gpus": _gpu_models(),
        "onnxruntime": ort,
        "openvino": _version("openvino"),
        "onnxruntime_ep_openvino": _version("onnxruntime-ep-openvino"),
    }
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return {**fields, "id": digest}
