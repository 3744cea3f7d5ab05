"""onnxruntime sessions: execution-provider names, session options, engines, the automatic choice.

:data:`PROVIDERS` is the one table of short provider names (``cpu``, ``cuda``, ``tensorrt``,
``openvino``) and onnxruntime's names, used by ``pipeline predict``, the runner and ``bench``.
OpenVINO runs through onnxruntime's plugin execution provider (the ``onnxruntime-ep-openvino``
package, registered with ``register_execution_provider_library``), so every engine is one
onnxruntime session with the same inputs and outputs. That plugin offers Intel devices only; on
other x86-64 CPUs (AMD) the ``openvino`` provider runs the same file on the OpenVINO runtime
itself (:mod:`pipeline.onnx.openvino_runtime`, the same session calls). No torch here.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence

from ..core.errors import PipelineError
from ..core.runtime import resolve_threads
from .contract import ENGINES, engine_of

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider", "openvino": "OpenVINOExecutionProvider"}
# engines that honour the antialiased Resize of the raw-pixel model.onnx; the others (OpenVINO,
# TensorRT ignore `antialias`) get the fixed-size variants, preprocessed by the same graph on CPU
ANTIALIASED_RESIZE = ("cpu", "cuda")
# OpenVINO's CPU plugin computes "FP32" models in bf16 on CPUs that have it (AVX512_BF16,
# AMX) unless told otherwise: on a 2-core Xeon that was both slower (149 vs 214 img/s at batch 1)
# and less accurate (test 0.9888 vs 0.9926). Every OpenVINO session asks for f32.
OPENVINO_OPTIONS = {"load_config": '{"CPU": {"INFERENCE_PRECISION_HINT": "f32"}}'}
INTEL_VENDOR_ID = 0x8086  # PCI vendor id, as onnxruntime's hardware devices report it
OPENVINO_INSTALL = ("pip install onnxruntime-ep-openvino (Linux and Windows x86-64; the "
                    "project's setup installs it there)")
# onnxruntime-gpu's TensorRT provider links against TensorRT 10, which no PyPI wheel of ours
# brings: PyPI's tensorrt-cu12/-cu13 packages are stubs that fetch the real wheels from
# NVIDIA's own index at install time (offline machines cannot install them)
TENSORRT_LIBRARY = "libnvinfer.so.10"
TENSORRT_INSTALL = ("install TensorRT 10 from NVIDIA's index: pip install --extra-index-url "
                    "https://pypi.nvidia.com tensorrt-cu12-libs (CUDA 12; tensorrt-cu13-libs for "
                    "CUDA 13), or NVIDIA's TensorRT tar/deb packages with the library folder on "
                    "LD_LIBRARY_PATH")




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


@functools.lru_cache(maxsize=1)
def tensorrt_library() -> str | None:
    """Load TensorRT's ``libnvinfer.so.10`` (process-wide, so the TensorRT provider finds it)
    from the pip wheel's folder (``tensorrt_libs``) or the system's library path; returns what
    was loaded, or None when it is absent."""
    import ctypes
    import importlib.util

    candidates = []
    spec = importlib.util.find_spec("tensorrt_libs")
    if spec is not None and spec.submodule_search_locations:
        candidates += [str(Path(folder) / TENSORRT_LIBRARY)
                       for folder in spec.submodule_search_locations]
    for candidate in candidates + [TENSORRT_LIBRARY]:
        try:
            ctypes.CDLL(candidate, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        return candidate
    return None


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


@functools.lru_cache(maxsize=1)
def openvino_device() -> tuple[Any, str | None]:
    """(onnxruntime EP device for OpenVINO on the CPU, None) or (None, why not). Registers the
    plugin library once per process."""
    import onnxruntime as ort

    try:
        import onnxruntime_ep_openvino as plugin
    except ImportError:
        return None, f"onnxruntime-ep-openvino is not installed ({OPENVINO_INSTALL})"
    if not hasattr(ort, "register_execution_provider_library"):
        return None, f"onnxruntime {ort.__version__} has no plugin execution providers (>= 1.23)"
    # the plugin offers Intel hardware only; on other CPUs it is not even loaded: once
    # registered, its bundled libopenvino.so.2641 stands in for the openvino runtime's own
    # (same soname) in this process, and the runtime then runs on the plugin's copy
    cpus = [d.device for d in ort.get_ep_devices()
            if d.device.type == ort.OrtHardwareDeviceType.CPU]
    if cpus and not any(cpu.vendor_id == INTEL_VENDOR_ID for cpu in cpus):
        return None, ("onnxruntime-ep-openvino offers Intel hardware only (this CPU: "
                      f"{', '.join(sorted({cpu.vendor for cpu in cpus}))})")
    try:
        ort.register_execution_provider_library("openvino_ep", plugin.get_library_path())
    except Exception as exc:  # already registered in this process, or a broken plugin
        if "already" not in str(exc).lower():
            return None, f"the OpenVINO plugin did not load: {str(exc).strip()[:200]}"
    devices = [d for d in ort.get_ep_devices() if d.ep_name == plugin.get_ep_name()
               and dict(d.ep_metadata).get("ov_device") == "CPU"]
    if not devices:
        return None, "onnxruntime-ep-openvino lists no CPU device here"
    return devices[0], None


@functools.lru_cache(maxsize=1)
def openvino_backend() -> tuple[str | None, str]:
    """How the ``openvino`` provider runs here: ``("plugin", why)`` through onnxruntime's
    plugin EP (Intel CPUs), ``("runtime", why)`` through the ``openvino`` runtime directly (any
    x86-64 CPU, e.g. AMD, where the plugin lists no device), or ``(None, why not)``."""
    from .openvino_runtime import cpu_available, runtime_version

    device, plugin_reason = openvino_device()
    if device is not None:
        return "plugin", "onnxruntime-ep-openvino"
    runtime_reason = cpu_available()
    if runtime_reason is None:
        return "runtime", f"openvino {runtime_version()} runtime ({plugin_reason})"
    return None, f"{plugin_reason}; {runtime_reason}"


def unavailable_reason(name: str) -> str | None:
    """Why provider ``name`` cannot run here, or None when it may (the session decides)."""
    import onnxruntime as ort

    if name == "openvino":
        backend, why = openvino_backend()
        return None if backend else why
    if PROVIDERS[name] not in ort.get_available_providers():
        return f"this onnxruntime build has no {PROVIDERS[name]}"
    if name == "tensorrt" and tensorrt_library() is None:
        return f"{TENSORRT_LIBRARY} not found: {TENSORRT_INSTALL}"
    return None


def new_session(path: str | Path, names: Sequence[str], options: Any,
                provider_options: Sequence[dict[str, Any]] | None = None) -> Any:
    """An onnxruntime session on the providers ``names`` (short names, in order of
    preference; CPU last is the fallback). OpenVINO goes through the plugin EP's device API,
    or where the plugin offers no device, through the OpenVINO runtime itself
    (:class:`pipeline.onnx.openvino_runtime.OpenVinoSession`, the same calls)."""
    import onnxruntime as ort

    provider_options = list(provider_options or [{} for _ in names])
    if names and names[0] == "openvino":
        backend, reason = openvino_backend()
        if backend is None:
            raise PipelineError(f"openvino: {reason}")
        if backend == "runtime":
            from .openvino_runtime import OpenVinoSession

            extra = dict(provider_options[0])
            threads = int(extra.pop("num_of_threads", options.intra_op_num_threads))
            return OpenVinoSession(path, threads, extra)
        device, _ = openvino_device()
        options.add_provider_for_devices([device], {k: str(v) for k, v in
                                                     (OPENVINO_OPTIONS |
                                                      provider_options[0]).items()})
        return ort.InferenceSession(str(path), options)
    return ort.InferenceSession(str(path), options, providers=[PROVIDERS[n] for n in names],
                                provider_options=provider_options)


def resolve_providers(names: Sequence[str]) -> list[str]:
    """``['cuda', 'cpu']`` -> the short names that can run here, in order (``openvino`` only
    first: the plugin EP cannot share a session with CUDA or TensorRT)."""
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown:
        raise PipelineError(f"--providers: unknown provider {unknown[0]!r}; choose from "
                            f"auto, {', '.join(PROVIDERS)}")
    chosen = [n for n in names if unavailable_reason(n) is None]
    if "openvino" in chosen:
        chosen = ["openvino", "cpu"] if chosen[0] == "openvino" else \
            [n for n in chosen if n != "openvino"]
    if not chosen:
        reasons = "; ".join(f"{n}: {unavailable_reason(n)}" for n in names)
        raise PipelineError(f"--providers: none of {', '.join(names)} can run here ({reasons}); "
                            "add cpu")
    return chosen


MAX_ACCURACY_DROP = 0.01  # the bench's rule: a row is accurate within 1 point of FP32


def reference_accuracy(rows: Sequence[dict[str, Any]]) -> float | None:
    """The FP32 accuracy a row is judged against: the onnxruntime CPU FP32 row, else the
    PyTorch eager FP32 row on the same images, else None (nothing to judge against)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    for engine, provider, variant in (("onnxruntime", "cpu", "fp32"),
                                      ("pytorch", "cpu", "fp32 eager"),
                                      ("pytorch", "cuda", "fp32 eager")):
        found = [r["accuracy"] for r in ok
                 if (r.get("engine"), r["provider"], r["variant"]) == (engine, provider, variant)]
        if found:
            return max(found)
    return None


