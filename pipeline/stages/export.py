"""Stage export: one self-describing ONNX file that other programs use as is.

Exports the fine-tuned model (or the head-only model when fine-tuning is off: both come as
``models/model.safetensors`` + ``models/model.json``) as backbone + head in one graph:

* ``--out`` (``models/model.onnx``), input ``image``: decoded RGB ``uint8`` pixels
  ``[N, H, W, 3]`` of any size (one size per batch). The graph resizes the shorter side, crops
  the centre (:mod:`pipeline.core.resize_graph`, the same nodes training runs), scales,
  normalises and changes the layout itself: an app decodes and calls it. With
  ``export.input: float32_nchw`` it takes a normalised ``float32`` NCHW crop instead.
* ``--variants-dir``: ``model.fixed.onnx``, the same network at the fixed ``input_size`` square
  (uint8 NHWC; for engines that ignore or refuse antialiased Resize: OpenVINO, TensorRT,
  onnxruntime-web's WebGPU), and the FP16/INT8 variants of it.
* next to every file, ``<file>.json``: the same contract as its ``metadata_props`` (one table,
  :mod:`pipeline.onnx.contract`), for apps that cannot read ONNX metadata (onnxruntime-node
  and -web).
* outputs ``probabilities`` (softmax) and, with ``export.logits_output: true``, ``logits``.
  With ``export.probability_calibration: temperature`` (default) the probabilities are
  calibrated: softmax(logits / T) with T fitted on the val split and bounded so a val split
  with few errors cannot make the model over-confident; shipped only when a cross-fitted check
  on val says it helps (else the plain softmax; :mod:`pipeline.core.calibration`).
  ``logits`` stay raw. NLL, ECE and Brier score before/after land in ``reports/export.json``
  and reliability tables in ``--plots``.
* ``metadata_props``: classes, input contract, resize/crop policy, mean/std, backbone, package
  version, training metrics, training manifest hash (see :mod:`pipeline.onnx.runner`).

Every export is checked and the figures land in ``reports/export.json``: ``onnx.checker`` (full
check); onnxruntime versus the PyTorch model on real test images (max |diff| of probabilities
and logits, target <= ``export.tolerance``); top-1 agreement on the whole test split (100 % for
FP32, for the shipped raw-pixel model fed the original images and for the fixed graph), and
the in-graph resize against Pillow's on the test images and on odd sizes. Variants: ``fp16`` (agreement >= ``fp16_min_agreement``) and
``int8`` (static QDQ by onnxruntime's quantisation tools, calibrated on training images; test
accuracy within ``int8_max_accuracy_drop`` of FP32). A check over its limit fails the stage and
no output is replaced.

Run: ``pipeline export --model models/model.safetensors --config models/model.json ...``
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..core.atomic import atomic_dir, atomic_file, write_csv, write_json
from ..core.config import ExportParams
from ..core.copies import PreparedImages
from ..core.dataset import read_prepared
from ..core.errors import PipelineError
from ..core.preprocess import Preprocessing, normalize, resize_and_crop
from ..core.runtime import resolve_threads
from ..onnx.contract import (
    CONTRACT,
    INPUT_NAME,
    VARIANT_FILES,
    encode_metadata,
    resize_policy,
    sidecar_path,
)
from ..onnx.convert import (
    deployable,
    drop_logits_output,
    export_fp16,
    export_int8,
    write_model,
    write_sidecar,
)


def metadata(config: dict[str, Any], params: ExportParams, outputs: list[str],
             temperature: float = 1.0, resized_in_graph: bool = False,
             calibrated: bool = False) -> dict[str, str]:
    """The model's ``metadata_props`` (keys and encodings from :mod:`pipeline.onnx.contract`)."""
    pp = config["preprocessing"]
    uint8 = params.input == "uint8_nhwc"
    return encode_metadata({
        "contract": CONTRACT,
        "classes": config["classes"],
        "input_name": INPUT_NAME,
        "input_layout": "NHWC" if uint8 else "NCHW",
        "input_dtype": "uint8" if uint8 else "float32",
        "input_size": pp["input_size"],
        "input_normalized_in_graph": uint8,
        "input_resized_in_graph": resized_in_graph,
        "resize_size": pp["resize_size"],
        "interpolation": pp["interpolation"],
        "crop": "center",
        "resize_policy": resize_policy(pp["resize_size"], pp["input_size"], pp["interpolation"],
                                       resized_in_graph),
        "scale": "1/255",
        "mean": pp["mean"],
        "std": pp["std"],
        "outputs": outputs,
        "probability_calibration": "temperature" if calibrated else "none",
        "temperature": temperature,
        "backbone": config["backbone"]["name"],
        "backbone_weights": config["backbone"]["weights"],
        "pipeline_version": __version__,
        "training_metrics": config.get("metrics", {}),
        "training_manifest_sha256": config["manifest_sha256"],
        "finetune": config.get("cut", {}),
    })


