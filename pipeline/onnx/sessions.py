"""onnxruntime sessions: execution-provider names, session options, GPU library preload.

:data:`PROVIDERS` is the one table of short provider names (``cpu``, ``cuda``, ``tensorrt``) and
onnxruntime's names, used by ``pipeline predict``, the runner and ``bench``. No torch here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..core.errors import PipelineError
from ..core.runtime import resolve_threads

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}


GRAPH_OPTIMIZATION = ("disable", "basic", "extended", "all")


def session_options(threads: int, graph_optimization: str = "all") -> Any:
    import onnxruntime as ort

    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    options = ort.SessionOptions()
    options.intra_op_num_threads = resolve_threads(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = levels[graph_optimization]
    options.log_severity_level = 3
    return options


def preload_gpu_libraries() -> None:
    """Load the CUDA/cuDNN libraries that pip's nvidia-* wheels (PyTorch's) ship, so that
    onnxruntime-gpu's CUDA and TensorRT providers find them without LD_LIBRARY_PATH."""
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)  # onnxruntime >= 1.21
    if preload is None:
        return
    try:
        preload(directory="")
    except Exception:  # missing wheels: the provider then reports its own error
        pass


def cuda_tf32_option(allowed: bool) -> dict[str, str]:
    """onnxruntime CUDA provider option for TF32 math on FP32 convolutions and matrix products
    (the provider's default is on)."""
    return {"use_tf32": str(int(allowed))}


def ort_session(path: str | Path, threads: int = 0, device: str = "cpu") -> Any:
    """An onnxruntime session; ``device='cuda'`` asks for CUDA in strict FP32 (no TF32) and
    checks it was granted."""
    import onnxruntime as ort

    providers: list[Any] = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise PipelineError("features.device is cuda but onnxruntime has no "
                                "CUDAExecutionProvider here; set features.device: cpu")
        # TF32 put Lite0's features ~1e-2 off the CPU's (H100); cached features feed every
        # later stage, so they are computed in strict FP32
        providers = [("CUDAExecutionProvider", cuda_tf32_option(False)), "CPUExecutionProvider"]
        preload_gpu_libraries()
    session = ort.InferenceSession(str(path), session_options(threads), providers=providers)
    if device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise PipelineError("onnxruntime fell back to CPU although features.device is cuda "
                            "(CUDA libraries missing?); set features.device: cpu")
    return session


def resolve_providers(names: Sequence[str]) -> list[str]:
    """``['cuda', 'cpu']`` -> onnxruntime provider names that this install has, in order."""
    import onnxruntime as ort

    unknown = [n for n in names if n not in PROVIDERS]
    if unknown:
        raise PipelineError(f"--providers: unknown provider {unknown[0]!r}; choose from "
                            f"{', '.join(PROVIDERS)}")
    available = ort.get_available_providers()
    chosen = [PROVIDERS[n] for n in names if PROVIDERS[n] in available]
    if not chosen:
        raise PipelineError(f"--providers: none of {', '.join(names)} is available in this "
                            f"onnxruntime (available: {', '.join(available)}); add cpu")
    return chosen
