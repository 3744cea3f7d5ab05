"""Stage bench: onnxruntime (CPU, CUDA, TensorRT) versus PyTorch eager, a report users can trust.

For every exported variant (FP32 ``models/model.onnx``, FP16 and INT8 from
``models/variants/``), every execution provider and every batch size in ``bench.batch_sizes``,
plus the PyTorch eager model on each device as the baseline, one row with:

* session creation time, first-inference (cold) latency, then after warm-up: p50/p90/p99,
  mean +- std latency and throughput (images/s), over ``bench.iterations`` runs or
  ``bench.time_budget_s`` seconds, whichever ends first;
* test-split accuracy of that provider x variant (computed once per pair, at the largest batch
  size), so a fast but wrong configuration is visible;
* peak host RSS during the configuration (the kernel's high-water mark, reset per row) and, on
  a GPU, device memory in use;
* the provider onnxruntime *actually* used. onnxruntime silently falls back to CPU when a GPU
  provider cannot start: such a row gets ``status: fallback`` and no timings, never CPU numbers
  under a GPU name. A provider this machine lacks gets ``status: unavailable`` with the reason.

CPU threads follow the CPUs this process may use (affinity and cgroup quota); CUDA runs with
IO binding (inputs and outputs on the device) and ``bench.cudnn_conv_algo_search``. On CUDA,
onnxruntime and PyTorch both run FP32 convolutions as TF32 by default; ``bench.cuda_tf32``
(default true, the libraries' default) sets both, and each CUDA row records it in ``tf32``, so
"fp32" on a GPU says which math it was. TensorRT
uses an engine cache folder and min/opt/max profile shapes covering the batch list, with
``bench.trt_fp16``.

Rows are timed one after another, minutes apart, and a shared machine's speed drifts in that
time; so the speedup of the best accurate CPU path (onnxruntime CPU or OpenVINO, any variant)
over onnxruntime CPU FP32 is also timed *paired*: both sessions alternate in short blocks for
``bench.paired_rounds`` rounds, and the median of the per-round speedups is reported.

Outputs: ``reports/bench.json`` (rows), ``reports/bench.md`` (a table to paste in an issue)
and ``reports/bench.png`` (throughput by batch size). The last lines sum up the best accurate
ONNX configuration's speedup over PyTorch eager on each device (naming its engine) and the
paired speedups.

Run: ``pipeline bench --model models/model.onnx --variants-dir models/variants``
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterator

import numpy as np

from .. import __version__
from ..core.atomic import atomic_file, write_json, write_text
from ..core.config import BenchParams
from ..core.copies import PreparedImages
from ..core.dataset import read_prepared
from ..core.errors import PipelineError
from ..core.params import as_dict
from ..core.runtime import (available_cpus, cpu_name, cuda_tf32, machine_fingerprint,
                            resolve_threads)
from ..onnx.contract import VARIANTS, engine_of
from ..onnx.sessions import (PROVIDERS, accurate_rows, cuda_tf32_option, new_session,
                             openvino_backend, unavailable_reason)

# --------------------------------------------------------------------------- measurement


def _rss_reset() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as handle:  # resets VmHWM to the current RSS
            handle.write("5")
    except OSError:
        pass


def _rss_peak_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def _gpu_memory_mb() -> float | None:
    try:
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            return round((total - free) / 2**20, 1)
    except Exception:
        pass
    return None


def time_runs(run: Callable[[], Any], params: BenchParams) -> dict[str, Any]:
    """Cold first run, warm-up, then timed runs until iterations or the time budget."""
    t0 = time.perf_counter()
    run()
    cold_ms = (time.perf_counter() - t0) * 1000
    for _ in range(params.warmup):
        run()
    latencies: list[float] = []
    started = time.perf_counter()
    while len(latencies) < params.iterations and (
            not latencies or time.perf_counter() - started < params.time_budget_s):
        t0 = time.perf_counter()
        run()
        latencies.append((time.perf_counter() - t0) * 1000)
    ms = np.array(latencies)
    return {"first_inference_ms": round(cold_ms, 3), "iterations": len(latencies),
            "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p90_ms": round(float(np.percentile(ms, 90)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "mean_ms": round(float(ms.mean()), 3),
            "std_ms": round(float(ms.std(ddof=1)) if len(ms) > 1 else 0.0, 3)}


def paired_speedup(baseline: Callable[[], Any], candidate: Callable[[], Any], rounds: int,
                   block_s: float, clock: Callable[[], float] = time.perf_counter
                   ) -> dict[str, Any]:
    """Speedup of ``candidate`` over ``baseline`` timed in interleaved rounds: each round runs
    both for ``block_s`` seconds back to back, in alternating order (AB, BA, ...), so the
    drift of a shared machine (its speed swings 10-40 % within minutes here) hits both sides
    alike; the rows of the table are timed minutes apart and are not. A round's speedup is
    the baseline's median latency over the candidate's; the median over rounds and the
    range are reported."""

    def median_ms(run: Callable[[], Any]) -> float:
        times: list[float] = []
        started = clock()
        while not times or clock() - started < block_s:
            t0 = clock()
            run()
            times.append(clock() - t0)
        return float(np.median(times))

    baseline()
    candidate()
    speedups = []
    for i in range(rounds):
        if i % 2 == 0:
            a = median_ms(baseline)
            b = median_ms(candidate)
        else:
            b = median_ms(candidate)
            a = median_ms(baseline)
        speedups.append(a / b)
    ordered = sorted(speedups)
    return {"rounds": rounds, "median": round(float(np.median(speedups)), 3),
            "low": round(ordered[0], 3), "high": round(ordered[-1], 3),
            "speedups": [round(x, 3) for x in speedups]}


def provider_options(provider: str, params: BenchParams, input_shape: tuple[int, ...],
                     cache_dir: Path) -> dict[str, Any]:
    if provider == "cuda":
        return {"cudnn_conv_algo_search": params.cudnn_conv_algo_search,
                **cuda_tf32_option(params.cuda_tf32), "device_id": 0}
    if provider == "tensorrt":
        dims = "x".join(str(d) for d in input_shape[1:])
        low, high = min(params.batch_sizes), max(params.batch_sizes)
        cache_dir.mkdir(parents=True, exist_ok=True)
        return {"trt_fp16_enable": params.trt_fp16, "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache_dir), "trt_timing_cache_enable": True,
                "trt_timing_cache_path": str(cache_dir),
                "trt_profile_min_shapes": f"image:{low}x{dims}",
                "trt_profile_opt_shapes": f"image:{high}x{dims}",
                "trt_profile_max_shapes": f"image:{high}x{dims}"}
    if provider == "openvino":  # the same thread count as the CPU rows
        return {"num_of_threads": resolve_threads(params.threads)}
    return {}


def make_session(path: Path, provider: str, params: BenchParams,
                 input_shape: tuple[int, ...]) -> tuple[Any, str, float]:
    """(session, provider actually used, creation seconds). GPU providers keep CPU as the
    fallback onnxruntime uses for unsupported nodes; the *first* provider tells what ran."""

    from ..onnx.sessions import preload_gpu_libraries, session_options

    names = [provider]
    options = [provider_options(provider, params, input_shape, Path(params.trt_cache_dir))]
    if provider == "tensorrt":  # nodes TensorRT rejects go to CUDA, then CPU
        names.append("cuda")
        options.append(provider_options("cuda", params, input_shape, Path()))
    if provider in ("cuda", "tensorrt"):
        preload_gpu_libraries()
    if provider != "cpu":
        names.append("cpu")
        options.append({})
    t0 = time.perf_counter()
    session = new_session(path, names, session_options(params.threads,
                                                       params.graph_optimization), options)
    return session, session.get_providers()[0], time.perf_counter() - t0


@contextlib.contextmanager
def captured_native_output() -> Iterator[list[str]]:
    """Capture what onnxruntime's C++ logger and Python fallback print (file descriptors 1
    and 2) while a GPU session is created: the lines become the row's reason, not noise."""
    lines: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            for fd in (1, 2):
                os.dup2(sink.fileno(), fd)
            yield lines
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            lines.extend(sink.read().decode("utf-8", "replace").splitlines())


