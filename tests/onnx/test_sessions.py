"""Engines: the provider table, OpenVINO through the plugin EP, and `--providers auto`."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.core.errors import PipelineError
from pipeline.onnx import openvino_runtime, sessions
from pipeline.onnx.runner import ModelError, OnnxClassifier

OPENVINO = sessions.unavailable_reason("openvino")
OV_RUNTIME = openvino_runtime.cpu_available()


def report(tmp_path, rows):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"rows": rows}))
    return path


def row(provider, variant, batch, ips, accuracy, status="ok"):
    return {"engine": "onnxruntime", "provider": provider, "variant": variant,
            "batch_size": batch, "throughput_ips": ips, "accuracy": accuracy, "status": status}


@pytest.fixture
def everything_available(monkeypatch):
    monkeypatch.setattr(sessions, "unavailable_reason", lambda name: None)


def test_auto_picks_the_fastest_accurate_engine_for_this_kind_of_file(tmp_path,
                                                                      everything_available):
    from pipeline.core.runtime import machine_fingerprint

    bench = _here(tmp_path / "bench.json", [
        row("cpu", "fp32", 32, 150, 0.99), row("openvino", "fp32", 32, 300, 0.99),
        row("cpu", "int8", 32, 200, 0.985), row("openvino", "int8", 32, 420, 0.97),  # too lossy
        row("openvino", "int8", 1, 350, 0.985), row("cuda", "fp32", 32, 900, 0.99, "fallback"),
    ], machine_fingerprint())
    assert sessions.auto_provider(False, "int8", bench)[0] == "openvino"
    name, why = sessions.auto_provider(False, "fp32", bench)
    assert name == "openvino" and "300 img/s" in why
    # the raw-pixel model needs antialiased Resize: OpenVINO is never picked for it
    assert sessions.auto_provider(True, "fp32", bench)[0] == "cpu"


def test_auto_offers_a_file_only_to_the_engines_its_export_passed(tmp_path,
                                                                  everything_available):
    """The INT8 file made for OpenVINO is fastest there; onnxruntime's own INT8 file is
    faster in OpenVINO too but was refused there: each goes only to the engines it lists."""
    from pipeline.core.runtime import machine_fingerprint

    bench = _here(tmp_path / "bench.json", [
        row("cpu", "fp32", 32, 150, 0.99),
        row("cpu", "int8", 32, 200, 0.985), row("openvino", "int8", 32, 450, 0.985),
        row("cpu", "int8_openvino", 32, 40, 0.99), row("openvino", "int8_openvino", 32, 400, 0.985),
    ], machine_fingerprint())
    assert sessions.auto_provider(False, "int8_openvino", bench, engines=["openvino"])[0] == \
        "openvino"
    assert sessions.auto_provider(False, "int8", bench, engines=["onnxruntime"])[0] == "cpu"
    assert sessions.auto_provider(False, "int8", bench)[0] == "openvino"  # older files: both
    name, why = sessions.auto_provider(False, "int8_openvino", bench, engines=["onnxruntime"])
    assert name == "cpu" and "40 img/s" in why
    # equal speed: the row measured at the smaller batch wins (it also serves single images)
    tie = _here(tmp_path / "tie.json", [
        row("cpu", "fp32", 32, 150, 0.99), row("openvino", "int8", 32, 300, 0.985),
        row("cpu", "int8", 1, 300, 0.985)], machine_fingerprint())
    name, why = sessions.auto_provider(False, "int8", tie)
    assert name == "cpu" and "at batch 1" in why


def test_auto_without_a_report_uses_the_fixed_order(tmp_path, monkeypatch):
    monkeypatch.setattr(sessions, "unavailable_reason",
                        lambda name: None if name in ("cpu", "openvino") else "absent")
    assert sessions.auto_provider(False, "fp32", tmp_path / "missing.json")[0] == "openvino"
    assert sessions.auto_provider(True, "fp32", None)[0] == "cpu"


def test_unknown_and_unavailable_providers_are_one_line_errors(monkeypatch):
    with pytest.raises(PipelineError, match="unknown provider 'gpu'; choose from auto, cpu"):
        sessions.resolve_providers(["gpu"])
    monkeypatch.setattr(sessions, "unavailable_reason",
                        lambda name: None if name == "cpu" else f"no {name} here")
    assert sessions.resolve_providers(["tensorrt", "cpu"]) == ["cpu"]
    with pytest.raises(PipelineError, match="openvino: no openvino here"):
        sessions.resolve_providers(["openvino"])


def test_tensorrt_without_its_libraries_says_which_packages_bring_them(tmp_path, monkeypatch):
    """A GPU build of onnxruntime lists the TensorRT provider whether or not TensorRT is
    installed; the reason names the library and NVIDIA's index, and the wheel's folder is
    searched (a stand-in shared object there is found and loaded)."""
    import sys

    import _ctypes
    import onnxruntime as ort

    listed = ort.get_available_providers() + ["TensorrtExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: listed)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "tensorrt" not in p])
    sessions.tensorrt_library.cache_clear()
    try:
        reason = sessions.unavailable_reason("tensorrt")
        if sessions.tensorrt_library() is None:  # TensorRT really absent (every CI machine)
            assert reason.startswith("libnvinfer.so.10 not found: install TensorRT 10 from")
            assert "https://pypi.nvidia.com tensorrt-cu12-libs" in reason
        wheel = tmp_path / "site" / "tensorrt_libs"
        wheel.mkdir(parents=True)
        (wheel / "__init__.py").write_text("")
        shutil.copy(_ctypes.__file__, wheel / "libnvinfer.so.10")
        monkeypatch.syspath_prepend(str(tmp_path / "site"))
        sessions.tensorrt_library.cache_clear()
        assert sessions.tensorrt_library() == str(wheel / "libnvinfer.so.10")
        assert sessions.unavailable_reason("tensorrt") is None
    finally:
        sessions.tensorrt_library.cache_clear()


@pytest.mark.skipif(OPENVINO is not None, reason=f"OpenVINO unavailable: {OPENVINO}")
def test_openvino_runs_the_fixed_variant_and_refuses_the_raw_model(exported):
    root, _ = exported
    fixed = root / "out" / "variants" / "model.fixed.onnx"
    ov = OnnxClassifier(fixed, ["openvino", "cpu"])
    cpu = OnnxClassifier(fixed, ["cpu"])
    assert ov.provider == "OpenVINOExecutionProvider"
    from pipeline.core.dataset import image_root, read_prepared

    summary, _, rows = read_prepared(root / "prepared")
    paths = [image_root(root / "prepared", summary) / r["path"] for r in rows
             if r["split"] == "test"]
    ours = [r.top for r in ov.predict_files(paths, top_k=3)]
    theirs = [r.top for r in cpu.predict_files(paths, top_k=3)]
    # OpenVINO's CPU kernels round differently (measured: 2e-3 at most on this model)
    assert [t[0][0] for t in ours] == [t[0][0] for t in theirs]
    assert max(abs(a[0][1] - b[0][1]) for a, b in zip(ours, theirs)) < 1e-2
    with pytest.raises(ModelError, match="use the fixed-size variant"):
        OnnxClassifier(root / "out" / "model.onnx", ["openvino"])


def test_the_runner_resolves_auto_and_says_why(exported, tmp_path, monkeypatch):
    root, _ = exported
    monkeypatch.setattr(sessions, "unavailable_reason",
                        lambda name: None if name == "cpu" else "absent")
    runner = OnnxClassifier(root / "out" / "model.onnx", ["auto"], bench_report=None)
    assert runner.requested == ["cpu"] and "fixed order" in runner.chosen_why


def test_openvino_falls_back_to_its_runtime_where_the_plugin_lists_no_device(monkeypatch):
    """onnxruntime-ep-openvino offers Intel hardware only; on other CPUs (AMD) the openvino
    provider uses the OpenVINO runtime directly, and says so."""
    monkeypatch.setattr(sessions, "openvino_device", lambda: (None, "no Intel device"))
    sessions.openvino_backend.cache_clear()
    try:
        backend, why = sessions.openvino_backend()
        if openvino_runtime.cpu_available() is None:
            assert backend == "runtime" and "no Intel device" in why and "runtime" in why
            assert sessions.unavailable_reason("openvino") is None
        else:
            assert backend is None and why.startswith("no Intel device; ")
            assert sessions.unavailable_reason("openvino") == why
        monkeypatch.setattr(openvino_runtime, "cpu_available", lambda: "no runtime here")
        sessions.openvino_backend.cache_clear()
        assert sessions.openvino_backend() == (None, "no Intel device; no runtime here")
        with pytest.raises(PipelineError, match="openvino: no Intel device; no runtime here"):
            sessions.new_session("m.onnx", ["openvino", "cpu"], sessions.session_options(1))
    finally:
        sessions.openvino_backend.cache_clear()


OV_VS_ORT = """
import sys
import numpy as np
import onnxruntime as ort
from pipeline.onnx.openvino_runtime import OpenVinoSession

