"""ONNX helpers shared by the features stage (frozen backbone) and, later, the export stage."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any, Sequence

from .errors import PipelineError
from .runtime import resolve_threads

DEFAULT_OPSET = 18


def export_module(model: Any, example: Any, path: str | Path, *, input_name: str = "input",
                  output_names: Sequence[str] = ("output",), opset: int = DEFAULT_OPSET) -> Path:
    """Export ``model`` (eval mode) to one self-contained ONNX file with a dynamic batch axis."""
    import onnx
    import torch

    path = Path(path)
    batch = torch.export.Dim("batch", min=1, max=4096)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            program = torch.onnx.export(
                model, (example,), input_names=[input_name], output_names=list(output_names),
                dynamic_shapes={next(iter(_forward_arg_names(model))): {0: batch}},
                opset_version=opset, dynamo=True, optimize=True, verbose=False)
        program.save(str(path), external_data=False)
    except Exception as exc:
        raise PipelineError(f"ONNX export of {type(model).__name__} failed: "
                            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}") \
            from None
    model_proto = onnx.load(str(path))
    strip_debug_info(model_proto)
    onnx.save_model(model_proto, str(path), save_as_external_data=False)
    onnx.checker.check_model(str(path), full_check=True)
    return path


def strip_debug_info(model: Any) -> None:
    """Drop the exporter's per-node debug metadata (Python stack traces with this machine's
    absolute paths, FX node dumps, module scopes): the graph is unchanged, the file no longer
    depends on where the package is installed, and it is smaller."""
    graphs = [model.graph] + [f for f in model.functions]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
            for attr in node.attribute:
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)


def _forward_arg_names(model: Any) -> list[str]:
    import inspect

    params = list(inspect.signature(model.forward).parameters)
    return params or ["x"]


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