def failure_reason(lines: list[str]) -> str:
    """The most telling line of onnxruntime's provider-start errors."""
    for marker in ("with error: ", "No registered plugin EP device", "Failed to create"):
        for line in lines:
            if marker in line:
                text = line.split(marker, 1)[1] if marker == "with error: " else line
                return re.sub(r"\x1b\[[0-9;]*m|\[m", "", text).strip()[:200]
    return "no GPU, or CUDA/cuDNN/TensorRT libraries missing"


# --------------------------------------------------------------------------- rows


@dataclass
class Row:
    """One configuration of the report: what ran, and its figures when ``status`` is ok
    (``unavailable``/``fallback`` rows carry the reason instead)."""

    model: str
    threads: int
    engine: str  # onnxruntime | pytorch
    provider: str
    variant: str
    batch_size: int
    status: str = "ok"  # ok | unavailable | fallback
    provider_used: str | None = None
    reason: str | None = None
    trt_fp16: bool | None = None
    tf32: bool | None = None
    openvino_backend: str | None = None
    io_binding: bool | None = None
    session_create_s: float | None = None
    first_inference_ms: float | None = None
    iterations: int | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    std_ms: float | None = None
    throughput_ips: float | None = None
    accuracy: float | None = None
    peak_rss_mb: float | None = None
    gpu_memory_mb: float | None = None

    def timed(self, stats: dict[str, Any], created_s: float, accuracy: float,
              gpu: bool) -> dict[str, Any]:
        """This configuration with its measured figures, as a report row."""
        return asdict(replace(self, status="ok", session_create_s=round(created_s, 3), **stats,
                              throughput_ips=round(self.batch_size * 1000 / stats["mean_ms"], 2),
                              accuracy=accuracy, peak_rss_mb=_rss_peak_mb(),
                              gpu_memory_mb=_gpu_memory_mb() if gpu else None))

    def skipped(self, status: str, reason: str, used: str | None = None) -> dict[str, Any]:
        """A row that ran nothing: its reason, and no figure fields at all (never CPU
        numbers under a GPU name, not even empty ones)."""
        row = asdict(replace(self, status=status, reason=reason, provider_used=used))
        return {k: v for k, v in row.items() if k not in MEASURED}