for path in sys.argv[1:]:
    ov = OpenVinoSession(path, threads=1)
    cpu = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in ov.get_inputs()] == \\
        [(i.name, i.type) for i in cpu.get_inputs()]
    assert [o.name for o in ov.get_outputs()] == [o.name for o in cpu.get_outputs()]
    assert ov.get_inputs()[0].shape[1:] == cpu.get_inputs()[0].shape[1:]
    assert not isinstance(ov.get_inputs()[0].shape[0], int)  # dynamic batch stays dynamic
    assert ov.get_modelmeta().custom_metadata_map == \\
        dict(cpu.get_modelmeta().custom_metadata_map)
    size = cpu.get_inputs()[0].shape[1]
    x = np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    p_ov, = ov.run(["probabilities"], {"image": x})
    p_cpu, = cpu.run(["probabilities"], {"image": x})
    # the INT8 file quantises its softmax output too (steps of 1/255)
    assert p_ov.shape == p_cpu.shape
    assert np.allclose(p_ov.sum(1), 1, atol=1e-4 if "fixed" in path else 2e-2)
    assert float(np.abs(p_ov - p_cpu).max()) < (1e-3 if "fixed" in path else 5e-2)
    both = ov.run(None, {"image": x[:1]})
    assert len(both) == len(cpu.get_outputs()) and both[0].shape[0] == 1