def export_fp32(classifier: Any, config: dict[str, Any], params: ExportParams,
                path: Path, temperature: float = 1.0, calibrated: bool = False) -> dict[str, Any]:
    """Export the fixed-size network, simplify (constant folding + shape inference) and stamp
    the metadata."""
    import onnx
    import torch

    from ..onnx.convert import export_module

    pp = Preprocessing.from_dict(config["preprocessing"])
    wrapped = deployable(classifier, pp, params.input, temperature)
    size = pp.input_size
    example = (torch.zeros(2, size, size, 3, dtype=torch.uint8) if params.input == "uint8_nhwc"
               else torch.zeros(2, 3, size, size))
    with tempfile.TemporaryDirectory() as work:
        raw = export_module(wrapped, example, Path(work) / "raw.onnx", input_name="image",
                            output_names=("probabilities", "logits"), opset=params.opset)
        model = onnx.load(str(raw))
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    outputs = [o.name for o in model.graph.output]
    del model.metadata_props[:]
    for key, value in metadata(config, params, outputs, temperature,
                               calibrated=calibrated).items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name, model.producer_version = "pipeline", __version__
    onnx.checker.check_model(model, full_check=True)
    write_model(model, path)
    return {"nodes": len(model.graph.node), "initializers": len(model.graph.initializer),
            "simplified_by": "torch.onnx dynamo export with onnxscript's optimizer (constant "
                             "folding, dead-code elimination), then onnx shape inference"}


def export_raw(fixed_path: Path, path: Path, config: dict[str, Any], params: ExportParams,
               temperature: float, calibrated: bool) -> dict[str, Any]:
    """The shipped model: the resize-and-crop graph in front of the fixed-size network."""
    import onnx

    from ..onnx.convert import add_resize_and_crop

    pp = config["preprocessing"]
    model = add_resize_and_crop(onnx.load(str(fixed_path)), pp["resize_size"],
                                pp["input_size"], pp["interpolation"])
    outputs = [o.name for o in model.graph.output]
    del model.metadata_props[:]
    for key, value in metadata(config, params, outputs, temperature, resized_in_graph=True,
                               calibrated=calibrated).items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model, full_check=True)
    write_model(model, path)
    return {"nodes": len(model.graph.node), "resize": "onnxruntime Resize (opset 18) on the "
            "uint8 tensor, antialiased, sizes and crop offsets computed in the graph"}


def _decoded(images: PreparedImages, keys: list[str]) -> list[np.ndarray]:
    return [images.rgb(k) for k in keys]