def accurate_rows(rows: Sequence[dict[str, Any]],
                  max_drop: float = MAX_ACCURACY_DROP) -> list[dict[str, Any]]:
    """The onnxruntime rows of a ``pipeline bench`` report that ran and kept accuracy within
    ``max_drop`` of the FP32 reference (:func:`reference_accuracy`): the one rule behind the
    bench summary, its ratios, headline and fastest path, the model card and ``--providers
    auto``. Without a reference no row is trusted."""
    reference = reference_accuracy(rows)
    if reference is None:
        return []
    return [r for r in rows if r.get("status") == "ok" and r.get("engine") == "onnxruntime"
            and r["accuracy"] >= reference - max_drop - 1e-12]


def auto_provider(model_resizes_in_graph: bool, variant: str,
                  bench_report: str | Path | None = None,
                  max_accuracy_drop: float = MAX_ACCURACY_DROP,
                  engines: Sequence[str] = ENGINES) -> tuple[str, str]:
    """(provider, why) for ``--providers auto``: the fastest provider that ran this kind of
    file in the last ``pipeline bench`` report of *this* machine with accuracy within
    ``max_accuracy_drop`` of FP32; without such a report (none, or one measured on another
    machine), a fixed order (CUDA, then OpenVINO on an Intel or AMD x86 CPU for a fixed-size
    file, then CPU). Engines that ignore antialiased Resize are never picked for the
    raw-pixel model, nor engines the file's export did not pass it for (``engines``)."""
    import json

    from ..core.runtime import machine_fingerprint

    allowed = [n for n in PROVIDERS
               if unavailable_reason(n) is None and engine_of(n) in engines
               and (n in ANTIALIASED_RESIZE or not model_resizes_in_graph)]
    report = Path(bench_report) if bench_report else None
    why_not = "no bench report for this kind of file"
    if report is not None and report.is_file():
        data = json.loads(report.read_text(encoding="utf-8"))
        measured_on = (data.get("environment") or {}).get("machine") or {}
        here = machine_fingerprint()
        rows = data.get("rows", [])
        if measured_on.get("id") != here["id"]:
            rows = []
            why_not = (f"{report} was measured on another machine "
                       f"({measured_on.get('cpu', 'unknown')}, id "
                       f"{measured_on.get('id', 'none')}; here {here['cpu']}, id {here['id']}): "
                       "ignored, run `pipeline bench` here")
        ok = [r for r in accurate_rows(rows, max_accuracy_drop)
              if r["variant"] == variant and r["provider"] in allowed]
        if ok:
            best = max(ok, key=lambda r: (r["throughput_ips"], -r["batch_size"]))
            return best["provider"], (f"fastest {variant} in {report} "
                                      f"({best['throughput_ips']:.0f} img/s at batch "
                                      f"{best['batch_size']}, accuracy {best['accuracy']:.4f})")
    for name in ("cuda", "openvino", "cpu"):
        if name in allowed:
            return name, f"{why_not}; fixed order cuda, openvino, cpu"
    return "cpu", "fallback"