print("ok")
"""


@pytest.mark.skipif(OV_RUNTIME is not None, reason=f"OpenVINO runtime unavailable: {OV_RUNTIME}")
def test_the_openvino_runtime_session_answers_like_onnxruntime(exported):
    """In a process of its own: with the OpenVINO runtime, torch and the test fixtures in one
    pytest process, the next subprocess start crashed the interpreter (SIGSEGV, AMD EPYC;
    not understood yet). The bench stage ran its OpenVINO rows in-process without it."""
    import subprocess
    import sys

    root, _ = exported
    paths = [str(root / "out" / "variants" / n) for n in ("model.fixed.onnx", "model.int8.onnx")]
    child = subprocess.run([sys.executable, "-c", OV_VS_ORT, *paths], capture_output=True,
                           text=True)
    assert child.returncode == 0 and child.stdout.strip() == "ok", child.stderr[-3000:]


def _here(path, rows, machine):
    path.write_text(json.dumps({"rows": rows, "environment": {"machine": machine}}))
    return path


def test_auto_ignores_a_bench_report_from_another_machine(tmp_path, everything_available):
    from pipeline.core.runtime import machine_fingerprint

    rows = [row("cpu", "fp32", 32, 150, 0.99), row("openvino", "fp32", 32, 300, 0.99),
            row("cuda", "fp32", 32, 900, 0.99)]
    here = machine_fingerprint()
    bench = _here(tmp_path / "bench.json", rows, here)
    assert sessions.auto_provider(False, "fp32", bench)[0] == "cuda"
    other = _here(tmp_path / "other.json", rows, {**here, "cpu": "Some Other CPU", "id": "0" * 16})
    name, why = sessions.auto_provider(False, "fp32", other)
    assert name == "cuda" and "measured on another machine (Some Other CPU" in why
    assert "fixed order" in why
    # a report that records no machine (older versions) is not trusted either
    assert "another machine" in sessions.auto_provider(False, "fp32", report(tmp_path, rows))[1]


def test_auto_does_not_pick_a_lossy_engine_when_the_report_lacks_a_cpu_fp32_row(
        tmp_path, everything_available):
    from pipeline.core.runtime import machine_fingerprint

    rows = [row("openvino", "int8", 32, 449, 0.9517), row("cpu", "int8", 32, 301, 0.9888)]
    bench = _here(tmp_path / "bench.json", rows, machine_fingerprint())
    name, why = sessions.auto_provider(False, "int8", bench)
    assert "fixed order" in why  # nothing to judge the rows against: the report is not used
    rows.append({"engine": "pytorch", "provider": "cpu", "variant": "fp32 eager",
                 "batch_size": 32, "throughput_ips": 45, "accuracy": 0.9963, "status": "ok"})
    bench = _here(tmp_path / "bench.json", rows, machine_fingerprint())
    assert sessions.auto_provider(False, "int8", bench)[0] == "cpu"



def test_openvino_runs_alone_or_not_at_all(everything_available):
    """The plugin EP cannot share a session: first, it gets CPU as its only fallback;
    anywhere else, it is dropped and the others keep their order."""
    assert sessions.resolve_providers(["openvino", "cuda", "cpu"]) == ["openvino", "cpu"]
    assert sessions.resolve_providers(["cuda", "openvino", "cpu"]) == ["cuda", "cpu"]
    assert sessions.resolve_providers(["tensorrt", "openvino", "cpu"]) == ["tensorrt", "cpu"]
    assert sessions.resolve_providers(["cpu", "openvino"]) == ["cpu"]


def test_only_onnxruntime_rows_that_ran_are_ever_accurate():
    rows = [row("cpu", "fp32", 8, 100, 0.99), row("cpu", "fp32", 1, 50, 0.50, "fallback"),
            {"engine": "pytorch", "provider": "cpu", "variant": "fp32 eager", "batch_size": 8,
             "throughput_ips": 900, "accuracy": 0.99, "status": "ok"}]
    assert sessions.reference_accuracy(rows) == 0.99
    assert sessions.accurate_rows(rows) == [rows[0]]
    assert sessions.reference_accuracy([rows[1]]) is None