def _run_raw(path: Path, images: list[np.ndarray],
             threads: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Run the raw-pixel model, consecutive images of one size batched together."""
    import onnxruntime as ort

    from ..onnx.sessions import session_options

    session = ort.InferenceSession(str(path), session_options(threads),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    probs: list[np.ndarray] = []
    logits: list[np.ndarray] = []
    start = 0
    while start < len(images):
        end = start + 1
        while (end < len(images) and end - start < 32
               and images[end].shape == images[start].shape):
            end += 1
        out = dict(zip(names, session.run(None, {"image": np.stack(images[start:end])})))
        probs.append(out["probabilities"])
        if "logits" in out:
            logits.append(out["logits"])
        start = end
    return np.concatenate(probs), (np.concatenate(logits) if logits else None)


ODD_SIZES = ((7, 5), (97, 211), (211, 97), (1000, 750), (513, 511), (31, 400))


def preprocessing_check(classifier: Any, raw_path: Path, images: list[np.ndarray],
                        crops: np.ndarray, pp: Preprocessing, temperature: float, threads: int,
                        probe: int = 8) -> dict[str, Any]:
    """The in-graph resize on images of many sizes (the first ``probe`` test images resized to
    tall, wide, tiny, large and odd shapes): the shipped model, fed those raw pixels, against
    the PyTorch model on the training preprocessing of the same pixels; and how far Pillow's
    own resampling (what an app resizing by itself gets) is from it, in grey levels.
    ``crops`` are the training preprocessing of ``images`` (already made by the caller)."""
    from PIL import Image

    from ..core.calibration import softmax
    from ..core.preprocess import pillow_resize_and_crop

    def pillow_levels(batch: list[np.ndarray], crops: np.ndarray) -> int:
        return max(int(np.abs(crop.astype(int) - pillow_resize_and_crop(
            Image.fromarray(x), pp).astype(int)).max()) for x, crop in zip(batch, crops))

    odd = [np.asarray(Image.fromarray(x).resize(size, Image.Resampling.BICUBIC))
           for x in images[:probe] for size in ODD_SIZES]
    odd_crops = np.stack([resize_and_crop(x, pp) for x in odd])
    probs, _ = _run_raw(raw_path, odd, threads)
    ref = _logits(classifier, odd_crops, pp)
    return {"resize_in_graph": True, "training_uses_the_same_graph": True,
            "odd_sizes": [list(size) for size in ODD_SIZES], "odd_size_images": len(odd),
            "odd_size_top1_agreement": float((probs.argmax(1) == ref.argmax(1)).mean()),
            "odd_size_max_abs_diff_probabilities": float(
                np.abs(probs - softmax(ref, temperature)).max()),
            "test_images_max_levels_vs_pillow": pillow_levels(images, crops),
            "odd_size_max_levels_vs_pillow": pillow_levels(odd, odd_crops)}


def _images(images: PreparedImages, keys: list[str], pp: Preprocessing) -> np.ndarray:
    return np.stack([images.crop(k, pp) for k in keys])


def _run_ort(path: Path, pixels: np.ndarray, params: ExportParams, pp: Preprocessing,
             batch: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
    import onnxruntime as ort

    from ..onnx.sessions import session_options

    session = ort.InferenceSession(str(path), session_options(params.threads),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    probs, logits = [], []
    for s in range(0, len(pixels), batch):
        x = pixels[s:s + batch]
        if params.input != "uint8_nhwc":
            x = normalize(x, pp)
        out = dict(zip(names, session.run(None, {"image": x})))
        probs.append(out["probabilities"])
        if "logits" in out:
            logits.append(out["logits"])
    return np.concatenate(probs), (np.concatenate(logits) if logits else None)


def _logits(classifier: Any, pixels: np.ndarray, pp: Preprocessing) -> np.ndarray:
    import torch

    with torch.no_grad():
        return torch.cat([classifier(torch.from_numpy(normalize(pixels[s:s + 32], pp)))
                          for s in range(0, len(pixels), 32)]).numpy()


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The figures ``dvc metrics show`` compares across runs; the rest is in the report:
    the shipped FP32 file's test accuracy, its calibrated test ECE and the INT8 accuracy drop."""
    variants = report["variants"]
    out = {"test_acc": variants["fp32"]["test_accuracy"],
           "ece": report["calibration"]["test"]["after"]["ece"]}
    if "int8" in variants:
        out["int8_drop"] = variants["fp32"]["test_accuracy"] - variants["int8"]["test_accuracy"]
    return out


def run(params: ExportParams, model_path: str | Path, config_path: str | Path,
        prepared_dir: str | Path, out_path: str | Path, variants_dir: str | Path,
        report_path: str | Path, plots_dir: str | Path | None = None,
        metrics_path: str | Path | None = None) -> dict[str, Any]:
    """Export ``out_path`` and the variants into ``variants_dir``; check; write metrics (and
    the reliability tables of the test split into ``plots_dir``)."""
    import torch

    from ..core.calibration import (
        calibration_report,
        choose_temperature,
        reliability,
        softmax,
    )
    from ..core.model import load_model

    threads = resolve_threads(params.threads)
    torch.set_num_threads(threads)
    out_path, variants_dir = Path(out_path), Path(variants_dir)
    classifier, config = load_model(model_path, config_path)
    pp = Preprocessing.from_dict(config["preprocessing"])
    summary, classes, rows = read_prepared(prepared_dir)
    if classes != config["classes"]:
        raise PipelineError(f"{config_path}: the model's classes differ from {prepared_dir}; "
                            "re-run the chain (dvc repro)")
    images = PreparedImages(prepared_dir)
    images.require(pp.resize_size)
    test = [r for r in rows if r["split"] == "test"]
    val = [r for r in rows if r["split"] == "val"]
    train = [r for r in rows if r["split"] == "train"]
    if not test:
        raise PipelineError(f"{prepared_dir}: the test split is empty; export checks need it")
    if params.probability_calibration == "temperature" and not val:
        raise PipelineError(f"{prepared_dir}: the val split is empty, so the temperature cannot "
                            "be fitted; set prepare.val_fraction > 0 or "
                            "export.probability_calibration: none")
    raw_input = params.input == "uint8_nhwc"
    step = max(1, len(train) // params.calibration_images)
    calib_rows = train[::step][:params.calibration_images]
    test_decoded = _decoded(images, [r["path"] for r in test])
    test_pixels = np.stack([resize_and_crop(x, pp) for x in test_decoded])
    test_labels = np.array([classes.index(r["label"]) for r in test])
    ref_logits_np = _logits(classifier, test_pixels, pp)
    val_labels = np.array([classes.index(r["label"]) for r in val], dtype=np.int64)
    val_logits = (_logits(classifier, _images(images, [r["path"] for r in val], pp),
                          pp) if val else np.zeros((0, len(classes)), np.float32))
    fit = (choose_temperature(val_logits, val_labels, params.reliability_bins)
           if params.probability_calibration == "temperature" else None)
    temperature = fit["temperature"] if fit else 1.0
    calibrated = bool(fit and fit["applied"])
    calibration = calibration_report(val_logits, val_labels, ref_logits_np, test_labels,
                                     temperature, "temperature" if calibrated else "none",
                                     params.reliability_bins, fit)
    if fit and not calibrated:
        calibration["fallback"] = ("plain softmax: temperature scaling fitted on part of val "
                                   "made the other part worse (NLL or ECE)")
    ref_probs = softmax(ref_logits_np, temperature).astype(np.float32)
    ref_top1 = ref_logits_np.argmax(1)
    n_check = min(params.check_images, len(test_pixels))

    report: dict[str, Any] = {"opset": params.opset, "input": params.input,
                              "test_images": len(test), "check_images": n_check,
                              "pytorch_test_accuracy": float((ref_top1 == test_labels).mean()),
                              "calibration": calibration, "variants": {}}
    failures = []
    with tempfile.TemporaryDirectory() as work:
        # "fp32" is the shipped file (raw pixels in); the others take the fixed-size crop
        staged = {"fp32": Path(work) / out_path.name}
        fixed = Path(work) / (VARIANT_FILES["fixed"] if raw_input else out_path.name)
        if raw_input:
            staged["fixed"] = fixed
        staged |= {v: Path(work) / VARIANT_FILES[v] for v in params.variants}
        report["graph"] = export_fp32(classifier, config, params, fixed, temperature,
                                      calibrated)
        if raw_input:
            report["graph"]["raw"] = export_raw(fixed, staged["fp32"], config, params,
                                                temperature, calibrated)
            report["preprocessing"] = preprocessing_check(classifier, staged["fp32"],
                                                          test_decoded, test_pixels, pp,
                                                          temperature, threads)
        if "fp16" in staged:
            export_fp16(fixed, staged["fp16"])
        if "int8" in staged:
            calib = _images(images, [r["path"] for r in calib_rows], pp)
            if not raw_input:
                calib = normalize(calib, pp)
            source = fixed
            if not params.logits_output:  # quantise the graph that ships: a logits output
                source = Path(work) / "fp32_probabilities_only.onnx"  # changes the QDQ plan
                shutil.copyfile(fixed, source)
                drop_logits_output(source)
            export_int8(source, staged["int8"], calib, params.int8_calibration,
                        params.int8_reduce_range)
            report["calibration_images"] = len(calib)
        for variant, path in staged.items():
            if variant == "fp32" and raw_input:  # the original images, as an app has them
                probs, logits = _run_raw(path, test_decoded, params.threads)
            else:
                probs, logits = _run_ort(path, test_pixels, params, pp)
            top1 = probs.argmax(1)
            row = {
                "file": path.name,
                "input": ("raw RGB uint8 [N, H, W, 3], any size" if variant == "fp32"
                          and raw_input else f"{pp.input_size} x {pp.input_size} crop"),
                "bytes": path.stat().st_size,
                "max_abs_diff_probabilities": float(np.abs(probs[:n_check] -
                                                           ref_probs[:n_check]).max()),
                "max_abs_diff_logits": (None if logits is None else float(
                    np.abs(logits[:n_check] - ref_logits_np[:n_check]).max())),
                "top1_agreement": float((top1 == ref_top1).mean()),
                "test_accuracy": float((top1 == test_labels).mean()),
            }
            report["variants"][variant] = row
            failures += _check(variant, row, report, params)
        if raw_input and report["preprocessing"]["odd_size_top1_agreement"] < 1.0:
            failures.append(f"the shipped model disagrees with PyTorch on "
                            f"{1 - report['preprocessing']['odd_size_top1_agreement']:.1%} of "
                            "the odd-size images (in-graph resize)")
        if failures:
            raise PipelineError("export checks failed, nothing written: " + "; ".join(failures))
        if not params.logits_output:
            for path in staged.values():
                drop_logits_output(path)
        report["outputs"] = ["probabilities"] + (["logits"] if params.logits_output else [])
        for path in staged.values():
            write_sidecar(path)
        with atomic_dir(variants_dir) as tmp:
            for variant in staged:
                if variant != "fp32":
                    for f in (staged[variant], sidecar_path(staged[variant])):
                        shutil.copyfile(f, tmp / f.name)
        with atomic_file(sidecar_path(out_path)) as tmp:
            shutil.copyfile(sidecar_path(staged["fp32"]), tmp)
        with atomic_file(out_path) as tmp:
            shutil.copyfile(staged["fp32"], tmp)
    if plots_dir is not None:
        for name, t in (("uncalibrated", 1.0), ("calibrated", temperature)):
            write_csv(Path(plots_dir) / f"{name}.csv", ("confidence", "accuracy", "count"),
                      ((f"{r['confidence']:.6g}", f"{r['accuracy']:.6g}", r["count"])
                       for r in reliability(softmax(ref_logits_np, t), test_labels,
                                            params.reliability_bins)))
    write_json(report_path, report)
    if metrics_path is not None:
        write_json(metrics_path, headline(report))
    _print_calibration(calibration)
    for variant, row in report["variants"].items():
        print(f"export {variant:5s} {row['file']:22s} {row['bytes'] / 1e6:6.1f} MB  max |diff| "
              f"probs {row['max_abs_diff_probabilities']:.2e}  top-1 agreement "
              f"{row['top1_agreement']:.4f}  test accuracy {row['test_accuracy']:.4f}")
    return report


def _check(variant: str, row: dict[str, Any], report: dict[str, Any],
           params: ExportParams) -> list[str]:
    fp32_acc = report["variants"].get("fp32", row)["test_accuracy"]
    failures = []
    if variant in ("fp32", "fixed"):
        row["passed"] = (row["max_abs_diff_probabilities"] <= params.tolerance
                         and (row["max_abs_diff_logits"] is None
                              or row["max_abs_diff_logits"] <= params.tolerance)
                         and row["top1_agreement"] == 1.0)
        if not row["passed"]:
            failures.append(f"{variant} differs from PyTorch (max |diff| probabilities "
                            f"{row['max_abs_diff_probabilities']:.3g}, logits "
                            f"{row['max_abs_diff_logits']}, top-1 agreement "
                            f"{row['top1_agreement']:.4f}; limit export.tolerance="
                            f"{params.tolerance:g} and 100 %)")
    elif variant == "fp16":
        row["passed"] = row["top1_agreement"] >= params.fp16_min_agreement
        if not row["passed"]:
            failures.append(f"fp16 top-1 agreement {row['top1_agreement']:.4f} < "
                            f"export.fp16_min_agreement={params.fp16_min_agreement}")
    else:
        row["accuracy_drop_vs_fp32"] = fp32_acc - row["test_accuracy"]
        row["passed"] = row["accuracy_drop_vs_fp32"] <= params.int8_max_accuracy_drop + 1e-12
        if not row["passed"]:
            failures.append(f"int8 test accuracy {row['test_accuracy']:.4f} is "
                            f"{row['accuracy_drop_vs_fp32']:.4f} below fp32 (limit "
                            f"export.int8_max_accuracy_drop={params.int8_max_accuracy_drop})")
    return failures


def _print_calibration(calibration: dict[str, Any]) -> None:
    if calibration["method"] == "none":
        print("export: probabilities not calibrated (export.probability_calibration: none)")
        return
    parts = [f"export: temperature {calibration['temperature']:.4f} (fitted on val)"]
    for split in ("val", "test"):
        if split in calibration:
            b, a = calibration[split]["before"], calibration[split]["after"]
            parts.append(f"{split} NLL {b['nll']:.4f} -> {a['nll']:.4f}, ECE {b['ece']:.4f} -> "
                         f"{a['ece']:.4f}")
    print("; ".join(parts))
