"""pipeline bench: real CPU sessions on a tiny model; GPU rows are unavailable or fallback."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from pipeline.core.config import BenchParams
from pipeline.core.errors import ParamsError
from pipeline.core.params import parse_section
from pipeline.onnx.runner import OnnxClassifier
from pipeline.stages.bench import make_session, ort_rows, run

QUICK = BenchParams(batch_sizes=(1, 3), iterations=4, time_budget_s=0.3, warmup=1, threads=2,
                    paired_rounds=2, paired_block_s=0.05)


def _run(exported, tmp_path, params):
    root, _ = exported
    return run(params, root / "out" / "model.onnx", root / "out" / "variants",
               root / "model.safetensors", root / "model.json", root / "prepared",
               tmp_path / "reports")


def test_cpu_rows_are_complete_and_accuracy_is_real(exported, tmp_path):
    report = _run(exported, tmp_path, QUICK)
    rows = report["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    keys = {(r["engine"], r["provider"], r["variant"], r["batch_size"]) for r in ok}
    for variant in ("fp32", "fp16", "int8"):
        assert {("onnxruntime", "cpu", variant, 1), ("onnxruntime", "cpu", variant, 3)} <= keys
    assert {("pytorch", "cpu", "fp32 eager", 1), ("pytorch", "cpu", "fp32 eager", 3)} <= keys
    for r in ok:
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["throughput_ips"] == pytest.approx(r["batch_size"] * 1000 / r["mean_ms"],
                                                    rel=1e-3)
        assert 1 <= r["iterations"] <= 4 and r["first_inference_ms"] > 0
        assert r["peak_rss_mb"] > 0 and r["threads"] == 2
        # the provider that really ran is the row's own (CUDA rows appear on a GPU machine)
        assert r["provider_used"] in {
            "cpu": ("CPUExecutionProvider", "torch:cpu"),
            "openvino": ("OpenVINOExecutionProvider",),
            "cuda": ("CUDAExecutionProvider", "torch:cuda")}[r["provider"]]
        assert r["tf32"] is (True if r["provider"] == "cuda" else None)
    # accuracy is measured, not copied: it matches the runner on the same test images
    root, _ = exported
    runner = OnnxClassifier(root / "out" / "model.onnx")
    from pipeline.core.dataset import image_root, read_prepared

    summary, classes, manifest = read_prepared(root / "prepared")
    test = [r for r in manifest if r["split"] == "test"]
    results = runner.predict_files([image_root(root / "prepared", summary) / r["path"]
                                    for r in test], top_k=1)
    expected = np.mean([res.top[0][0] == r["label"] for res, r in zip(results, test)])
    fp32 = next(r for r in ok if (r["engine"], r["provider"], r["variant"]) ==
                ("onnxruntime", "cpu", "fp32"))
    assert fp32["accuracy"] == pytest.approx(expected)
    assert report["accuracy_images"] == len(test)
    # outputs: JSON rows, a markdown table and a PNG plot
    saved = json.loads((tmp_path / "reports" / "bench.json").read_text())
    assert saved["rows"] == rows and saved["environment"]["available_cpus"] >= 1
    table = (tmp_path / "reports" / "bench.md").read_text()
    assert "| onnxruntime | cpu | int8 | 3 | ok |" in table
    assert (tmp_path / "reports" / "bench.png").read_bytes()[:4] == b"\x89PNG"
    # the summary and the ratios name only rows within a point of FP32 (this random-init
    # fixture's INT8 may lose more: then its speedup is not advertised)
    int8 = next(r for r in ok if (r["engine"], r["provider"], r["variant"], r["batch_size"]) ==
                ("onnxruntime", "cpu", "int8", 1))
    int8_accurate = int8["accuracy"] >= fp32["accuracy"] - 0.01
    assert ("cpu_int8_over_fp32_b1" in report["ratios"]) == int8_accurate
    best = max((r for r in ok if r["engine"] == "onnxruntime"
                and r["provider"] in ("cpu", "openvino")
                and r["accuracy"] >= fp32["accuracy"] - 0.01), key=lambda r: r["throughput_ips"])
    engine = "openvino" if best["provider"] == "openvino" else "onnxruntime"
    assert report["summary"][0].startswith(
        f"cpu: best {best['variant']} on {engine} ({best['provider']}) batch "
        f"{best['batch_size']} ")
    # the best accurate CPU path, timed paired against CPU FP32 at each batch size
    for b in (1, 3):
        paired = report["paired"].get(f"best_cpu_path_over_cpu_fp32_b{b}")
        fastest_b = max((r for r in ok if r["engine"] == "onnxruntime" and r["batch_size"] == b
                         and r["provider"] in ("cpu", "openvino")
                         and r["accuracy"] >= fp32["accuracy"] - 0.01),
                        key=lambda r: r["throughput_ips"])
        if (fastest_b["provider"], fastest_b["variant"]) == ("cpu", "fp32"):
            assert paired is None
        else:
            assert (paired["provider"], paired["variant"]) == (fastest_b["provider"],
                                                               fastest_b["variant"])
            assert paired["rounds"] == QUICK.paired_rounds and paired["median"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_gpu_rows_say_why_and_never_carry_cpu_numbers(exported, tmp_path):
    report = _run(exported, tmp_path, BenchParams(
        providers=("cuda", "tensorrt"), variants=("fp32",), batch_sizes=(1,), iterations=2,
        time_budget_s=0.2, warmup=0, threads=2))
    gpu = [r for r in report["rows"] if r["provider"] in ("cuda", "tensorrt")]
    assert len(gpu) == 3  # cuda, tensorrt, pytorch cuda
    for r in gpu:
        assert r["status"] in ("unavailable", "fallback") and r["reason"]
        assert "p50_ms" not in r and "throughput_ips" not in r
    assert "no comparison" in report["summary"][1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_fallback_is_detected_on_a_real_session(exported):
    """onnxruntime-gpu lists CUDA here but cannot start it without a GPU: a real session
    silently runs on CPU; the row must say fallback, not report CPU timings as CUDA."""
    root, _ = exported
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider: rows say unavailable")
    path = root / "out" / "model.onnx"
    session, used, _ = make_session(path, "cuda", QUICK, (1, 160, 160, 3))
    assert used == "CPUExecutionProvider"
    assert session.run(None, {"image": np.zeros((1, 160, 160, 3), np.uint8)})[0].shape == (1, 10)
    rows = ort_rows(path, "fp32", "cuda", QUICK, np.zeros((2, 160, 160, 3), np.uint8),
                    np.zeros(2, np.int64), {"model": "model.onnx", "threads": 2})
    assert [r["status"] for r in rows] == ["fallback", "fallback"]
    assert all(r["provider_used"] == "CPUExecutionProvider" for r in rows)
    assert "could not start" in rows[0]["reason"]


def test_missing_variant_is_reported_not_dropped(exported, tmp_path):
    root, _ = exported
    report = run(BenchParams(providers=("cpu",), variants=("fp32", "int8"), batch_sizes=(1,),
                             iterations=2, time_budget_s=0.1, warmup=0, pytorch=False,
                             threads=2),
                 root / "out" / "model.onnx", tmp_path / "no_variants", root / "model.safetensors",
                 root / "model.json", root / "prepared", tmp_path / "reports")
    int8 = [r for r in report["rows"] if r["variant"] == "int8"]
    assert int8 and all(r["status"] == "unavailable" and "not found" in r["reason"]
                        for r in int8)


def test_bench_params_are_checked():
    with pytest.raises(ParamsError, match=r"bench.providers\[0\] must be one of"):
        parse_section(BenchParams, {"providers": ["rocm"]}, "bench")
    with pytest.raises(ParamsError, match="bench.batch_sizes"):
        parse_section(BenchParams, {"batch_sizes": []}, "bench")


@pytest.mark.gpu
def test_cuda_rows_run_on_the_gpu(exported, tmp_path):
    report = _run(exported, tmp_path, BenchParams(
        providers=("cpu", "cuda"), variants=("fp32", "fp16"), batch_sizes=(1, 4), iterations=5,
        time_budget_s=0.5, warmup=1))
    cuda = [r for r in report["rows"] if r["provider"] == "cuda"]
    assert cuda and all(r["status"] == "ok" for r in cuda), [r.get("reason") for r in cuda]
    assert {r["provider_used"] for r in cuda} == {"CUDAExecutionProvider", "torch:cuda"}
    fp32_cpu = next(r for r in report["rows"] if (r["engine"], r["provider"], r["variant"]) ==
                    ("onnxruntime", "cpu", "fp32"))
    fp32_cuda = next(r for r in cuda if (r["engine"], r["variant"]) == ("onnxruntime", "fp32"))
    assert fp32_cuda["accuracy"] == pytest.approx(fp32_cpu["accuracy"], abs=0.05)
    assert fp32_cuda["gpu_memory_mb"] > 0
    assert all(r["tf32"] is True for r in cuda)
    # strict FP32 on the GPU: same accuracy as the CPU, and the row says which math it was
    strict = _run(exported, tmp_path / "strict", BenchParams(
        providers=("cuda",), variants=("fp32",), batch_sizes=(4,), iterations=3,
        time_budget_s=0.3, warmup=1, cuda_tf32=False))
    strict_cuda = [r for r in strict["rows"] if r["provider"] == "cuda"]
    assert len(strict_cuda) == 2  # onnxruntime and PyTorch
    assert all(r["status"] == "ok" and r["tf32"] is False for r in strict_cuda)
    assert all(r["accuracy"] == fp32_cpu["accuracy"] for r in strict_cuda)


def test_cuda_options_carry_the_tf32_choice(tmp_path):
    from pipeline.stages.bench import markdown, provider_options

    assert provider_options("cuda", QUICK, (1, 8, 8, 3), tmp_path)["use_tf32"] == "1"
    strict = BenchParams(cuda_tf32=False)
    assert provider_options("cuda", strict, (1, 8, 8, 3), tmp_path)["use_tf32"] == "0"
    row = {"engine": "onnxruntime", "provider": "cuda", "variant": "fp32", "batch_size": 8,
           "status": "ok", "p50_ms": 1.0, "p90_ms": 1.0, "p99_ms": 1.0, "mean_ms": 1.0,
           "std_ms": 0.0, "throughput_ips": 8000.0, "accuracy": 0.99, "first_inference_ms": 9.0,
           "session_create_s": 0.5, "peak_rss_mb": 100, "tf32": True}
    report = {"model": "m.onnx", "rows": [row, {**row, "tf32": False}], "ratios": {},
              "summary": [], "environment": {"cpu": "x", "threads": 2, "available_cpus": 2,
                                             "devices": {}, "onnxruntime": "1", "torch": "2",
                                             "pipeline": "0"}}
    table = markdown(report)
    assert "| onnxruntime | cuda | fp32, TF32 allowed | 8 | ok |" in table
    assert "| onnxruntime | cuda | fp32 | 8 | ok |" in table


def test_openvino_rows_run_through_the_plugin_or_say_why_not(exported, tmp_path):
    """OpenVINO is an onnxruntime plugin EP: its rows time the fixed-size files with the same
    accuracy column, or are 'unavailable' with the install command."""
    from pipeline.onnx.sessions import unavailable_reason

    report = _run(exported, tmp_path, QUICK)
    rows = [r for r in report["rows"] if r["provider"] == "openvino"]
    assert {r["variant"] for r in rows} == {"fp32", "fp16", "int8", "int8_openvino"}
    reason = unavailable_reason("openvino")
    if reason is not None:
        assert all(r["status"] == "unavailable" and r["reason"] == reason
                   and "pip install openvino" in reason for r in rows)
        return
    ok = {(r["variant"], r["batch_size"]): r for r in rows if r["status"] == "ok"}
    assert set(ok) == {(v, b) for v in ("fp32", "fp16", "int8", "int8_openvino") for b in (1, 3)}
    cpu = {(r["variant"], r["batch_size"]): r for r in report["rows"]
           if r["provider"] == "cpu" and r["engine"] == "onnxruntime"}
    # same file, same images: FP32 accuracy equal to onnxruntime CPU's within one image
    n = report["accuracy_images"]
    assert abs(ok["fp32", 1]["accuracy"] - cpu["fp32", 1]["accuracy"]) <= 1 / n + 1e-9
    assert ok["int8", 3]["provider_used"] == "OpenVINOExecutionProvider"
    assert "openvino_fp32_over_cpu_fp32_b1" in report["ratios"]
    fastest = report["fastest"]["cpu_throughput"]
    assert fastest["provider"] in ("cpu", "openvino") and fastest["sustained_gflops"] > 0
    assert report["machine"]["gflop_per_image"] > 0 and report["machine"]["cpu_matmul_gflops"] > 0


# --------------------------------------------------------------------------- the accuracy rule


def _row(engine, provider, variant, batch, ips, accuracy, status="ok"):
    """A row as ``bench.json`` gives it back: its strings are not the interned literals of
    the code, so an ``is`` comparison in place of ``==`` fails as it would on real reports."""
    return json.loads(json.dumps({
        "engine": engine, "provider": provider, "variant": variant, "batch_size": batch,
        "throughput_ips": ips, "accuracy": accuracy, "status": status, "p50_ms": 1000 / ips}))


LOSSY = [  # OpenVINO INT8 is the fastest row by far but 4.5 points less accurate
    _row("onnxruntime", "cpu", "fp32", 32, 160.0, 0.9963),
    _row("onnxruntime", "cpu", "int8", 32, 301.0, 0.9888),
    _row("onnxruntime", "openvino", "fp32", 32, 139.0, 0.9963),
    _row("onnxruntime", "openvino", "int8", 32, 449.0, 0.9517),
    _row("pytorch", "cpu", "fp32 eager", 32, 45.0, 0.9963),
]


def test_the_summary_ratios_headline_and_fastest_path_never_advertise_an_inaccurate_file():
    from pipeline.stages.bench import fastest, headline, ratios, summary_lines

    lines = summary_lines(LOSSY)
    assert lines[0] == ("cpu: best int8 on onnxruntime (cpu) batch 32 301.0 img/s, accuracy "
                        "0.9888, vs best PyTorch eager (batch 32) 45.0 img/s: 6.69x")
    # an accurate OpenVINO file is the CPU's best path, and the line names its engine
    made_for_openvino = LOSSY + [_row("onnxruntime", "openvino", "int8_openvino", 32, 420.0,
                                      0.9926)]
    assert summary_lines(made_for_openvino)[0] == (
        "cpu: best int8_openvino on openvino (openvino) batch 32 420.0 img/s, accuracy 0.9926, "
        "vs best PyTorch eager (batch 32) 45.0 img/s: 9.33x")
    assert headline(made_for_openvino) == {"img_s": 420.0}
    assert headline(LOSSY) == {"img_s": 301.0}
    assert fastest(LOSSY, {})["cpu_throughput"]["variant"] == "int8"
    assert fastest(LOSSY, {})["cpu_throughput"]["provider"] == "cpu"
    r = ratios(LOSSY)
    assert "openvino_int8_over_openvino_fp32_b32" not in r  # 3.23x of a file 4.5 points off
    assert r["best_cpu_path_over_cpu_fp32_b32"] == 1.88 and r["cpu_int8_over_fp32_b32"] == 1.88
    assert r["cpu_ort_fp32_over_eager_b32"] == 3.56


def test_without_a_cpu_fp32_row_the_reference_is_pytorch_and_without_either_nothing_counts():
    from pipeline.onnx.sessions import accurate_rows, reference_accuracy
    from pipeline.stages.bench import headline, summary_lines

    no_cpu = [r for r in LOSSY if r["provider"] != "cpu" or r["engine"] == "pytorch"]
    assert reference_accuracy(no_cpu) == 0.9963
    assert [r["variant"] for r in accurate_rows(no_cpu)] == ["fp32"]
    assert headline(no_cpu) == {"img_s": 139.0}
    openvino_only = [r for r in LOSSY if r["provider"] == "openvino"]
    assert reference_accuracy(openvino_only) is None
    assert accurate_rows(openvino_only) == [] and headline(openvino_only) == {}
    assert summary_lines(openvino_only)[0].startswith("cpu: no comparison (accurate "
                                                      "ONNX rows: 0")
    # the limit is inclusive, and a failed row never counts whatever its accuracy
    edge = [_row("onnxruntime", "cpu", "fp32", 1, 10.0, 0.90),
            _row("onnxruntime", "cpu", "int8", 1, 20.0, 0.89),
            _row("onnxruntime", "cpu", "fp16", 1, 30.0, 0.8899),
            _row("onnxruntime", "cuda", "fp32", 1, 90.0, 0.90, "fallback")]
    assert [r["variant"] for r in accurate_rows(edge)] == ["fp32", "int8"]


def test_the_report_records_the_machine_it_was_measured_on(exported, tmp_path):
    from pipeline.core.runtime import machine_fingerprint

    report = _run(exported, tmp_path, BenchParams(
        providers=("cpu",), variants=("fp32",), batch_sizes=(1,), iterations=2,
        time_budget_s=0.2, warmup=0, threads=2, pytorch=False))
    assert report["environment"]["machine"] == machine_fingerprint()
    assert report["rows"][0]["openvino_backend"] is None


def test_the_fastest_path_is_the_lowest_latency_at_batch_one_and_names_its_arithmetic():
    """Latency: the accurate batch-1 row with the lowest p50 (not the highest); throughput:
    the most img/s at any batch; GFLOP/s = img/s x GFLOP per image, as a share of the peak."""
    from pipeline.stages.bench import fastest, ratios

    rows = [_row("onnxruntime", "cpu", "fp32", 1, 100.0, 0.99),
            _row("onnxruntime", "cpu", "int8", 1, 200.0, 0.985),
            _row("onnxruntime", "openvino", "fp32", 1, 150.0, 0.99),
            _row("onnxruntime", "cpu", "int8", 8, 400.0, 0.985),
            _row("onnxruntime", "cpu", "fp32", 8, 120.0, 0.99)]
    rows[2]["p50_ms"] = 9.0  # slower per image than its img/s suggests: p50 decides latency
    out = fastest(rows, {"gflop_per_image": 0.5, "cpu_peak_gflops": 300.0})
    assert (out["cpu_latency"]["variant"], out["cpu_latency"]["p50_ms"]) == ("int8", 5.0)
    assert out["cpu_throughput"]["batch_size"] == 8
    assert out["cpu_throughput"]["sustained_gflops"] == 200.0
    assert out["cpu_throughput"]["share_of_fp32_peak"] == 0.667
    assert "gpu_latency" not in out and "sustained_gflops" not in fastest(rows, {})["cpu_latency"]
    # the best CPU path at a batch size is compared at that size, not with other sizes' rows
    r = ratios(rows + [_row("onnxruntime", "openvino", "fp16", 1, 900.0, 0.99)])
    assert r["best_cpu_path_over_cpu_fp32_b1"] == 9.0
    assert r["best_cpu_path_over_cpu_fp32_b8"] == round(400 / 120, 2)


def test_without_batch_one_rows_the_throughput_path_is_still_named_and_gpus_stay_apart():
    from pipeline.stages.bench import fastest, ratios

    rows = [_row("onnxruntime", "cpu", "fp32", 8, 100.0, 0.99),
            _row("onnxruntime", "cpu", "int8", 8, 150.0, 0.99),
            _row("onnxruntime", "cuda", "fp32", 8, 9000.0, 0.99),
            _row("onnxruntime", "cuda", "fp32", 1, 5000.0, 0.99),
            _row("onnxruntime", "cpu", "fp32", 1, 90.0, 0.99)]
    out = fastest(rows[:3], {})
    assert "cpu_latency" not in out and out["cpu_throughput"]["variant"] == "int8"
    assert out["gpu_throughput"]["provider"] == "cuda"
    r = ratios(rows)  # a GPU row is never the best CPU path
    assert r["best_cpu_path_over_cpu_fp32_b8"] == 1.5 and r["best_cpu_path_over_cpu_fp32_b1"] == 1.0
    # batch sizes past CPython's small-int cache are compared by value, as read from JSON
    big = ratios([_row("onnxruntime", "cpu", "fp32", 512, 100.0, 0.99),
                  _row("onnxruntime", "cpu", "int8", 512, 150.0, 0.99)])
    assert big["best_cpu_path_over_cpu_fp32_b512"] == 1.5
    # a machine with no accurate CPU row still names its GPU path
    gpu_only = fastest([_row("pytorch", "cpu", "fp32 eager", 8, 40.0, 0.99), rows[2]], {})
    assert list(gpu_only) == ["gpu_throughput"]
    assert gpu_only["gpu_throughput"]["throughput_ips"] == 9000.0


def test_a_device_whose_pytorch_rows_did_not_run_has_no_comparison():
    from pipeline.stages.bench import summary_lines

    rows = LOSSY + [_row("onnxruntime", "cuda", "fp32", 32, 9000.0, 0.9963),
                    {"engine": "pytorch", "provider": "cuda", "variant": "fp32 eager",
                     "batch_size": 32, "status": "unavailable",
                     "reason": "torch sees no CUDA device"}]
    lines = summary_lines(rows)
    assert lines[1] == ("cuda: no comparison (accurate ONNX rows: 1, PyTorch rows ok: 0)")


# --------------------------------------------------------------------------- paired timing


class FakeClock:
    """A clock that only moves when a fake session runs: each run costs its own seconds."""

    def __init__(self):
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def runner(self, name: str, costs: list[float]):
        def run():
            self.calls.append(name)
            self.now += costs[min(len([c for c in self.calls if c == name]), len(costs)) - 1]
        return run


def test_paired_speedup_is_the_median_of_interleaved_rounds_of_median_latencies():
    from pipeline.stages.bench import paired_speedup

    clock = FakeClock()
    # the baseline costs 2 s a run, the candidate 1 s, but the candidate's first runs are
    # slow (its warm-up): a round's median latency ignores them, the warm-up run takes them
    baseline = clock.runner("a", [2.0])
    candidate = clock.runner("b", [9.0, 1.0])
    out = paired_speedup(baseline, candidate, rounds=4, block_s=3.0, clock=clock)
    assert out["rounds"] == 4 and out["speedups"] == [2.0] * 4
    assert out["median"] == out["low"] == out["high"] == 2.0
    # one warm-up run each, then blocks alternate: AB, BA, AB, BA (each block runs until
    # block_s has passed: 2 runs of 2 s, 3 runs of 1 s)
    blocks = "".join(clock.calls[2:])
    assert clock.calls[:2] == ["a", "b"]
    assert blocks == "aa" + "bbb" + "bbb" + "aa" + "aa" + "bbb" + "bbb" + "aa"


def test_paired_speedup_reports_the_median_and_the_range_over_rounds():
    from pipeline.stages.bench import paired_speedup

    clock = FakeClock()
    # the machine slows down for the second and third rounds; the speedup stays 3x in all
    # but one round, where the candidate alone was slowed
    costs_a = [3.0] + [3.0] * 2 + [6.0] * 4 + [3.0] * 10
    costs_b = [1.0] + [1.0] * 4 + [2.0] * 4 + [3.0] * 4 + [1.0] * 10
    out = paired_speedup(clock.runner("a", costs_a), clock.runner("b", costs_b), rounds=5,
                         block_s=3.5, clock=clock)
    assert len(out["speedups"]) == 5
    assert out["median"] == float(np.median(out["speedups"]))
    assert out["low"] == min(out["speedups"]) and out["high"] == max(out["speedups"])
    assert out["low"] < out["median"]


def test_the_best_cpu_path_is_timed_paired_against_cpu_fp32(exported, tmp_path):
    from pipeline.stages.bench import paired_lines, paired_rows

    root, _ = exported
    model, variants = root / "out" / "model.onnx", root / "out" / "variants"
    pixels = np.random.default_rng(0).integers(0, 256, (3, 160, 160, 3), dtype=np.uint8)
    params = BenchParams(batch_sizes=(1, 3), paired_rounds=3, paired_block_s=0.05, threads=2)
    rows = [_row("onnxruntime", "cpu", "fp32", 1, 100.0, 0.99),
            _row("onnxruntime", "cpu", "int8", 1, 150.0, 0.99),
            _row("onnxruntime", "cpu", "fp32", 3, 100.0, 0.99),
            _row("onnxruntime", "cpu", "int8", 3, 90.0, 0.99)]
    out = paired_rows(rows, params, model, variants, pixels)
    # batch 3's best path is CPU FP32 itself: nothing to pair
    assert list(out) == ["best_cpu_path_over_cpu_fp32_b1"]
    p = out["best_cpu_path_over_cpu_fp32_b1"]
    assert (p["provider"], p["engine"], p["variant"], p["batch_size"], p["rounds"]) == \
        ("cpu", "onnxruntime", "int8", 1, 3)
    assert len(p["speedups"]) == 3 and p["low"] <= p["median"] <= p["high"] and p["low"] > 0
    assert paired_lines(out) == [
        f"cpu, paired: int8 on onnxruntime (cpu) over onnxruntime cpu fp32 at batch 1: "
        f"{p['median']:.2f}x (median of 3 interleaved rounds; range {p['low']:.2f}-"
        f"{p['high']:.2f}x)"]
    # any other file is paired, one that sorts before "fp32" too
    fp16 = [rows[0], _row("onnxruntime", "cpu", "fp16", 1, 120.0, 0.99)]
    assert paired_rows(fp16, params, model, variants, pixels)[
        "best_cpu_path_over_cpu_fp32_b1"]["variant"] == "fp16"
    # off, or no CPU FP32 row that ran at that batch size: nothing
    assert paired_rows(rows, BenchParams(paired_rounds=0, batch_sizes=(1,)), model, variants,
                       pixels) == {}
    no_fp32 = [rows[1], {**rows[0], "status": "fallback"}]
    assert paired_rows(no_fp32, params, model, variants, pixels) == {}
    # an inaccurate faster file is never paired: the best accurate path is FP32 itself
    lossy = [rows[0], _row("onnxruntime", "cpu", "int8", 1, 150.0, 0.97)]
    assert paired_rows(lossy, params, model, variants, pixels) == {}