def _ort_runner(session: Any, provider: str, batch: np.ndarray, io_binding: bool,
                output: str) -> Callable[[], Any]:
    import onnxruntime as ort

    if provider in ("cuda", "tensorrt") and io_binding:
        binding = session.io_binding()
        device_input = ort.OrtValue.ortvalue_from_numpy(batch, "cuda", 0)
        binding.bind_ortvalue_input("image", device_input)
        binding.bind_output(output, "cuda", 0)

        def run_bound() -> Any:
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()

        return run_bound
    return lambda: session.run([output], {"image": batch})


def _accuracy(predict: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray,
              labels: np.ndarray, batch_size: int) -> float:
    preds = np.concatenate([predict(pixels[s:s + batch_size]).argmax(1)
                            for s in range(0, len(pixels), batch_size)])
    return round(float((preds == labels).mean()), 6)


def ort_rows(path: Path, variant: str, provider: str, params: BenchParams, pixels: np.ndarray,
             labels: np.ndarray, base: dict[str, Any]) -> list[dict[str, Any]]:
    gpu = provider in ("cuda", "tensorrt")
    head = Row(**base, engine="onnxruntime", provider=provider, variant=variant, batch_size=0,
               trt_fp16=params.trt_fp16 if provider == "tensorrt" else None,
               tf32=params.cuda_tf32 if provider == "cuda" else None,
               # the plugin EP, or the OpenVINO runtime where it has no device
               openvino_backend=openvino_backend()[1] if provider == "openvino" else None,
               io_binding=params.io_binding if provider != "cpu" else None)
    batches = [replace(head, batch_size=b) for b in params.batch_sizes]
    reason = unavailable_reason(provider)
    if reason is None:
        _rss_reset()
        try:
            with contextlib.ExitStack() as stack:
                log = stack.enter_context(captured_native_output()) if provider != "cpu" else []
                session, used, created_s = make_session(path, provider, params,
                                                        (1, *pixels.shape[1:]))
        except Exception as exc:
            reason = f"session creation failed: {str(exc).strip()[:300]}"
        else:
            if used != PROVIDERS[provider]:
                why = failure_reason(log)
                return [r.skipped("fallback", f"onnxruntime fell back to {used} "
                                  f"({PROVIDERS[provider]} could not start: {why}); no timings "
                                  "reported", used) for r in batches]
    if reason is not None:
        return [r.skipped("unavailable", reason) for r in batches]
    output = "probabilities"
    accuracy = _accuracy(lambda x: session.run([output], {"image": x})[0], pixels, labels,
                         max(params.batch_sizes))
    rows = []
    for r in batches:
        _rss_reset()
        batch = np.ascontiguousarray(_tile(pixels, r.batch_size))
        stats = time_runs(_ort_runner(session, provider, batch, params.io_binding, output),
                          params)
        rows.append(replace(r, provider_used=used).timed(stats, created_s, accuracy, gpu))
    return rows


