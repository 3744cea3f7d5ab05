"""Export + runner: round trip, dynamic batch, metadata, variants, bad models, bad images."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from PIL import Image


from pipeline.cli import main
from pipeline.core.config import ExportParams
from pipeline.core.copies import PreparedImages
from pipeline.core.dataset import image_root, read_prepared
from pipeline.core.errors import PipelineError
from pipeline.core.model import load_model
from pipeline.core.preprocess import Preprocessing, resize_and_crop
from pipeline.onnx.runner import ModelError, OnnxClassifier
from pipeline.stages.export import run

from ..conftest import REPO, make_image, original_pixels


def test_export_checks_pass_and_are_recorded(exported):
    root, report = exported
    assert json.loads((root / "export.json").read_text()) == report
    fp32, fp16, int8 = (report["variants"][v] for v in ("fp32", "fp16", "int8"))
    assert fp32["max_abs_diff_probabilities"] <= 1e-4 and fp32["max_abs_diff_logits"] <= 1e-4
    assert fp32["top1_agreement"] == 1.0 and fp32["passed"]
    # the fixture beats chance (0.1) by far, so these agreements mean something
    assert report["test_images"] == 40 and report["pytorch_test_accuracy"] >= 0.5
    assert fp16["top1_agreement"] >= 0.995 and int8["accuracy_drop_vs_fp32"] <= 0.05
    assert int8["top1_agreement"] >= 0.9
    assert (root / "out" / "variants" / "model.fp16.onnx").is_file()
    assert (root / "out" / "variants" / "model.int8.onnx").is_file()
    # every file ran in both engines; each is gated in the engine it is made for, and its
    # metadata lists the engines where it passed
    from pipeline.onnx.runner import file_contract

    for name, row in report["variants"].items():
        path = root / "out" / ("model.onnx" if name == "fp32" else "variants/" + row["file"])
        values = file_contract(path)
        assert values["variant"] == ("fp32" if name in ("fp32", "fixed") else name)
        assert values["engines"] == [e for e, v in row["engines"].items() if v["passed"]]
        assert row["engines"][row["engine"]]["test_accuracy"] == row["test_accuracy"]
    assert report["variants"]["int8_openvino"]["engine"] == "openvino"
    assert report["variants"]["int8"]["engine"] == "onnxruntime"
    # the time each variant adds: its build (the FP32 files come with the export) and its
    # checks in every engine, within the stage's own time
    rows = report["variants"]
    assert rows["fp32"]["build_s"] is None and rows["fixed"]["build_s"] is None
    assert all(rows[v]["build_s"] > 0 for v in ("fp16", "int8", "int8_openvino"))
    assert rows["int8_openvino"]["build_s"] >= report["int8_openvino_quantize_s"]
    assert all(r["check_s"] > 0 for r in rows.values())
    assert sum(r["check_s"] + (r["build_s"] or 0) for r in rows.values()) < report["seconds"]
    assert "openvino" not in file_contract(root / "out" / "model.onnx")["engines"]
    assert "test_accuracy" in report["variants"]["int8"]["engines"]["openvino"]
    nncf_model = onnx.load(str(root / "out" / "variants" / "model.int8.openvino.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in nncf_model.graph.node)
    int8_model = onnx.load(str(root / "out" / "variants" / "model.int8.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in int8_model.graph.node)
    # every file carries the detector, checked against PyTorch on test and probe images
    for name, row in report["variants"].items():
        assert row["passed"] and 0 <= row["test_in_distribution_pass_rate"] <= 1, name
    assert fp32["in_distribution_max_abs_diff"] <= 1e-3
    assert report["variants"]["fixed"]["in_distribution_max_abs_diff"] <= 1e-3
    ood = report["out_of_distribution"]
    assert ood["method"] == "mahalanobis+msp" and ood["tpr_on_val"] == 0.95
    assert set(ood["parts"]) == {"mahalanobis", "msp"}
    assert fp32["test_in_distribution_pass_rate"] == ood["test_pass_rate"]
    # FP16/INT8 features move: each file carries its own cut, 95 % of val through that file
    for name in ("fp16", "int8"):
        sidecar = json.loads((root / "out" / "variants" / f"model.{name}.onnx.json").read_text())
        cut = sidecar["out_of_distribution"]["threshold"]
        assert cut == report["variants"][name]["in_distribution_threshold"] and 0 < cut < 1
        assert sidecar["out_of_distribution"]["method"] == "mahalanobis+msp"
    assert json.loads((root / "out" / "model.onnx.json").read_text())[
        "out_of_distribution"]["threshold"] == 0.5 == fp32["in_distribution_threshold"]
    # the detector's own nodes stay FP32 in the INT8 file: no Q/DQ feeds them
    from pipeline.onnx.convert import nodes_only_for

    fixed = onnx.load(str(root / "out" / "variants" / "model.fixed.onnx"))
    detector_ops = sorted(n.op_type for n in fixed.graph.node
                          if n.name in set(nodes_only_for(fixed, "in_distribution")))
    assert "MatMul" in detector_ops and "Sigmoid" in detector_ops
    producers = {o: n for n in int8_model.graph.node for o in n.output}
    (sigmoid,) = [producers[o.name] for o in int8_model.graph.output
                  if o.name == "in_distribution"]
    assert sigmoid.op_type == "Sigmoid" and producers[sigmoid.input[0]].op_type != \
        "DequantizeLinear"


def test_one_self_contained_file_with_metadata(exported):
    root, _ = exported
    model = onnx.load(str(root / "out" / "model.onnx"), load_external_data=False)
    onnx.checker.check_model(model, full_check=True)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert sorted(p.name for p in (root / "out").iterdir()) == ["model.onnx", "model.onnx.json",
                                                                 "variants"]
    assert sorted(p.name for p in (root / "out" / "variants").iterdir()) == [
        "model.fixed.onnx", "model.fixed.onnx.json", "model.fp16.onnx", "model.fp16.onnx.json",
        "model.int8.onnx", "model.int8.onnx.json", "model.int8.openvino.onnx",
        "model.int8.openvino.onnx.json"]
    # raw pixels of any size in: batch, height and width are free, 3 channels
    (image,) = model.graph.input
    dims = image.type.tensor_type.shape.dim
    assert image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param != "" for d in dims] == [True, True, True, False] and dims[3].dim_value == 3
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["classes"]) == [str(d) for d in range(10)]
    assert (meta["input_layout"], meta["input_dtype"], meta["input_size"]) == ("NHWC", "uint8",
                                                                              "160")
    assert meta["crop"] == "center" and "centre-crop 160" in meta["resize_policy"]
    assert meta["input_resized_in_graph"] == "true" and "inside the graph" in meta["resize_policy"]
    assert json.loads(meta["mean"]) == pytest.approx([0.485, 0.456, 0.406])
    assert meta["backbone"] == "timm:test_efficientnet" and meta["pipeline_version"]
    assert "test_accuracy" in json.loads(meta["training_metrics"])
    summary = read_prepared(root / "prepared")[0]
    assert meta["training_manifest_sha256"] == summary["manifest_sha256"]
    assert json.loads(meta["outputs"]) == ["probabilities", "in_distribution"]
    assert [o.name for o in model.graph.output] == ["probabilities", "in_distribution"]
    ood = json.loads(meta["out_of_distribution"])
    assert (ood["method"], ood["output"], ood["threshold"]) == ("mahalanobis+msp",
                                                                "in_distribution", 0.5)
    # no exporter debug info: no stack traces naming this machine's paths
    raw = (root / "out" / "model.onnx").read_bytes()
    assert str(REPO).encode() not in raw and b"stack_trace" not in raw
    assert not any(node.metadata_props or node.doc_string for node in model.graph.node)


def test_every_file_has_a_json_sidecar_with_the_same_contract(exported):
    """Languages whose onnxruntime exposes no ONNX metadata (Node, the browser) read the
    sidecar: the same table, typed, plus the file's hash."""
    import hashlib

    from pipeline.onnx.contract import KEYS, decode_metadata

    root, _ = exported
    for path in [root / "out" / "model.onnx", *sorted((root / "out" / "variants").glob("*.onnx"))]:
        sidecar = json.loads(Path(f"{path}.json").read_text())
        model = onnx.load(str(path), load_external_data=False)
        meta = decode_metadata({p.key: p.value for p in model.metadata_props})
        assert {k: sidecar[k] for k in KEYS} == json.loads(json.dumps(meta))
        assert sidecar["file"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert sidecar["input_resized_in_graph"] == (path.name == "model.onnx")


def test_the_raw_model_takes_any_size_and_agrees_with_training_preprocessing(exported):
    """Tall, wide, tiny and large inputs straight into the graph give what the fixed network
    gives on the training preprocessing of the same pixels; the export report records it."""
    root, report = exported
    raw = ort.InferenceSession(str(root / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    fixed = ort.InferenceSession(str(root / "out" / "variants" / "model.fixed.onnx"),
                                 providers=["CPUExecutionProvider"])
    _, config = load_model(root / "model.safetensors", root / "model.json")
    pp = Preprocessing.from_dict(config["preprocessing"])
    rng = np.random.default_rng(0)
    for h, w in [(8, 8), (211, 97), (97, 211), (3, 500), (1200, 900), (161, 160)]:
        x = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        got = raw.run(None, {"image": x})[0]
        crops = np.stack([resize_and_crop(x[i], pp) for i in range(2)])
        want = fixed.run(None, {"image": crops})[0]
        assert np.abs(got - want).max() < 1e-5, (h, w)
    check = report["preprocessing"]
    assert check["odd_size_top1_agreement"] == 1.0 and check["odd_size_images"] == 8 * 6
    assert 0.0 <= check["odd_size_max_abs_diff_probabilities"] < 1e-3
    assert check["test_images_max_levels_vs_pillow"] <= 2
    assert report["variants"]["fp32"]["input"].startswith("raw")


@pytest.mark.parametrize("bad, expected", [
    (np.zeros((1, 40, 30), np.uint8), "Invalid rank for input: image"),
    (np.zeros((1, 40, 30, 4), np.uint8), "image"),
    (np.zeros((1, 40, 30, 3), np.float32), "tensor(uint8)"),
])
def test_a_wrong_tensor_fails_in_onnxruntime_naming_the_input(exported, bad, expected):
    root, _ = exported
    session = ort.InferenceSession(str(root / "out" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    with pytest.raises(Exception) as err:
        session.run(None, {"image": bad})
    assert expected in str(err.value)


def test_dynamic_batch_really_works(exported):
    root, _ = exported
    session = ort.InferenceSession(str(root / "out" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).integers(0, 256, (7, 160, 160, 3), dtype=np.uint8)
    seven = session.run(None, {"image": x})[0]
    ones = np.concatenate([session.run(None, {"image": x[i:i + 1]})[0] for i in range(7)])
    assert seven.shape == (7, 10) and np.abs(seven - ones).max() < 1e-5
    assert np.allclose(seven.sum(1), 1.0, atol=1e-5)


def _test_images(root):
    summary, classes, rows = read_prepared(root / "prepared")
    base = image_root(root / "prepared", summary)
    return [base / r["path"] for r in rows if r["split"] == "test"], classes


def test_runner_matches_the_pytorch_model_and_training_preprocessing(exported):
    root, _ = exported
    paths, classes = _test_images(root)
    runner = OnnxClassifier(root / "out" / "model.onnx")
    assert runner.provider == "CPUExecutionProvider" and runner.classes == classes
    model, config = load_model(root / "model.safetensors", root / "model.json")
    pp = Preprocessing.from_dict(config["preprocessing"])
    x = np.stack([original_pixels(p, pp) for p in paths])
    temperature = runner.contract.values["temperature"]  # fitted on val by export
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(x)) / temperature, 1).numpy()
    results = list(runner.predict_files(paths, top_k=3, batch_size=7))
    assert [r.path for r in results] == [str(p) for p in paths]
    for r, probs in zip(results, expected):
        label, p = r.top[0]
        assert label == classes[int(probs.argmax())] and p == pytest.approx(probs.max(), abs=1e-4)
        assert len(r.top) == 3 and r.top[0][1] >= r.top[1][1] >= r.top[2][1]
    # the shipped model gets the decoded pixels; a fixed-size variant gets exactly the
    # training preprocessing's crop
    img = Image.open(paths[0]).convert("RGB")
    assert np.array_equal(runner.prepare(img), np.asarray(img))
    fixed = OnnxClassifier(root / "out" / "variants" / "model.fixed.onnx")
    assert np.array_equal(fixed.prepare(img), resize_and_crop(img, pp))
    # mixed sizes in one call: batched by size, same answers as one by one
    small = img.resize((5, 7))
    mixed = runner.predict_images([img, small, img])
    assert mixed[0] == mixed[2] == runner.predict_images([img])[0]
    assert mixed[1] == runner.predict_images([small])[0]


def test_probabilities_are_calibrated_on_val_and_the_figures_are_reported(exported):
    root, report = exported
    cal = report["calibration"]
    meta = OnnxClassifier(root / "out" / "model.onnx").contract.values
    applied = cal["fit"]["applied"]
    assert (meta["probability_calibration"], meta["temperature"]) == \
        ("temperature" if applied else "none", cal["temperature"])
    assert (cal["temperature"] != 1.0) == applied
    assert applied == cal["fit"]["cross_fitted"]["passed"]
    assert ("fallback" in cal) == (not applied)
    val, test = cal["val"], cal["test"]
    summary, _, rows = read_prepared(root / "prepared")
    assert val["images"] == sum(r["split"] == "val" for r in rows) and \
        test["images"] == report["test_images"]
    # held out: never worse than the plain softmax; top-1 (accuracy) never moves
    assert test["after"]["nll"] <= test["before"]["nll"]
    assert test["after"]["ece"] <= test["before"]["ece"]
    for split in (val, test):
        assert split["after"]["accuracy"] == split["before"]["accuracy"]
    assert test["before"]["accuracy"] == report["pytorch_test_accuracy"]
    # the reliability tables count every test image once, before and after
    for name in ("uncalibrated", "calibrated"):
        lines = (root / "calibration" / f"{name}.csv").read_text().splitlines()
        assert lines[0] == "confidence,accuracy,count"
        assert sum(int(line.split(",")[2]) for line in lines[1:]) == report["test_images"]


def test_calibration_none_exports_the_raw_softmax(exported, tmp_path):
    root, report = exported
    params = ExportParams(threads=2, variants=(), probability_calibration="none",
                          logits_output=True)
    raw = run(params, root / "model.safetensors", root / "model.json", root / "prepared",
              tmp_path / "m.onnx", tmp_path / "v", tmp_path / "e.json")
    assert raw["calibration"]["temperature"] == 1.0 and raw["variants"]["fp32"]["passed"]
    assert raw["calibration"]["test"]["before"] == raw["calibration"]["test"]["after"]
    # this export (not the cached fixture's) compared the logits and checked the in-graph
    # resize on 8 images x 6 odd sizes against PyTorch
    assert 0.0 <= raw["variants"]["fp32"]["max_abs_diff_logits"] <= params.tolerance
    check = raw["preprocessing"]
    assert check["odd_size_images"] == 8 * 6 and check["odd_size_top1_agreement"] == 1.0
    assert 0.0 <= check["odd_size_max_abs_diff_probabilities"] < 1e-3
    paths, _ = _test_images(root)
    img = Image.open(paths[0]).convert("RGB")
    raw_model, calibrated = OnnxClassifier(tmp_path / "m.onnx"), \
        OnnxClassifier(root / "out" / "model.onnx")
    assert raw_model.contract.values["temperature"] == 1.0
    x = raw_model.prepare(img)[None]
    probs, logits, _ = raw_model.session.run(None, {"image": x})
    e = np.exp(logits - logits.max(1, keepdims=True))
    assert np.allclose(probs, e / e.sum(1, keepdims=True), atol=1e-6)
    t = report["calibration"]["temperature"]
    e = np.exp((logits - logits.max(1, keepdims=True)) / t)
    assert np.allclose(calibrated.session.run(None, {"image": x})[0], e / e.sum(1, keepdims=True),
                       atol=1e-5)


def _altered_prepared(root: Path, tmp_path: Path, name: str, text: str) -> Path:
    """A copy of the fixture's prepared folder (same images) with file ``name`` replaced."""
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    for file in ("summary.json", "classes.json", "manifest.csv", "pixels.bin", "pixels.csv"):
        (prepared / file).write_bytes((root / "prepared" / file).read_bytes())
    (prepared / name).write_text(text)
    return prepared


def test_temperature_needs_a_val_split(exported, tmp_path):
    root, _ = exported
    text = (root / "prepared" / "manifest.csv").read_text()
    prepared = _altered_prepared(root, tmp_path, "manifest.csv", text.replace(",val,", ",train,"))
    params = tmp_path / "params.yaml"
    params.write_text("export:\n  variants: []\n")
    result = CliRunner().invoke(main, ["export", "--params", str(params), "--model",
                                       str(root / "model.safetensors"), "--config",
                                       str(root / "model.json"), "--prepared", str(prepared),
                                       "--out", str(tmp_path / "m.onnx"), "--metrics",
                                       str(tmp_path / "e.json"), "--report",
                                       str(tmp_path / "r.json"), "--plots", str(tmp_path / "p")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "val split is empty" in result.output and \
        "export.probability_calibration: none" in result.output
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "e.json").exists()
    assert not (tmp_path / "r.json").exists()


def test_float_input_variant_with_logits(exported, tmp_path):
    root, _ = exported
    params = ExportParams(threads=2, input="float32_nchw", logits_output=True, variants=())
    report = run(params, root / "model.safetensors", root / "model.json", root / "prepared",
                 tmp_path / "m.onnx", tmp_path / "v", tmp_path / "e.json")
    assert report["variants"]["fp32"]["passed"] and report["outputs"] == [
        "probabilities", "logits", "in_distribution"]
    # the logits were compared too
    assert 0.0 <= report["variants"]["fp32"]["max_abs_diff_logits"] <= params.tolerance
    runner = OnnxClassifier(tmp_path / "m.onnx")
    assert runner.contract.layout == "NCHW"
    paths, _ = _test_images(root)
    img = Image.open(paths[0]).convert("RGB")
    pp = runner.contract.preprocessing
    assert np.allclose(runner.prepare(img), original_pixels(paths[0], pp))
    reference = OnnxClassifier(root / "out" / "model.onnx").predict_images([img], 10)[0]
    for (la, pa), (lb, pb) in zip(runner.predict_images([img], 10)[0], reference):
        assert pa == pytest.approx(pb, abs=1e-5)


def test_failed_check_writes_nothing(exported, tmp_path):
    root, _ = exported
    with pytest.raises(PipelineError, match="export checks failed, nothing written: fp32"):
        run(ExportParams(threads=2, tolerance=1e-15, variants=()), root / "model.safetensors",
            root / "model.json", root / "prepared", tmp_path / "m.onnx", tmp_path / "v",
            tmp_path / "e.json")
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "e.json").exists()
    assert not (tmp_path / "r.json").exists()


def test_predict_cli_table_json_and_bad_images(exported, tmp_path):
    root, _ = exported
    paths, _ = _test_images(root)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    model = str(root / "out" / "model.onnx")
    result = CliRunner().invoke(main, ["predict", "--model", model, str(paths[0]), str(bad),
                                       str(paths[1]), "--json", "--top-k", "2"])
    assert result.exit_code == 1, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["path"] for line in lines] == [str(paths[0]), str(bad), str(paths[1])]
    assert "predict: 2 images" in result.stderr and "1 errors" in result.stderr
    assert "error" in lines[1] and "broken.png" not in lines[1]["error"]
    assert len(lines[0]["predictions"]) == 2 and lines[0]["provider"] == "CPUExecutionProvider"
    folder = tmp_path / "imgs"
    for i in range(3):
        make_image(folder / f"{i}.png", seed=i)
    table = CliRunner().invoke(main, ["predict", "--model", model, str(folder)])
    assert table.exit_code == 0, table.output
    assert table.output.count(str(folder)) == 3 and "CPUExecutionProvider" in table.output
    calibrated = OnnxClassifier(model).contract.values["probability_calibration"]
    assert ("probabilities calibrated, temperature" if calibrated == "temperature" else
            "probabilities not calibrated") in table.output


def test_predict_marks_predictions_below_min_confidence(exported):
    root, _ = exported
    paths, _ = _test_images(root)
    model = str(root / "out" / "model.onnx")
    args = ["predict", "--model", model, *map(str, paths), "--top-k", "1"]
    lines = [json.loads(line) for line in CliRunner().invoke(main, args + ["--json"]).stdout
             .splitlines()]
    top = [line["predictions"][0]["probability"] for line in lines]
    assert not any(line["uncertain"] for line in lines)  # default 0: nothing is uncertain
    threshold = float(np.median(top))
    marked = [json.loads(line) for line in CliRunner().invoke(
        main, args + ["--json", "--min-confidence", str(threshold)]).stdout.splitlines()]
    assert [line["uncertain"] for line in marked] == [p < threshold for p in top]
    assert 0 < sum(p < threshold for p in top) < len(top)
    table = CliRunner().invoke(main, args + ["--min-confidence", str(threshold)])
    assert table.output.count("\tuncertain") == sum(p < threshold for p in top)
    bad = CliRunner().invoke(main, args + ["--min-confidence", "1.5"])
    assert bad.exit_code == 2 and "--min-confidence" in bad.output


def test_providers_are_checked_and_reported(exported):
    root, _ = exported
    result = CliRunner().invoke(main, ["predict", "--model", str(root / "out" / "model.onnx"),
                                       "x.png", "--providers", "gpu"])
    assert result.exit_code != 0 and "unknown provider 'gpu'" in result.output
    runner = OnnxClassifier(root / "out" / "model.onnx", providers=["cuda", "cpu"])
    if not torch.cuda.is_available():  # onnxruntime falls back to CPU: we say so
        assert runner.provider == "CPUExecutionProvider"


def test_models_that_break_the_contract_are_refused(exported, tmp_path):
    root, _ = exported
    model = onnx.load(str(root / "out" / "model.onnx"))
    plain = onnx.ModelProto()
    plain.CopyFrom(model)
    del plain.metadata_props[:]
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    with pytest.raises(ModelError, match="not a model exported by `pipeline export`"):
        OnnxClassifier(tmp_path / "plain.onnx")
    # a plain file is accepted when its JSON sidecar carries the contract
    (tmp_path / "plain.onnx.json").write_text((root / "out" / "model.onnx.json").read_text())
    assert OnnxClassifier(tmp_path / "plain.onnx").classes == [str(d) for d in range(10)]
    for prop in model.metadata_props:
        if prop.key == "input_resized_in_graph":
            prop.value = "false"  # claims a fixed 160 x 160 input
    onnx.save(model, str(tmp_path / "lying.onnx"))
    with pytest.raises(ModelError, match="does not match its metadata"):
        OnnxClassifier(tmp_path / "lying.onnx")
    fixed = onnx.load(str(root / "out" / "variants" / "model.fixed.onnx"))
    for prop in fixed.metadata_props:
        if prop.key == "input_size":
            prop.value = "224"
    onnx.save(fixed, str(tmp_path / "lying_fixed.onnx"))
    with pytest.raises(ModelError, match="does not match its metadata"):
        OnnxClassifier(tmp_path / "lying_fixed.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(ModelError, match="junk.onnx"):
        OnnxClassifier(tmp_path / "junk.onnx")


def test_external_data_outside_the_folder_is_refused(exported, tmp_path):
    root, _ = exported
    model = onnx.load(str(root / "out" / "model.onnx"))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    (tmp_path / "outside.bin").write_bytes(tensor.raw_data)
    length = len(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "../outside.bin"), ("offset", "0"), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "model.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(ModelError, match="outside the model's folder"):
        OnnxClassifier(tmp_path / "sub" / "model.onnx")


def _blocked_torch_env(tmp_path: Path) -> dict[str, str]:
    blocker = tmp_path / "blocker"
    blocker.mkdir(exist_ok=True)
    (blocker / "torch.py").write_text("raise ImportError('torch is blocked in this test')\n")
    return {"PYTHONPATH": str(blocker), "PATH": "/usr/bin:/bin"}


def test_runner_imports_and_predicts_without_torch(exported, tmp_path):
    root, _ = exported
    paths, _ = _test_images(root)
    code = textwrap.dedent(f"""
        import sys
        from pipeline.onnx.runner import OnnxClassifier
        runner = OnnxClassifier({str(root / 'out' / 'model.onnx')!r})
        result = next(runner.predict_files([{str(paths[0])!r}], top_k=1))
        assert "torch" not in sys.modules or sys.modules["torch"] is None
        print(result.top[0][0])
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=_blocked_torch_env(tmp_path))
    assert result.returncode == 0, result.stderr
    expected = OnnxClassifier(root / "out" / "model.onnx").predict_files([paths[0]], top_k=1)
    assert result.stdout.strip() == next(expected).top[0][0]


def test_readme_snippet_runs_with_onnxruntime_numpy_pillow_only(exported, tmp_path):
    root, _ = exported
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Use the exported model in your app", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "pipeline" not in snippet.replace("models/model.onnx", "")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.onnx").write_bytes((root / "out" / "model.onnx").read_bytes())
    (tmp_path / "models" / "model.onnx.json").write_bytes(
        (root / "out" / "model.onnx.json").read_bytes())
    assert len(snippet.strip().splitlines()) <= 11  # decode + run: about ten lines
    (tmp_path / "app.py").write_text(snippet)
    paths, _ = _test_images(root)
    env = _blocked_torch_env(tmp_path)
    env["PYTHONNOUSERSITE"] = "1"
    result = subprocess.run([sys.executable, "-S", "-c",
                             "import site, sys; site.main(); "
                             "sys.modules['pipeline'] = None; "
                             "sys.argv = ['app.py'] + sys.argv[1:]; "
                             "exec(open('app.py').read())", *map(str, paths[:4])],
                            capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    runner = OnnxClassifier(root / "out" / "model.onnx")
    assert len(result.stdout.splitlines()) == 4
    for line, r in zip(result.stdout.splitlines(), runner.predict_files(paths[:4], top_k=1)):
        label, prob = r.top[0]
        assert line == f"{r.path}: {label} {prob:.3f}"


def test_a_file_is_refused_on_an_engine_its_export_did_not_pass(exported, tmp_path):
    """``engines`` in the contract: the runner refuses the file elsewhere, naming the file
    made for that engine; ``--providers auto`` never picks such an engine."""
    import shutil

    from pipeline.onnx.convert import set_metadata, write_sidecar
    from pipeline.onnx.sessions import auto_provider

    root, _ = exported
    path = tmp_path / "model.int8.onnx"
    shutil.copyfile(root / "out" / "variants" / "model.int8.onnx", path)
    set_metadata(path, engines=json.dumps(["openvino"]))
    write_sidecar(path)
    with pytest.raises(ModelError) as refused:
        OnnxClassifier(path, providers=["cpu"])
    assert str(refused.value) == (
        f"{path}: export checked this file for openvino only (it lost accuracy in onnxruntime, "
        "see reports/export.json); use the variant made for it (model.int8.onnx) or another "
        "--providers")
    set_metadata(path, engines=json.dumps([]))
    write_sidecar(path)
    with pytest.raises(ModelError, match="checked this file for no engine only"):
        OnnxClassifier(path, providers=["cpu"])
    assert auto_provider(False, "int8", None, engines=["onnxruntime"])[0] != "openvino"
    set_metadata(path, engines=json.dumps(["onnxruntime", "openvino"]))
    write_sidecar(path)
    assert OnnxClassifier(path, providers=["cpu"]).provider == "CPUExecutionProvider"


def test_each_file_runs_in_the_other_engine_and_lists_only_the_engines_it_passed(monkeypatch):
    """``_engine_checks`` directly (the export fixture runs it once, from unmutated code): the
    own engine's row is the gate already run; the other engine is measured and gated with the
    same rule; the raw-pixel FP32 model is never run in OpenVINO; a missing OpenVINO is a
    reason, not a pass."""
    from pipeline.core.config import ExportParams
    from pipeline.stages import export as stage

    measured = []
    accuracy = {"onnxruntime": 0.99, "openvino": 0.95}

    def fake_measure(variant, path, checks, params, pp, raw_input, engine):
        assert checks.ref_in is None  # the detector is checked in the file's own engine only
        measured.append((variant, engine))
        return {"test_accuracy": accuracy[engine], "top1_agreement": 1.0,
                "max_abs_diff_probabilities": 0.0, "max_abs_diff_logits": None}

    monkeypatch.setattr(stage, "_measure", fake_measure)
    monkeypatch.setattr(stage, "_openvino_missing", lambda: None)
    checks = stage.Checks([], np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0), 0,
                          ref_in=np.ones(3))
    params = ExportParams()
    report = {"variants": {"fp32": {"test_accuracy": 0.99}}}

    def engines_of(variant, own_accuracy, passed, raw_input=True):
        row = {"test_accuracy": own_accuracy, "top1_agreement": 1.0, "passed": passed}
        out = stage._engine_checks(variant, Path("x.onnx"), row, checks, report, params, None,
                                   raw_input)
        return out, row

    # onnxruntime's INT8 file: passed in onnxruntime, 4 points off in OpenVINO: refused there
    engines, row = engines_of("int8", 0.985, True)
    assert engines == ["onnxruntime"] and measured == [("int8", "openvino")]
    assert row["engine"] == "onnxruntime"
    assert row["engines"]["onnxruntime"] == {"test_accuracy": 0.985, "top1_agreement": 1.0,
                                             "passed": True}
    other = row["engines"]["openvino"]
    assert (other["test_accuracy"], other["passed"]) == (0.95, False)
    assert other["reason"].startswith("int8 test accuracy 0.9500 is 0.0400 below fp32")
    # NNCF's file: gated in OpenVINO (failed there), passes in onnxruntime
    measured.clear()
    engines, row = engines_of("int8_openvino", 0.95, False)
    assert engines == ["onnxruntime"] and measured == [("int8_openvino", "onnxruntime")]
    assert row["engine"] == "openvino" and "reason" not in row["engines"]["onnxruntime"]
    accuracy["openvino"] = 0.99
    engines, _ = engines_of("int8_openvino", 0.99, True)
    assert engines == ["openvino", "onnxruntime"]
    # the raw-pixel FP32 model is not run in OpenVINO; the fixed-size one is
    measured.clear()
    engines, row = engines_of("fp32", 0.99, True)
    assert engines == ["onnxruntime"] and measured == []
    assert row["engines"]["openvino"]["reason"].startswith("resizes inside the graph")
    engines, row = engines_of("fp32", 0.99, True, raw_input=False)
    assert measured == [("fp32", "openvino")]
    # without OpenVINO here: its reason, and the file is offered to onnxruntime only
    monkeypatch.setattr(stage, "_openvino_missing", lambda: "NNCF is not installed")
    measured.clear()
    engines, row = engines_of("int8", 0.985, True)
    assert engines == ["onnxruntime"] and measured == []
    assert row["engines"]["openvino"] == {"passed": False, "reason": "NNCF is not installed"}


def test_export_params_reject_unknown_variant():
    from pipeline.core.errors import ParamsError
    from pipeline.core.params import parse_section

    with pytest.raises(ParamsError, match=r"export.variants\[0\] must be one of 'fp16', 'int8'"):
        parse_section(ExportParams, {"variants": ["bf16"]}, "export")
    assert parse_section(ExportParams, {"variants": []}, "export").variants == ()


def test_one_variant_table_drives_export_and_its_params():
    """Each variant export.variants may name has a file in the contract's table and a build
    step and gate in export; nothing falls through to another variant's gate."""
    import typing

    from pipeline.core.config import Variant
    from pipeline.onnx.contract import VARIANTS
    from pipeline.stages.export import STEPS

    assert set(typing.get_args(Variant)) == set(VARIANTS) - {"fixed"}
    assert set(STEPS) == set(VARIANTS) | {"fp32"}
    for name in typing.get_args(Variant):
        assert STEPS[name].build is not None and name.startswith(VARIANTS[name].precision)
    assert STEPS["fp16"].gate is not STEPS["int8"].gate
    # each INT8 file is made for one engine, gated there
    assert (VARIANTS["int8"].engine, VARIANTS["int8_openvino"].engine) == ("onnxruntime",
                                                                           "openvino")


# --------------------------------------------------------------------------- interpret


def test_interpret_lists_losses_of_the_shipped_model(exported, tmp_path):
    from pipeline.core.config import InterpretParams
    from pipeline.stages.interpret import run as interpret

    root, export_report = exported
    params = InterpretParams(splits=("test", "train"), top_losses=5, most_confused=100,
                             threads=2)
    report = interpret(params, root / "out" / "model.onnx", root / "prepared", tmp_path / "out",
                       tmp_path / "interpret.json")
    assert json.loads((tmp_path / "interpret.json").read_text()) == report
    test = report["splits"]["test"]
    # the same ONNX file on the same test images as export's own check
    assert test["accuracy"] == export_report["variants"]["fp32"]["test_accuracy"]
    summary, classes, rows = read_prepared(root / "prepared")
    model = OnnxClassifier(root / "out" / "model.onnx")
    for split in ("test", "train"):
        with open(tmp_path / "out" / f"{split}_losses.csv", newline="") as f:
            table = list(csv.DictReader(f))
        expected = {r["path"]: r["label"] for r in rows if r["split"] == split}
        assert {r["path"]: r["label"] for r in table} == expected  # every image, its label
        losses = [float(r["loss"]) for r in table]
        assert losses == sorted(losses, reverse=True)  # worst first
        for r in table:
            assert float(r["loss"]) == pytest.approx(-np.log(float(r["p_label"])), rel=1e-4)
            assert (r["label"] == r["predicted"]) == (float(r["p_label"]) ==
                                                      float(r["p_predicted"]))
        s = report["splits"][split]
        errors = sum(r["label"] != r["predicted"] for r in table)
        assert s["errors"] == errors == sum(c["count"] for c in s["most_confused"])
        assert s["accuracy"] == pytest.approx(1 - errors / len(table))
        assert (tmp_path / "out" / f"{split}_top_losses.png").read_bytes()[:4] == b"\x89PNG"
        # the least typical images by the model's own in_distribution output, lowest first
        assert (tmp_path / "out" / f"{split}_least_typical.png").read_bytes()[:4] == b"\x89PNG"
        least = s["least_typical"]
        scores = [e["in_distribution"] for e in least]
        assert scores == sorted(scores) and len(least) == 5
        x = model.prepare(PreparedImages(root / "prepared").rgb(least[0]["path"]))[None]
        assert scores[0] == pytest.approx(float(model.session.run(
            ["in_distribution"], {"image": x})[0][0]), abs=1e-6)
        assert 0.0 <= s["below_threshold"] <= 1.0
    # p_label is the model's probability of the manifest label for that image
    first = next(iter(csv.DictReader(open(tmp_path / "out" / "test_losses.csv"))))
    base = image_root(root / "prepared", summary)
    probs = model.probabilities(model.prepare(Image.open(base / first["path"]).convert("RGB"))[None])
    assert float(first["p_label"]) == pytest.approx(probs[0, classes.index(first["label"])],
                                                    rel=1e-4)


def test_interpret_cli_refuses_a_model_for_other_classes(exported, tmp_path):
    root, _ = exported
    prepared = _altered_prepared(root, tmp_path, "classes.json", json.dumps(list("abcdefghij")))
    params = tmp_path / "params.yaml"
    params.write_text("interpret:\n  splits: [test]\n")
    result = CliRunner().invoke(main, ["interpret", "--params", str(params), "--model",
                                       str(root / "out" / "model.onnx"), "--prepared",
                                       str(prepared), "--out", str(tmp_path / "out"),
                                       "--metrics", str(tmp_path / "m.json"), "--report",
                                       str(tmp_path / "r.json")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "classes differ" in result.output and not (tmp_path / "out").exists()
    params.write_text("interpret:\n  splits: [holdout]\n")
    result = CliRunner().invoke(main, ["interpret", "--params", str(params)])
    assert result.exit_code != 0 and "interpret.splits" in result.output


def test_interpret_names_a_copy_that_changed_after_prepare(exported, tmp_path):
    root, _ = exported
    summary, _, rows = read_prepared(root / "prepared")
    broken = next(r["path"] for r in rows if r["split"] == "test")
    prepared = _altered_prepared(root, tmp_path, "summary.json", json.dumps(summary))
    index = {line.split(",")[0]: int(line.split(",")[1])
             for line in (prepared / "pixels.csv").read_text().splitlines()[1:]}
    store = bytearray((prepared / "pixels.bin").read_bytes())
    store[index[broken]] ^= 0x01
    (prepared / "pixels.bin").write_bytes(bytes(store))
    (tmp_path / "params.yaml").write_text("interpret:\n  splits: [test]\n")
    result = CliRunner().invoke(main, ["interpret", "--params", str(tmp_path / "params.yaml"),
                                       "--model", str(root / "out" / "model.onnx"),
                                       "--prepared", str(prepared), "--out",
                                       str(tmp_path / "out"), "--metrics",
                                       str(tmp_path / "m.json"), "--report",
                                       str(tmp_path / "r.json")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert broken in result.output and "re-run `pipeline prepare`" in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()
    assert not (tmp_path / "r.json").exists()


# --------------------------------------------------------------------------- model card


def test_wilson_interval_known_values():
    from pipeline.stages.card import wilson_interval

    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_card_engine_cells_for_reports_with_and_without_engines():
    """A report from before engines were checked measured each file in onnxruntime only; a
    refused engine is marked, an engine that did not run says why, and only passing engines
    are offered."""
    from pipeline.stages.card import _engine_cell, _offered

    old = {"test_accuracy": 0.98765, "passed": True}
    assert (_engine_cell(old, "onnxruntime"), _engine_cell(old, "openvino")) == \
        ("0.9877", "not run")
    assert _offered(old) == ["onnxruntime"]
    assert _offered({"test_accuracy": 0.5}) == ["onnxruntime"]  # no gate recorded: it passed
    assert _offered({"test_accuracy": 0.5, "passed": False}) == []
    new = {"test_accuracy": 0.99, "engines": {
        "openvino": {"test_accuracy": 0.9, "passed": False, "reason": "lost accuracy"},
        "onnxruntime": {"test_accuracy": 0.99, "passed": True}}}
    assert _engine_cell(new, "openvino") == "0.9000 (refused)"
    assert _engine_cell(new, "onnxruntime") == "0.9900"
    assert _offered(new) == ["onnxruntime"]
    missing = {"test_accuracy": 0.99, "engines": {
        "onnxruntime": {"test_accuracy": 0.99, "passed": True},
        "openvino": {"passed": False, "reason": "the openvino runtime is not installed"}}}
    assert _engine_cell(missing, "openvino") == "not run: the openvino runtime is not installed"
    assert _engine_cell({"engines": {"openvino": {"passed": False}}}, "openvino") == \
        "not run: unknown"


def test_card_reads_every_figure_from_the_stage_outputs(exported, tmp_path):
    import hashlib

    root, export_report = exported
    (root / "export.json").write_text(json.dumps(export_report))
    result = CliRunner().invoke(main, [
        "card", "--model", str(root / "out" / "model.onnx"), "--config",
        str(root / "model.json"), "--prepared", str(root / "prepared"), "--head-metrics",
        str(root / "hm.json"), "--finetune-metrics", str(root / "fm.json"), "--export-metrics",
        str(root / "export.json"), "--interpret-metrics", str(tmp_path / "none.json"),
        "--bench", str(tmp_path / "none.json"), "--out", str(tmp_path / "card.md")])
    assert result.exit_code == 0, result.output
    card = (tmp_path / "card.md").read_text()
    finetuned = json.loads((root / "fm.json").read_text())
    test = finetuned["test"]
    n = test["num_samples"]
    assert f"* Test: {test['accuracy']:.4f} ({round(test['accuracy'] * n)}/{n}; 95 % CI" in card
    assert hashlib.sha256((root / "out" / "model.onnx").read_bytes()).hexdigest() in card
    cal = export_report["calibration"]
    t = cal["temperature"]
    assert f"T = {t:.4g}" in card
    assert (f"softmax(logits / {t:.4g})" in card) == cal["fit"]["applied"]
    if not cal["fit"]["applied"]:
        assert f"plain softmax (not calibrated: {cal['fallback']})" in card
    assert f"the last {finetuned['blocks']} of {finetuned['num_block_groups']} block groups" \
        in card
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in card.splitlines()
            if line.startswith("| ") and " | `" in line}
    for name in ("fp32", "fixed", "fp16", "int8"):
        v = export_report["variants"][name]
        assert f"| {name} | `{v['file']}` |" in card and f"{v['test_accuracy']:.4f} |" in card
        cells = rows[name]
        assert cells[3] == v["engine"]
        offered = [e for e, r in v["engines"].items() if r["passed"]]
        assert cells[-1] == (", ".join(offered) or "none") + " |"
        for engine, cell in zip(("onnxruntime", "openvino"), cells[5:7]):
            result = v["engines"][engine]
            if "test_accuracy" in result:
                assert cell == f"{result['test_accuracy']:.4f}" + (
                    "" if result["passed"] else " (refused)")
            else:
                assert cell == f"not run: {result['reason']}"
    assert rows["fp32"][6].startswith("not run: resizes inside the graph")
    assert "Not measured: `reports/bench.json` is missing" in card
    ood = export_report["out_of_distribution"]
    assert ("the `mahalanobis+msp` score of its pooled features and logits, fitted on the train "
            "split; below 0.5 the image is none of these classes" in card)
    assert f"passed {ood['test_pass_rate']:.1%} of the test images" in card
    assert "Most confused" not in card  # no interpret metrics: nothing is made up
    assert len([line for line in card.splitlines() if line.startswith("| ") and
                line.split(" | ")[0][2:] in [str(d) for d in range(10)]]) == 10

    (tmp_path / "broken.json").write_text("{")
    bad = CliRunner().invoke(main, [
        "card", "--model", str(root / "out" / "model.onnx"), "--config",
        str(root / "model.json"), "--prepared", str(root / "prepared"), "--head-metrics",
        str(tmp_path / "broken.json"), "--out", str(tmp_path / "card2.md")])
    assert bad.exit_code == 1 and "broken.json: not valid JSON" in bad.output
    assert not (tmp_path / "card2.md").exists()


def test_the_temperature_is_fitted_on_val_not_on_test(exported):
    """Recomputed from the PyTorch model: the reported fit is the val split's, and fitting on
    the test split would have given another value (so this check can tell them apart)."""
    from pipeline.core.calibration import choose_temperature

    root, report = exported
    model, config = load_model(root / "model.safetensors", root / "model.json")
    pp = Preprocessing.from_dict(config["preprocessing"])
    summary, classes, rows = read_prepared(root / "prepared")
    base = image_root(root / "prepared", summary)

    def logits(split):
        chosen = [r for r in rows if r["split"] == split]
        x = np.stack([original_pixels(base / r["path"], pp) for r in chosen])
        with torch.no_grad():
            out = model(torch.from_numpy(x)).numpy()
        return out, np.array([classes.index(r["label"]) for r in chosen])

    bins = report["calibration"]["bins"]
    on_val = choose_temperature(*logits("val"), bins)["fitted_temperature"]
    on_test = choose_temperature(*logits("test"), bins)["fitted_temperature"]
    assert report["calibration"]["fit"]["fitted_temperature"] == pytest.approx(on_val, rel=1e-6)
    assert on_test != pytest.approx(on_val, rel=1e-3)


@pytest.mark.parametrize("variant, row, message", [
    ("fp32", {"max_abs_diff_probabilities": 2e-4, "max_abs_diff_logits": 0.0,
              "top1_agreement": 1.0}, "fp32 differs from PyTorch"),
    ("fp32", {"max_abs_diff_probabilities": 0.0, "max_abs_diff_logits": 2e-4,
              "top1_agreement": 1.0}, "logits 0.0002"),
    ("fp32", {"max_abs_diff_probabilities": 0.0, "max_abs_diff_logits": None,
              "top1_agreement": 0.99}, "top-1 agreement 0.9900"),
    ("fixed", {"max_abs_diff_probabilities": 2e-4, "max_abs_diff_logits": None,
               "top1_agreement": 1.0}, "fixed differs from PyTorch"),
    ("fp16", {"top1_agreement": 0.99}, "fp16 top-1 agreement 0.9900 < export.fp16_min"),
    ("int8", {"test_accuracy": 0.88}, "int8 test accuracy 0.8800 is 0.0200 below fp32"),
    ("int8_openvino", {"test_accuracy": 0.88},
     "int8_openvino test accuracy 0.8800 is 0.0200 below fp32"),
])
def test_each_export_gate_fails_on_its_own(variant, row, message):
    """Every clause of every gate can fail by itself (the FP32 check is not only the
    probabilities diff); the stage then writes nothing (tested end to end above)."""
    from pipeline.stages.export import _check

    report = {"variants": {"fp32": {"test_accuracy": 0.90}}}
    failures = _check(variant, dict(row), report, ExportParams())
    assert len(failures) == 1 and message in failures[0]
    passing = {"max_abs_diff_probabilities": 0.0, "max_abs_diff_logits": 0.0,
               "top1_agreement": 1.0, "test_accuracy": 0.90}
    assert _check(variant, passing, report, ExportParams()) == []


def test_each_export_gate_passes_at_its_limit():
    """The limits are inclusive, and a drop that equals the INT8 limit up to float rounding
    (0.90 - 0.89 is 0.010000000000000009) passes."""
    from pipeline.stages.export import _check

    limits = ExportParams()
    report = {"variants": {"fp32": {"test_accuracy": 0.90}}}
    at_limit = {"max_abs_diff_probabilities": limits.tolerance,
                "max_abs_diff_logits": limits.tolerance, "top1_agreement": 1.0}
    assert _check("fp32", dict(at_limit), report, limits) == []
    assert _check("fp16", {"top1_agreement": limits.fp16_min_agreement}, report, limits) == []
    assert _check("fp16", {"top1_agreement": limits.fp16_min_agreement - 1e-9}, report, limits)
    row = {"test_accuracy": 0.89}
    assert _check("int8", row, report, limits) == [] and row["passed"]
    assert row["accuracy_drop_vs_fp32"] == pytest.approx(0.01)
    assert _check("int8", {"test_accuracy": 0.8899}, report, limits)
    far = {"test_accuracy": 0.30}
    assert _check("int8", far, report, limits) and far["accuracy_drop_vs_fp32"] == \
        pytest.approx(0.60)


def test_the_runner_refuses_absolute_external_data_and_a_wrong_output_width(exported, tmp_path):
    root, _ = exported
    model = onnx.load(str(root / "out" / "variants" / "model.fixed.onnx"))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    (tmp_path / "w.bin").write_bytes(tensor.raw_data)
    length = len(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", str(tmp_path / "w.bin")), ("offset", "0"),
                       ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    (tmp_path / "abs.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(ModelError, match="outside the model's folder"):
        OnnxClassifier(tmp_path / "abs.onnx")  # even though the file sits right there
    # metadata promising 11 classes on a 10-wide output
    fixed = onnx.load(str(root / "out" / "variants" / "model.fixed.onnx"))
    for prop in fixed.metadata_props:
        if prop.key == "classes":
            prop.value = json.dumps([str(d) for d in range(11)])
    onnx.save(fixed, str(tmp_path / "wide.onnx"))
    with pytest.raises(ModelError, match="do not give probabilities for the 11 classes"):
        OnnxClassifier(tmp_path / "wide.onnx")


def test_int8_weights_are_7_bit_by_default_and_8_bit_when_asked(exported, tmp_path):
    """export.int8_reduce_range (default true) keeps INT8 weights in [-64, 64], which the
    U8S8 kernels of CPUs without VNNI multiply without saturating; false (the fixture's
    export) uses the full range."""
    from pipeline.core.config import ExportParams
    from onnx import numpy_helper

    from pipeline.onnx.convert import export_int8

    root, _ = exported
    fixed = root / "out" / "variants" / "model.fixed.onnx"

    def weight_range(path):
        model = onnx.load(str(path))
        values = [numpy_helper.to_array(t) for t in model.graph.initializer
                  if t.data_type == onnx.TensorProto.INT8 and t.dims]
        return min(int(v.min()) for v in values), max(int(v.max()) for v in values)

    assert ExportParams().int8_reduce_range is True
    low, high = weight_range(root / "out" / "variants" / "model.int8.onnx")
    assert max(-low, high) > 64
    size = onnx.load(str(fixed)).graph.input[0].type.tensor_type.shape.dim[1].dim_value
    calib = np.random.default_rng(0).integers(0, 256, (16, size, size, 3), dtype=np.uint8)
    export_int8(fixed, tmp_path / "seven.onnx", calib, "minmax", reduce_range=True)
    low, high = weight_range(tmp_path / "seven.onnx")
    assert max(-low, high) <= 64


def test_every_exported_file_loads_without_an_onnxruntime_warning(exported):
    """No dead initializer or other graph leftover: onnxruntime, at its default log level
    (warning), prints nothing when it loads any file export wrote (Python, Node and the
    browser all print what it says)."""
    import subprocess
    import sys

    root, _ = exported
    files = sorted((root / "out").rglob("*.onnx"))
    assert len(files) == 5
    code = ("import sys, onnxruntime as ort\n"
            "for f in sys.argv[1:]:\n"
            "    o = ort.SessionOptions(); o.log_severity_level = 2\n"
            "    ort.InferenceSession(f, o, providers=['CPUExecutionProvider'])\n")
    done = subprocess.run([sys.executable, "-c", code, *map(str, files)], capture_output=True,
                          text=True)
    assert done.returncode == 0 and done.stdout == "" and done.stderr == "", done.stderr
    for f in files:
        model = onnx.load(str(f))
        used = {i for n in model.graph.node for i in n.input}
        assert all(t.name in used for t in model.graph.initializer), f.name


def test_features_from_an_earlier_block_group_go_through_training_and_export(tmp_path):
    """backbone.layer k: the cut network's pooled features are cached, the head and the
    fine-tuning of its last group train on them, and export ships that network with the same
    raw-pixel contract and checks; the contract and the card say which layer."""
    from pipeline.core.backbones import build_backbone
    from pipeline.core.config import BackboneParams, FinetuneParams
    from pipeline.core.dataset import read_prepared
    from pipeline.stages.card import render
    from pipeline.stages.export import run as export
    from pipeline.stages.finetune import run as finetune

    from ..conftest import TINY_BACKBONE, train_tiny_model

    full = build_backbone(BackboneParams(**TINY_BACKBONE))
    layer = len(full.block_groups) - 3
    backbone = BackboneParams(**TINY_BACKBONE, layer=layer)
    cut = build_backbone(backbone)
    assert cut.feature_dim < full.feature_dim and len(cut.block_groups) == layer + 1
    root = tmp_path
    train_tiny_model(root, backbone, per_class=6, head_epochs=10)
    meta = json.loads((root / "features" / "meta.json").read_text())
    assert meta["backbone"]["layer"] == layer
    assert meta["feature_shape"][1] == cut.feature_dim
    report = export(ExportParams(threads=2, variants=()), root / "model.safetensors",
                    root / "model.json", root / "prepared", root / "out" / "model.onnx",
                    root / "out" / "variants", root / "export.json")
    assert report["variants"]["fp32"]["passed"] and report["variants"]["fixed"]["passed"]
    assert report["preprocessing"]["odd_size_top1_agreement"] == 1.0
    runner = OnnxClassifier(root / "out" / "model.onnx")
    assert runner.contract.values["backbone_layer"] == layer
    config = json.loads((root / "model.json").read_text())
    card = render(root / "out" / "model.onnx", config, read_prepared(root / "prepared")[0],
                  None, None, report, None, None)
    assert f"features from the end of block group {layer} (`backbone.layer`)" in card
    # a head trained on another layer's features is refused, naming the key
    with pytest.raises(PipelineError, match="backbone layer"):
        finetune(BackboneParams(**TINY_BACKBONE), FinetuneParams(blocks=1, epochs=1,
                                                                 warmup_epochs=0,
                                                                 mode="classic", threads=2),
                 root / "prepared", root / "none", root / "head.safetensors",
                 root / "head.json", tmp_path / "m2.safetensors", tmp_path / "m2.json",
                 tmp_path / "fm2.json", tmp_path / "fp2")


def test_the_detector_output_leaves_the_probabilities_byte_identical(exported, tmp_path):
    """export.ood: none ships the classifier alone; with the detector the probabilities are
    the same bytes, on every test image, and the detector says why it is absent when off."""
    import onnxruntime as ort

    root, report = exported
    params = ExportParams(threads=2, variants=(), ood="none")
    plain = run(params, root / "model.safetensors", root / "model.json", root / "prepared",
                tmp_path / "m.onnx", tmp_path / "v", tmp_path / "e.json")
    assert plain["outputs"] == ["probabilities"]
    assert plain["out_of_distribution"] == {"method": "none", "reason": "export.ood: none"}
    meta = json.loads((tmp_path / "m.onnx.json").read_text())
    assert meta["out_of_distribution"] == {"method": "none"}
    _, _, rows = read_prepared(root / "prepared")
    images = PreparedImages(root / "prepared")
    batch = np.stack([images.rgb(r["path"]) for r in rows if r["split"] == "test"][:16])
    with_ood = ort.InferenceSession(str(root / "out" / "model.onnx"))
    without = ort.InferenceSession(str(tmp_path / "m.onnx"))
    probs, in_dist = with_ood.run(None, {"image": batch})
    (alone,) = without.run(None, {"image": batch})
    assert probs.tobytes() == alone.tobytes()
    assert in_dist.shape == (len(batch),) and ((in_dist >= 0) & (in_dist <= 1)).all()


def test_predict_marks_images_below_the_detector_threshold_unknown(exported, tmp_path,
                                                                   monkeypatch):
    """The runner reads in_distribution with the probabilities; predict calls an image below
    the contract's threshold unknown (JSON, CSV, the table and the summary)."""
    root, _ = exported
    paths, _ = _test_images(root)
    model = str(root / "out" / "model.onnx")
    classifier = OnnxClassifier(model)
    assert classifier.ood_threshold == 0.5
    results = list(classifier.predict_files(paths[:6], top_k=1))
    scores = [r.in_distribution for r in results]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert [r.unknown for r in results] == [s < 0.5 for s in scores]
    # the score is the model's own output for the same input
    x = classifier.prepare(Image.open(paths[0]).convert("RGB"))[None]
    assert scores[0] == pytest.approx(float(classifier.session.run(
        ["in_distribution"], {"image": x})[0][0]), abs=1e-6)
    args = ["predict", "--model", model, *map(str, paths[:4]), "--top-k", "1"]
    lines = [json.loads(line) for line in CliRunner().invoke(main, args + ["--json"]).stdout
             .splitlines()]
    assert [line["unknown"] for line in lines] == [s < 0.5 for s in scores[:4]]
    # a threshold above every score: every image is none of the classes
    monkeypatch.setattr(OnnxClassifier, "ood_threshold", property(lambda self: 1.01))
    table = CliRunner().invoke(main, args)
    assert table.output.count("unknown (in_distribution ") == 4, table.output
    assert "4 unknown" in table.stderr and "per class: unknown 4" in table.stderr
    out = tmp_path / "p.csv"
    assert CliRunner().invoke(main, args + ["--out", str(out)]).exit_code == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["unknown"] for r in rows] == ["true"] * 4
    assert [float(r["in_distribution"]) for r in rows] == pytest.approx(scores[:4], abs=1e-6)
    # a model without the output: no score, nothing unknown
    plain = tmp_path / "plain.onnx"
    run(ExportParams(threads=2, variants=(), ood="none"), root / "model.safetensors",
        root / "model.json", root / "prepared", plain, tmp_path / "v", tmp_path / "e.json")
    monkeypatch.undo()
    (result,) = OnnxClassifier(plain).predict_files(paths[:1])
    assert result.in_distribution is None and not result.unknown
    assert OnnxClassifier(plain).ood_threshold is None


def test_a_detector_the_files_do_not_reproduce_ships_without_the_output(exported, tmp_path,
                                                                        monkeypatch):
    """The classifier passed its checks; only the detector's failed: the export ships the
    classifier alone and says why, it does not fail."""
    from pipeline.stages import export as export_module

    root, _ = exported
    monkeypatch.setattr(export_module, "OOD_TOLERANCE", -1.0)
    report = run(ExportParams(threads=2, variants=()), root / "model.safetensors",
                 root / "model.json", root / "prepared", tmp_path / "m.onnx", tmp_path / "v",
                 tmp_path / "e.json")
    assert report["outputs"] == ["probabilities"] and report["variants"]["fp32"]["passed"]
    reason = report["out_of_distribution"]["reason"]
    assert report["out_of_distribution"]["method"] == "none"
    assert reason.startswith("its check failed: fp32 in_distribution differs from PyTorch")
    assert json.loads((tmp_path / "m.onnx.json").read_text())["out_of_distribution"] == {
        "method": "none"}