def torch_rows(model_path: Path, config_path: Path, device: str, params: BenchParams,
               pixels: np.ndarray, labels: np.ndarray, base: dict[str, Any]) -> list[dict[str, Any]]:
    import torch

    batches = [Row(**base, engine="pytorch", provider=device, variant="fp32 eager",
                   batch_size=b, tf32=params.cuda_tf32 if device == "cuda" else None)
               for b in params.batch_sizes]
    if device == "cuda" and not torch.cuda.is_available():
        return [r.skipped("unavailable", "torch sees no CUDA device") for r in batches]
    from ..core.model import load_model
    from ..core.preprocess import Preprocessing
    from ..onnx.convert import deployable

    _rss_reset()
    t0 = time.perf_counter()
    classifier, config = load_model(model_path, config_path)
    model = deployable(classifier, Preprocessing.from_dict(config["preprocessing"]),
                       "uint8_nhwc").to(device)
    created_s = time.perf_counter() - t0

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), cuda_tf32(params.cuda_tf32):
            return model(torch.from_numpy(x).to(device))[0].cpu().numpy()

    accuracy = _accuracy(predict, pixels, labels, max(params.batch_sizes))
    rows = []
    for r in batches:
        _rss_reset()
        batch = torch.from_numpy(np.ascontiguousarray(_tile(pixels, r.batch_size))).to(device)

        def run() -> None:
            with torch.inference_mode(), cuda_tf32(params.cuda_tf32):
                model(batch)
            if device == "cuda":
                torch.cuda.synchronize()

        stats = time_runs(run, params)
        rows.append(replace(r, provider_used=f"torch:{device}").timed(
            stats, created_s, accuracy, device == "cuda"))
    return rows


def _tile(pixels: np.ndarray, n: int) -> np.ndarray:
    reps = -(-n // len(pixels))
    return np.concatenate([pixels] * reps)[:n]


MEASURED = ("session_create_s", "first_inference_ms", "iterations", "p50_ms", "p90_ms", "p99_ms",
            "mean_ms", "std_ms", "throughput_ips", "accuracy", "peak_rss_mb", "gpu_memory_mb")


# --------------------------------------------------------------------------- run and report


def _device_names() -> dict[str, Any]:
    names: dict[str, Any] = {"cpu": cpu_name()}
    try:
        import torch

        if torch.cuda.is_available():
            names["cuda"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    return names


def summary_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Per device, the fastest accurate ONNX row (on the CPU: onnxruntime's CPU provider or
    OpenVINO, naming the engine that ran it) against the fastest PyTorch eager row (the model
    card copies these lines)."""
    lines = []
    for device in ("cpu", "cuda"):
        torch_ok = [r for r in rows if r["engine"] == "pytorch" and r["provider"] == device
                    and r["status"] == "ok"]
        providers = ("cpu", "openvino") if device == "cpu" else ("cuda", "tensorrt")
        onnx_ok = [r for r in accurate_rows(rows) if r["provider"] in providers]
        if not torch_ok or not onnx_ok:
            lines.append(f"{device}: no comparison (accurate ONNX rows: {len(onnx_ok)}, "
                         f"PyTorch rows ok: {len(torch_ok)})")
            continue
        best = max(onnx_ok, key=lambda r: r["throughput_ips"])
        eager = max(torch_ok, key=lambda r: r["throughput_ips"])
        lines.append(f"{device}: best {best['variant']} on {engine_of(best['provider'])} "
                     f"({best['provider']}) batch {best['batch_size']} "
                     f"{best['throughput_ips']:.1f} img/s, accuracy {best['accuracy']:.4f}, vs "
                     f"best PyTorch eager (batch {eager['batch_size']}) "
                     f"{eager['throughput_ips']:.1f} img/s: "
                     f"{best['throughput_ips'] / eager['throughput_ips']:.2f}x")
    return lines


def _best_cpu_path(rows: list[dict[str, Any]], batch: int) -> dict[str, Any] | None:
    """The fastest accurate CPU engine (onnxruntime CPU or OpenVINO, any variant) at ``batch``."""
    cands = [r for r in accurate_rows(rows) if r["provider"] in ("cpu", "openvino")
             and r["batch_size"] == batch]
    return max(cands, key=lambda r: r["throughput_ips"]) if cands else None


def fastest(rows: list[dict[str, Any]], machine: dict[str, Any]) -> dict[str, Any]:
    """Per device kind, the fastest accurate engine/variant/batch for latency (batch 1) and for
    throughput, with the GFLOP/s it sustains next to the CPU's FP32 peak and matmul rate."""
    out: dict[str, Any] = {}
    gflop = machine.get("gflop_per_image")
    for kind, providers in (("cpu", ("cpu", "openvino")), ("gpu", ("cuda", "tensorrt"))):
        cands = [r for r in accurate_rows(rows) if r["provider"] in providers]
        if not cands:
            continue
        ones = [r for r in cands if r["batch_size"] == 1]
        for goal, pool, key in (("latency", ones, lambda r: -r["p50_ms"]),
                                ("throughput", cands, lambda r: r["throughput_ips"])):
            if not pool:
                continue
            r = max(pool, key=key)
            entry = {k: r[k] for k in ("provider", "variant", "batch_size", "p50_ms",
                                       "throughput_ips", "accuracy")}
            if gflop:
                entry["sustained_gflops"] = round(r["throughput_ips"] * gflop, 1)
                if kind == "cpu" and machine.get("cpu_peak_gflops"):
                    entry["share_of_fp32_peak"] = round(entry["sustained_gflops"] /
                                                        machine["cpu_peak_gflops"], 3)
            out[f"{kind}_{goal}"] = entry
    return out


def machine_figures(weights_path: Path, config_path: Path, threads: int) -> dict[str, Any]:
    """The network's work per image and this CPU's FP32 ceilings (measured and theoretical)."""
    import torch

    from ..core.compute import cpu_peak_gflops, forward_macs, matmul_gflops
    from ..core.model import load_model

    out: dict[str, Any] = {"cpu": cpu_name()}
    peak = cpu_peak_gflops(threads)
    out |= {"cpu_peak_gflops": peak["peak_gflops"], "cpu_peak_basis": peak,
            "cpu_matmul_gflops": round(matmul_gflops(), 1)}
    if weights_path.is_file() and config_path.is_file():
        model, config = load_model(weights_path, config_path)
        size = config["preprocessing"]["input_size"]
        macs = forward_macs(model, torch.zeros(1, 3, size, size))
        out["gflop_per_image"] = round(2 * macs / 1e9, 4)
    return out


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Speedups at equal batch size: ORT FP32 / eager, INT8 / FP32, TRT / CUDA FP32, ...
    A ratio whose faster side is not an accurate row (:func:`accurate_rows`) is left out:
    a speedup of a file that lost accuracy is not advertised."""
    trusted = [r for r in rows if r["engine"] == "pytorch" and r["status"] == "ok"]
    trusted += accurate_rows(rows)

    def tput(engine: str, provider: str, variant: str, b: int) -> float | None:
        for r in trusted:
            if (r["engine"], r["provider"], r["variant"], r["batch_size"]) == \
                    (engine, provider, variant, b):
                return r["throughput_ips"]
        return None

    out = {}
    for b in sorted({r["batch_size"] for r in rows}):
        best = _best_cpu_path(rows, b)
        pairs = {
            f"cpu_ort_fp32_over_eager_b{b}": (tput("onnxruntime", "cpu", "fp32", b),
                                              tput("pytorch", "cpu", "fp32 eager", b)),
            f"cpu_int8_over_fp32_b{b}": (tput("onnxruntime", "cpu", "int8", b),
                                         tput("onnxruntime", "cpu", "fp32", b)),
            f"cuda_ort_fp32_over_eager_b{b}": (tput("onnxruntime", "cuda", "fp32", b),
                                               tput("pytorch", "cuda", "fp32 eager", b)),
            f"tensorrt_fp32_over_cuda_fp32_b{b}": (tput("onnxruntime", "tensorrt", "fp32", b),
                                                   tput("onnxruntime", "cuda", "fp32", b)),
            f"openvino_fp32_over_cpu_fp32_b{b}": (tput("onnxruntime", "openvino", "fp32", b),
                                                  tput("onnxruntime", "cpu", "fp32", b)),
            f"openvino_int8_over_openvino_fp32_b{b}": (
                tput("onnxruntime", "openvino", "int8", b),
                tput("onnxruntime", "openvino", "fp32", b)),
            f"best_cpu_path_over_cpu_fp32_b{b}": (best["throughput_ips"] if best else None,
                                                  tput("onnxruntime", "cpu", "fp32", b)),
        }
        out |= {k: round(a / c, 2) for k, (a, c) in pairs.items() if a and c}
    return out


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"# Inference benchmark: {report['model']}", "",
             f"CPU: {env['cpu']} ({env['threads']} threads of {env['available_cpus']} "
             f"available); GPU: {env['devices'].get('cuda', 'none')}; onnxruntime "
             f"{env['onnxruntime']}, torch {env['torch']}, pipeline {env['pipeline']}", "",
             "| engine | provider | variant | batch | status | p50 ms | p90 ms | p99 ms | "
             "mean ± std ms | img/s | accuracy | first ms | session s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['engine']} | {r['provider']} | {r['variant']} | "
                         f"{r['batch_size']} | {r['status']}: {r['reason']} | | | | | | | | | |")
            continue
        variant = r["variant"] + (", TF32 allowed" if r.get("tf32") else "")
        lines.append(f"| {r['engine']} | {r['provider']} | {variant} | {r['batch_size']} "
                     f"| ok | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r['mean_ms']:.2f} ± {r['std_ms']:.2f} | {r['throughput_ips']:.1f} | "
                     f"{r['accuracy']:.4f} | {r['first_inference_ms']:.1f} | "
                     f"{r['session_create_s']:.2f} | {r['peak_rss_mb']} |")
    machine = report.get("machine", {})
    if report.get("fastest"):
        lines += ["", f"Fastest accurate path (accuracy within 1 point of onnxruntime CPU "
                  f"FP32) on {env['cpu']}: network {machine.get('gflop_per_image', '?')} GFLOP "
                  f"per image; CPU FP32 peak {machine.get('cpu_peak_gflops')} GFLOP/s "
                  f"(estimate: {machine.get('cpu_peak_basis', {}).get('cores')} cores x "
                  f"{machine.get('cpu_peak_basis', {}).get('clock_ghz')} GHz x "
                  f"{machine.get('cpu_peak_basis', {}).get('flop_per_cycle')} FLOP/cycle), "
                  f"measured matrix product {machine.get('cpu_matmul_gflops')} GFLOP/s", "",
                  "| goal | provider | variant | batch | p50 ms | img/s | accuracy | GFLOP/s |",
                  "|---|---|---|---|---|---|---|---|"]
        for goal, f in report["fastest"].items():
            lines.append(f"| {goal} | {f['provider']} | {f['variant']} | {f['batch_size']} | "
                         f"{f['p50_ms']:.2f} | {f['throughput_ips']:.1f} | {f['accuracy']:.4f} | "
                         f"{f.get('sustained_gflops', '')} |")
    lines += ["", "Speedups at equal batch size (throughput ratios, this run):", ""]
    lines += [f"- {k}: {v:.2f}x" for k, v in report["ratios"].items()]
    lines += ["", *[f"**{line}**" for line in report["summary"]]]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    for r in report["rows"]:
        if r["status"] == "ok":
            series.setdefault(f"{r['engine']} {r['provider']} {r['variant']}", []).append(
                (r["batch_size"], r["throughput_ips"]))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, pts in sorted(series.items()):
        ax.plot(*zip(*sorted(pts)), "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("throughput (images/s)")
    ax.set_title(f"Throughput by batch size ({report['environment']['cpu']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def headline(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The best throughput of an accurate onnxruntime row (within 1 point of CPU FP32; a fast
    but wrong engine does not count). The full table is in the report."""
    ok = [r["throughput_ips"] for r in accurate_rows(rows)]
    return {"img_s": max(ok)} if ok else {}


def paired_rows(rows: list[dict[str, Any]], params: BenchParams, model_path: Path,
                variants_dir: Path, pixels: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per batch size, the best accurate CPU path of the table (:func:`_best_cpu_path`) timed
    against onnxruntime CPU FP32 in interleaved rounds (:func:`paired_speedup`); nothing where
    that path is CPU FP32 itself, either side did not run, or ``bench.paired_rounds`` is 0."""
    out: dict[str, dict[str, Any]] = {}
    if not params.paired_rounds:
        return out
    sessions: dict[tuple[str, str], Any] = {}

    def session(provider: str, variant: str) -> Any:
        if (provider, variant) not in sessions:
            path = variant_path(model_path, variants_dir, variant)
            sessions[provider, variant] = make_session(path, provider, params,
                                                       (1, *pixels.shape[1:]))[0]
        return sessions[provider, variant]

    for b in sorted(params.batch_sizes):
        best = _best_cpu_path(rows, b)
        if best is None or (best["provider"], best["variant"]) == ("cpu", "fp32") or not any(
                (r["engine"], r["provider"], r["variant"], r["batch_size"], r["status"]) ==
                ("onnxruntime", "cpu", "fp32", b, "ok") for r in rows):
            continue
        print(f"bench: paired {best['provider']} {best['variant']} vs cpu fp32, batch {b}",
              flush=True)
        batch = np.ascontiguousarray(_tile(pixels, b))
        runs = [_ort_runner(session(provider, variant), provider, batch, False, "probabilities")
                for provider, variant in (("cpu", "fp32"), (best["provider"], best["variant"]))]
        out[f"best_cpu_path_over_cpu_fp32_b{b}"] = {
            "provider": best["provider"], "engine": engine_of(best["provider"]),
            "variant": best["variant"], "batch_size": b,
            **paired_speedup(*runs, params.paired_rounds, params.paired_block_s)}
    return out


def paired_lines(paired: dict[str, dict[str, Any]]) -> list[str]:
    return [f"cpu, paired: {p['variant']} on {p['engine']} ({p['provider']}) over onnxruntime "
            f"cpu fp32 at batch {p['batch_size']}: {p['median']:.2f}x (median of "
            f"{p['rounds']} interleaved rounds; range {p['low']:.2f}-{p['high']:.2f}x)"
            for p in paired.values()]


def variant_path(model_path: Path, variants_dir: Path, variant: str) -> Path:
    """The file timed for ``variant``: every engine gets the fixed-size network (OpenVINO and
    TensorRT ignore the shipped model's antialiased Resize), FP32 as ``model.fixed.onnx``;
    an export without it (``export.input: float32_nchw``) is timed as ``model_path``."""
    fixed = variants_dir / VARIANTS["fixed" if variant == "fp32" else variant].file
    return model_path if variant == "fp32" and not fixed.is_file() else fixed


def run(params: BenchParams, model_path: str | Path, variants_dir: str | Path,
        weights_path: str | Path, config_path: str | Path, prepared_dir: str | Path,
        out_dir: str | Path, metrics_path: str | Path | None = None) -> dict[str, Any]:
    import onnxruntime
    import torch

    from ..onnx.runner import Contract

    model_path, variants_dir, out_dir = Path(model_path), Path(variants_dir), Path(out_dir)
    threads = resolve_threads(params.threads)
    torch.set_num_threads(threads)
    if not model_path.is_file():
        raise PipelineError(f"{model_path} not found; run `pipeline export` (or dvc repro) first")
    probe = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    contract = Contract.from_session(probe, model_path)
    if contract.layout != "NHWC":
        raise PipelineError(f"{model_path}: bench expects the uint8 NHWC export "
                            "(export.input: uint8_nhwc)")
    summary, classes, rows = read_prepared(prepared_dir)
    images = PreparedImages(prepared_dir)
    test = [r for r in rows if r["split"] == "test"]
    if params.accuracy_images:
        test = test[:params.accuracy_images]
    if not test:
        raise PipelineError(f"{prepared_dir}: the test split is empty")

    pixels = np.stack([images.crop(r["path"], contract.preprocessing) for r in test])
    labels = np.array([contract.classes.index(r["label"]) for r in test])
    base = {"model": model_path.name, "threads": threads}
    report_rows: list[dict[str, Any]] = []
    for variant in params.variants:
        path = variant_path(model_path, variants_dir, variant)
        if not path.is_file():
            report_rows += [Row(**base, engine="onnxruntime", provider=p, variant=variant,
                                batch_size=b).skipped("unavailable", f"{path} not found (add "
                                                      f"{variant} to export.variants)")
                            for p in params.providers for b in params.batch_sizes]
            continue
        for provider in params.providers:
            print(f"bench: onnxruntime {provider} {variant}", flush=True)
            report_rows += ort_rows(path, variant, provider, params, pixels, labels, base)
    if params.pytorch:
        for device in ("cpu", "cuda"):
            if device == "cuda" and "cuda" not in params.providers and \
                    "tensorrt" not in params.providers:
                continue
            print(f"bench: pytorch eager {device}", flush=True)
            report_rows += torch_rows(Path(weights_path), Path(config_path), device, params,
                                      pixels, labels, base)
    report = {
        "model": str(model_path),
        "params": as_dict(params),
        "environment": {"cpu": cpu_name(), "devices": _device_names(), "threads": threads,
                        "available_cpus": available_cpus(), "os_cpu_count": os.cpu_count(),
                        "platform": platform.platform(), "python": platform.python_version(),
                        "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                        "onnxruntime_providers": onnxruntime.get_available_providers(),
                        "pipeline": __version__, "machine": machine_fingerprint()},
        "accuracy_images": len(test),
        "rows": report_rows,
    }
    report["ratios"] = ratios(report_rows)
    report["paired"] = paired_rows(report_rows, params, model_path, variants_dir, pixels)
    report["summary"] = summary_lines(report_rows) + paired_lines(report["paired"])
    report["machine"] = machine_figures(Path(weights_path), Path(config_path), threads)
    report["fastest"] = fastest(report_rows, report["machine"])
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "bench.json", report)
    if metrics_path is not None:
        write_json(metrics_path, headline(report_rows))
    write_text(out_dir / "bench.md", markdown(report))
    plot(report, out_dir / "bench.png")
    ok = [r for r in report_rows if r["status"] == "ok"]
    for r in ok:
        print(f"{r['engine']:11s} {r['provider']:8s} {r['variant']:10s} batch {r['batch_size']:3d} "
              f"p50 {r['p50_ms']:8.2f} ms  {r['throughput_ips']:8.1f} img/s  accuracy "
              f"{r['accuracy']:.4f}")
    skipped = {(r["provider"], r["status"], r["reason"]) for r in report_rows
               if r["status"] != "ok"}
    for provider, status, reason in sorted(skipped):
        print(f"{provider}: {status}: {reason}")
    for k, v in report["ratios"].items():
        print(f"{k}: {v:.2f}x")
    for line in report["summary"]:
        print(line)
    print(f"wrote {out_dir}/bench.json, bench.md, bench.png")
    return report
