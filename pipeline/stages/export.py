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
the in-graph resize against Pillow's on the test images and on odd sizes. Variants: ``fp16`` (agreement >= ``fp16_min_agreement``),
``int8`` (static QDQ by onnxruntime's quantisation tools, calibrated on training images; test
accuracy within ``int8_max_accuracy_drop`` of FP32) and ``int8_openvino`` (NNCF's quantiser, the
same limit, measured in OpenVINO). Each file is gated in the engine it is made for (the variant
table's ``engine``); a check over its limit there fails the stage and no output is replaced.
Every file is also run in the other engine where it is installed, and its ``engines`` metadata
lists the engines where it passed its gate: a file is offered to those engines only.

Run: ``pipeline export --model models/model.safetensors --config models/model.json ...``
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import __version__
from ..core.atomic import atomic_dir, atomic_file, write_csv, write_json
from ..core.config import ExportParams
from ..core.batches import shape_batches
from ..core.copies import PreparedImages
from ..core.dataset import read_prepared
from ..core.errors import PipelineError
from ..core.ood import TPR
from ..core.preprocess import Preprocessing, normalize, resize_and_crop
from ..core.runtime import resolve_threads
from ..onnx.contract import (
    CONTRACT,
    INPUT_NAME,
    ENGINES,
    OOD_OUTPUT,
    VARIANTS,
    encode_metadata,
    resize_policy,
    sidecar_path,
)
from ..onnx.convert import (
    deployable,
    drop_logits_output,
    export_fp16,
    export_int8,
    export_int8_openvino,
    set_metadata,
    write_model,
    write_sidecar,
)


def metadata(config: dict[str, Any], params: ExportParams, outputs: list[str],
             temperature: float = 1.0, resized_in_graph: bool = False,
             calibrated: bool = False,
             out_of_distribution: dict[str, Any] | None = None) -> dict[str, str]:
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
        "precision": "fp32",
        "probability_calibration": "temperature" if calibrated else "none",
        "temperature": temperature,
        "backbone": config["backbone"]["name"],
        "backbone_weights": config["backbone"]["weights"],
        "backbone_layer": config["backbone"].get("layer", "last"),
        "pipeline_version": __version__,
        "training_metrics": config.get("metrics", {}),
        "training_manifest_sha256": config["manifest_sha256"],
        "finetune": config.get("cut", {}),
        "out_of_distribution": out_of_distribution or {"method": "none"},
    })


def export_fp32(classifier: Any, config: dict[str, Any], params: ExportParams,
                path: Path, temperature: float = 1.0, calibrated: bool = False,
                detector: Any = None) -> dict[str, Any]:
    """Export the fixed-size network, simplify (constant folding + shape inference) and stamp
    the metadata."""
    import onnx
    import torch

    from ..onnx.convert import export_module

    from ..core.ood import torch_module

    pp = Preprocessing.from_dict(config["preprocessing"])
    wrapped = deployable(classifier, pp, params.input, temperature,
                         None if detector is None else torch_module(detector))
    size = pp.input_size
    example = (torch.zeros(2, size, size, 3, dtype=torch.uint8) if params.input == "uint8_nhwc"
               else torch.zeros(2, 3, size, size))
    with tempfile.TemporaryDirectory() as work:
        raw = export_module(wrapped, example, Path(work) / "raw.onnx", input_name="image",
                            output_names=("probabilities", "logits") + (
                                (OOD_OUTPUT,) if detector is not None else ()),
                            opset=params.opset)
        model = onnx.load(str(raw))
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    outputs = [o.name for o in model.graph.output]
    del model.metadata_props[:]
    for key, value in metadata(config, params, outputs, temperature, calibrated=calibrated,
                               out_of_distribution=_ood_entry(detector)).items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name, model.producer_version = "pipeline", __version__
    onnx.checker.check_model(model, full_check=True)
    write_model(model, path)
    return {"nodes": len(model.graph.node), "initializers": len(model.graph.initializer),
            "simplified_by": "torch.onnx dynamo export with onnxscript's optimizer (constant "
                             "folding, dead-code elimination), then onnx shape inference"}


def export_raw(fixed_path: Path, path: Path, config: dict[str, Any], params: ExportParams,
               temperature: float, calibrated: bool, detector: Any = None) -> dict[str, Any]:
    """The shipped model: the resize-and-crop graph in front of the fixed-size network."""
    import onnx

    from ..onnx.convert import add_resize_and_crop

    pp = config["preprocessing"]
    model = add_resize_and_crop(onnx.load(str(fixed_path)), pp["resize_size"],
                                pp["input_size"], pp["interpolation"])
    outputs = [o.name for o in model.graph.output]
    del model.metadata_props[:]
    for key, value in metadata(config, params, outputs, temperature, resized_in_graph=True,
                               calibrated=calibrated,
                               out_of_distribution=_ood_entry(detector)).items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model, full_check=True)
    write_model(model, path)
    return {"nodes": len(model.graph.node), "resize": "onnxruntime Resize (opset 18) on the "
            "uint8 tensor, antialiased, sizes and crop offsets computed in the graph"}


def _ood_entry(detector: Any) -> dict[str, Any]:
    return {"method": "none"} if detector is None else {"output": OOD_OUTPUT,
                                                       **detector.describe()}


def _decoded(images: PreparedImages, keys: list[str]) -> list[np.ndarray]:
    return [images.rgb(k) for k in keys]


def _run_raw(path: Path, images: list[np.ndarray], threads: int) -> dict[str, np.ndarray]:
    """Run the raw-pixel model on images of any sizes (one size per batch); every output, in
    input order."""
    import onnxruntime as ort

    from ..onnx.sessions import session_options

    session = ort.InferenceSession(str(path), session_options(threads),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs: dict[str, list[np.ndarray | None]] = {n: [None] * len(images) for n in names}
    for batch in shape_batches(images, 32):
        for name, values in zip(names, session.run(None, {"image": np.stack(
                [images[i] for i in batch])})):
            for i, v in zip(batch, values):
                outputs[name][i] = v
    return {name: np.stack(values) for name, values in outputs.items()}  # type: ignore[arg-type]


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
    probs = _run_raw(raw_path, odd, threads)["probabilities"]
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


def _session(path: Path, threads: int, engine: str) -> Any:
    """A session on ``engine``: onnxruntime's CPU provider, or OpenVINO (plugin EP or runtime)."""
    from ..onnx.sessions import new_session, session_options

    names = ["cpu"] if engine == "onnxruntime" else ["openvino", "cpu"]
    return new_session(path, names, session_options(threads))


def _run_fixed(path: Path, pixels: np.ndarray, params: ExportParams, pp: Preprocessing,
             batch: int = 32, engine: str = "onnxruntime") -> dict[str, np.ndarray]:
    """Every output of the fixed-size file ``path`` for crops ``pixels``, run by ``engine``."""
    session = _session(path, params.threads, engine)
    names = [o.name for o in session.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for s in range(0, len(pixels), batch):
        x = pixels[s:s + batch]
        if params.input != "uint8_nhwc":
            x = normalize(x, pp)
        for name, value in zip(names, session.run(None, {"image": x})):
            parts[name].append(value)
    return {name: np.concatenate(values) for name, values in parts.items()}


def _logits(classifier: Any, pixels: np.ndarray, pp: Preprocessing) -> np.ndarray:
    return _forward(classifier, pixels, pp)[1]


def _forward(classifier: Any, pixels: np.ndarray,
             pp: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features and logits of the PyTorch classifier for uint8 NHWC crops."""
    import torch

    feats, logits = [], []
    with torch.no_grad():
        for s in range(0, len(pixels), 32):
            f = classifier.backbone(torch.from_numpy(normalize(pixels[s:s + 32], pp)))
            feats.append(f)
            logits.append(classifier.head(f))
    if not feats:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def _split_forward(classifier: Any, images: PreparedImages, keys: list[str],
                   pp: Preprocessing, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_forward` over a split, ``chunk`` images in memory at a time."""
    parts = [_forward(classifier, _images(images, keys[s:s + chunk], pp), pp)
             for s in range(0, len(keys), chunk)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


OOD_TOLERANCE = 1e-2  # FP32 in_distribution (0..1) vs PyTorch: a sigmoid of 1,280-term sums


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The figures ``dvc metrics show`` compares across runs; the rest is in the report:
    the shipped FP32 file's test accuracy, its calibrated test ECE and the INT8 accuracy drop."""
    variants = report["variants"]
    out = {"test_acc": variants["fp32"]["test_accuracy"],
           "ece": report["calibration"]["test"]["after"]["ece"]}
    if "int8" in variants:
        out["int8_drop"] = variants["fp32"]["test_accuracy"] - variants["int8"]["test_accuracy"]
    return out


@dataclass
class Checks:
    """What every file is checked against, computed once: the test split as an app has it
    (decoded originals) and as the network sees it (crops), with the PyTorch reference."""

    decoded: list[np.ndarray]
    pixels: np.ndarray
    labels: np.ndarray
    ref_logits: np.ndarray
    ref_probs: np.ndarray
    n_check: int
    # the detector's check: its PyTorch output on the test crops and on probe images of no
    # class (None without a detector)
    ref_in: np.ndarray | None = None
    probes: np.ndarray | None = None
    ref_probe_in: np.ndarray | None = None
    # each FP16/INT8 file's own cut on in_distribution (95 % of val through that file); the
    # FP32 files keep the fitted 0.5
    thresholds: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def ref_top1(self) -> np.ndarray:
        return self.ref_logits.argmax(1)


def _exact_gate(variant: str, row: dict[str, Any], fp32_accuracy: float,
                params: ExportParams) -> str | None:
    """FP32 files: within ``export.tolerance`` of PyTorch and the same top-1 everywhere."""
    if (row["max_abs_diff_probabilities"] <= params.tolerance
            and (row["max_abs_diff_logits"] is None
                 or row["max_abs_diff_logits"] <= params.tolerance)
            and row["top1_agreement"] == 1.0):
        return None
    return (f"{variant} differs from PyTorch (max |diff| probabilities "
            f"{row['max_abs_diff_probabilities']:.3g}, logits {row['max_abs_diff_logits']}, "
            f"top-1 agreement {row['top1_agreement']:.4f}; limit export.tolerance="
            f"{params.tolerance:g} and 100 %)")


def _fp16_gate(variant: str, row: dict[str, Any], fp32_accuracy: float,
               params: ExportParams) -> str | None:
    if row["top1_agreement"] >= params.fp16_min_agreement:
        return None
    return (f"fp16 top-1 agreement {row['top1_agreement']:.4f} < "
            f"export.fp16_min_agreement={params.fp16_min_agreement}")


def _int8_gate(variant: str, row: dict[str, Any], fp32_accuracy: float,
               params: ExportParams) -> str | None:
    row["accuracy_drop_vs_fp32"] = fp32_accuracy - row["test_accuracy"]
    if row["accuracy_drop_vs_fp32"] <= params.int8_max_accuracy_drop + 1e-12:
        return None
    return (f"{variant} test accuracy {row['test_accuracy']:.4f} is "
            f"{row['accuracy_drop_vs_fp32']:.4f} below fp32 (limit "
            f"export.int8_max_accuracy_drop={params.int8_max_accuracy_drop})")


def _build_fp16(fixed: Path, out: Path, params: ExportParams, calibration: Any) -> dict[str, Any]:
    export_fp16(fixed, out)
    return {}


def _quantisation_source(fixed: Path, out: Path, params: ExportParams) -> Path:
    """The FP32 graph an INT8 file is quantised from: the one that ships (a logits output
    changes the QDQ plan), as a copy beside ``out`` when logits are dropped."""
    if params.logits_output:
        return fixed
    source = out.with_name("fp32_probabilities_only.onnx")
    shutil.copyfile(fixed, source)
    drop_logits_output(source)
    return source


def _build_int8(fixed: Path, out: Path, params: ExportParams, calibration: Any) -> dict[str, Any]:
    calib = calibration()
    export_int8(_quantisation_source(fixed, out, params), out, calib, params.int8_calibration,
                params.int8_reduce_range)
    return {"calibration_images": len(calib)}


def _build_int8_openvino(fixed: Path, out: Path, params: ExportParams,
                         calibration: Any) -> dict[str, Any]:
    missing = _openvino_missing()
    if missing:
        raise VariantUnavailable(missing)
    calib = calibration()
    source = _quantisation_source(fixed, out, params)
    started = time.perf_counter()
    export_int8_openvino(source, out, calib, params.int8_openvino_calibration_images)
    return {"int8_openvino_quantize_s": round(time.perf_counter() - started, 1)}


class VariantUnavailable(Exception):
    """A variant this machine cannot make (its library is missing): skipped, with the reason."""


def _openvino_missing() -> str | None:
    """Why OpenVINO files cannot be made or checked here (NNCF or the OpenVINO runtime
    missing), or None."""
    import importlib.util

    from ..onnx.sessions import unavailable_reason

    if importlib.util.find_spec("nncf") is None:
        return "NNCF is not installed (pip install nncf)"
    return unavailable_reason("openvino")


@dataclass(frozen=True)
class VariantStep:
    """How export makes a variant from the fixed-size FP32 file (None: it is that file) and
    the gate it must pass (a message when it fails)."""

    build: Callable[[Path, Path, ExportParams, Callable[[], np.ndarray]], dict[str, Any]] | None
    gate: Callable[[str, dict[str, Any], float, ExportParams], str | None]


# one entry per file of the contract's VARIANTS table; "fp32" is the shipped raw-pixel model
STEPS: dict[str, VariantStep] = {
    "fp32": VariantStep(None, _exact_gate),
    "fixed": VariantStep(None, _exact_gate),
    "fp16": VariantStep(_build_fp16, _fp16_gate),
    "int8": VariantStep(_build_int8, _int8_gate),
    "int8_openvino": VariantStep(_build_int8_openvino, _int8_gate),
}


def _ood_gate(variant: str, row: dict[str, Any], reference: dict[str, Any],
              params: ExportParams) -> str | None:
    """FP32 files: the in_distribution output within OOD_TOLERANCE of PyTorch. FP16/INT8
    (their features move, so each has its own threshold, set on val through that file): the
    share of test images that pass within ``export.ood_max_pass_change`` of PyTorch's, and no
    more probe images of no class pass."""
    if "in_distribution_max_abs_diff" not in row:
        return None
    if STEPS[variant].build is None:
        if row["in_distribution_max_abs_diff"] <= OOD_TOLERANCE:
            return None
        return (f"{variant} in_distribution differs from PyTorch by "
                f"{row['in_distribution_max_abs_diff']:.3g} (limit {OOD_TOLERANCE:g})")
    change = abs(row["test_in_distribution_pass_rate"] - reference["test_pass_rate"])
    if change > params.ood_max_pass_change + 1e-12:
        return (f"{variant} in_distribution passes {row['test_in_distribution_pass_rate']:.4f} "
                f"of test images against {reference['test_pass_rate']:.4f} in FP32 (limit "
                f"export.ood_max_pass_change={params.ood_max_pass_change})")
    if row["probe_in_distribution_pass_rate"] > reference["probe_pass_rate"] + 1e-12:
        return (f"{variant} in_distribution lets {row['probe_in_distribution_pass_rate']:.0%} "
                f"of the probe images of no class pass, FP32 {reference['probe_pass_rate']:.0%}")
    return None


def _check(variant: str, row: dict[str, Any], report: dict[str, Any],
           params: ExportParams) -> list[str]:
    """Apply the variant's gates to its measured ``row`` (sets ``passed``); the failures."""
    fp32_accuracy = report["variants"].get("fp32", row)["test_accuracy"]
    failures = [f for f in (STEPS[variant].gate(variant, row, fp32_accuracy, params),
                            _ood_gate(variant, row, report.get("out_of_distribution", {}), params))
                if f]
    row["passed"] = not failures
    return failures


def _engine_checks(variant: str, path: Path, row: dict[str, Any], checks: Checks,
                   report: dict[str, Any], params: ExportParams, pp: Preprocessing,
                   raw_input: bool) -> list[str]:
    """The file in every engine here (its own engine's row is ``row``): each engine's test
    accuracy, top-1 agreement and whether the variant's gate passes there, in
    ``row["engines"]``; returns the engines where it passed (its ``engines`` metadata)."""
    own = VARIANTS.get(variant, VARIANTS["fixed"]).engine
    row["engine"] = own
    row["engines"] = {own: {"test_accuracy": row["test_accuracy"],
                            "top1_agreement": row["top1_agreement"], "passed": row["passed"]}}
    passed = [own] if row["passed"] else []
    for engine in ENGINES:
        if engine == own:
            continue
        if variant == "fp32" and raw_input:  # OpenVINO ignores the antialiased in-graph resize
            row["engines"][engine] = {"passed": False, "reason": "resizes inside the graph "
                                      "with antialiasing, which OpenVINO ignores"}
            continue
        missing = _openvino_missing() if engine == "openvino" else None
        if missing:
            row["engines"][engine] = {"passed": False, "reason": missing}
            continue
        other = _measure(variant, path, dataclasses.replace(checks, ref_in=None), params, pp,
                         raw_input, engine)
        fp32_accuracy = report["variants"].get("fp32", row)["test_accuracy"]
        failure = STEPS[variant].gate(variant, other, fp32_accuracy, params)
        row["engines"][engine] = {"test_accuracy": other["test_accuracy"],
                                  "top1_agreement": other["top1_agreement"],
                                  "passed": failure is None} | (
            {"reason": failure} if failure else {})
        if failure is None:
            passed.append(engine)
    return passed


def _calibration(params: ExportParams, fit: dict[str, Any] | None) -> tuple[float, bool]:
    temperature = fit["temperature"] if fit else 1.0
    return temperature, bool(fit and fit["applied"])


def _measure(variant: str, path: Path, checks: Checks, params: ExportParams, pp: Preprocessing,
             raw_input: bool, engine: str = "onnxruntime") -> dict[str, Any]:
    """Run one file on the test split in ``engine`` and compare it with PyTorch."""
    raw = variant == "fp32" and raw_input
    if raw:  # the original images, as an app has them
        out = _run_raw(path, checks.decoded, params.threads)
    else:
        out = _run_fixed(path, checks.pixels, params, pp, engine=engine)
    probs, logits = out["probabilities"], out.get("logits")
    n = checks.n_check
    top1 = probs.argmax(1)
    row = {
        "file": path.name,
        "input": ("raw RGB uint8 [N, H, W, 3], any size" if variant == "fp32" and raw_input
                  else f"{pp.input_size} x {pp.input_size} crop"),
        "bytes": path.stat().st_size,
        "max_abs_diff_probabilities": float(np.abs(probs[:n] - checks.ref_probs[:n]).max()),
        "max_abs_diff_logits": (None if logits is None else float(
            np.abs(logits[:n] - checks.ref_logits[:n]).max())),
        "top1_agreement": float((top1 == checks.ref_top1).mean()),
        "test_accuracy": float((top1 == checks.labels).mean()),
    }
    if checks.ref_in is not None and checks.probes is not None:
        probe_out = (_run_raw(path, list(checks.probes), params.threads) if raw
                     else _run_fixed(path, checks.probes, params, pp, engine=engine))
        got = np.r_[out[OOD_OUTPUT], probe_out[OOD_OUTPUT]]
        ref = np.r_[checks.ref_in, checks.ref_probe_in]
        cut = checks.thresholds.get(variant, 0.5)
        row["in_distribution_threshold"] = cut
        row["in_distribution_max_abs_diff"] = float(np.abs(got - ref).max())
        row["in_distribution_agreement"] = float(((got >= cut) == (ref >= 0.5)).mean())
        row["test_in_distribution_pass_rate"] = float((out[OOD_OUTPUT] >= cut).mean())
        row["probe_in_distribution_pass_rate"] = float((probe_out[OOD_OUTPUT] >= cut).mean())
    return row


def _publish(staged: dict[str, Path], out_path: Path, variants_dir: Path,
             params: ExportParams) -> None:
    """Finish the checked files (outputs, sidecars) and move them into place, each
    atomically: the variants folder as a whole, then the sidecar, then the model."""
    if not params.logits_output:
        for path in staged.values():
            drop_logits_output(path)
    for path in staged.values():
        write_sidecar(path)
    with atomic_dir(variants_dir) as tmp:
        for variant, path in staged.items():
            if variant != "fp32":
                for f in (path, sidecar_path(path)):
                    shutil.copyfile(f, tmp / f.name)
    with atomic_file(sidecar_path(out_path)) as tmp:
        shutil.copyfile(sidecar_path(staged["fp32"]), tmp)
    with atomic_file(out_path) as tmp:
        shutil.copyfile(staged["fp32"], tmp)


def run(params: ExportParams, model_path: str | Path, config_path: str | Path,
        prepared_dir: str | Path, out_path: str | Path, variants_dir: str | Path,
        report_path: str | Path, plots_dir: str | Path | None = None,
        metrics_path: str | Path | None = None) -> dict[str, Any]:
    """Export ``out_path`` and the variants into ``variants_dir``; check; write metrics (and
    the reliability tables of the test split into ``plots_dir``)."""
    import torch

    from ..core.calibration import calibration_report, choose_temperature, reliability, softmax
    from ..core.model import load_model

    started = time.perf_counter()
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
    test, val, train = ([r for r in rows if r["split"] == name]
                        for name in ("test", "val", "train"))
    if not test:
        raise PipelineError(f"{prepared_dir}: the test split is empty; export checks need it")
    if params.probability_calibration == "temperature" and not val:
        raise PipelineError(f"{prepared_dir}: the val split is empty, so the temperature cannot "
                            "be fitted; set prepare.val_fraction > 0 or "
                            "export.probability_calibration: none")
    raw_input = params.input == "uint8_nhwc"

    # 1. the reference: PyTorch on the test split; the temperature fitted on val
    decoded = _decoded(images, [r["path"] for r in test])
    pixels = np.stack([resize_and_crop(x, pp) for x in decoded])
    labels = np.array([classes.index(r["label"]) for r in test])
    ref_features, ref_logits = _forward(classifier, pixels, pp)
    val_labels = np.array([classes.index(r["label"]) for r in val], dtype=np.int64)
    val_features, val_logits = (_split_forward(classifier, images, [r["path"] for r in val], pp)
                                if val else (None, np.zeros((0, len(classes)), np.float32)))
    fit = (choose_temperature(val_logits, val_labels, params.reliability_bins)
           if params.probability_calibration == "temperature" else None)
    temperature, calibrated = _calibration(params, fit)
    calibration = calibration_report(val_logits, val_labels, ref_logits, labels, temperature,
                                     "temperature" if calibrated else "none",
                                     params.reliability_bins, fit)
    if fit and not calibrated:
        calibration["fallback"] = ("plain softmax: temperature scaling fitted on part of val "
                                   "made the other part worse (NLL or ECE)")
    checks = Checks(decoded, pixels, labels, ref_logits,
                    softmax(ref_logits, temperature).astype(np.float32),
                    min(params.check_images, len(pixels)))
    from ..core.ood import probe_images as ood_probe_images

    detector, ood_report = fit_detector(params, classifier, images, train, val_features,
                                        val_logits, classes, pp)
    if detector is not None:
        from ..core.ood import torch_module

        module = torch_module(detector)
        checks.probes = ood_probe_images(pp.input_size)
        probe_features, probe_logits = _forward(classifier, checks.probes, pp)
        with torch.no_grad():
            checks.ref_in = module(torch.from_numpy(ref_features),
                                   torch.from_numpy(ref_logits)).numpy()
            checks.ref_probe_in = module(torch.from_numpy(probe_features),
                                         torch.from_numpy(probe_logits)).numpy()
        ood_report["test_pass_rate"] = round(float((checks.ref_in >= 0.5).mean()), 4)
        ood_report["probe_pass_rate"] = round(float((checks.ref_probe_in >= 0.5).mean()), 4)

    def val_pixels() -> np.ndarray:
        return _images(images, [r["path"] for r in val], pp)

    def calibration_pixels() -> np.ndarray:
        step = max(1, len(train) // params.calibration_images)
        calib = _images(images, [r["path"] for r in train[::step][:params.calibration_images]],
                        pp)
        return calib if raw_input else normalize(calib, pp)

    report: dict[str, Any] = {"opset": params.opset, "input": params.input,
                              "test_images": len(test), "check_images": checks.n_check,
                              "pytorch_test_accuracy": float((checks.ref_top1 == labels).mean()),
                              "calibration": calibration, "out_of_distribution": ood_report,
                              "variants": {}}
    while True:  # at most twice: without the detector when only its checks fail
        failures: list[str] = []
        with tempfile.TemporaryDirectory() as work:
            # 2. build every file: the fixed-size network, the shipped raw-pixel model in front
            # of it, then the variants made from the fixed one
            fixed = Path(work) / (VARIANTS["fixed"].file if raw_input else out_path.name)
            staged = {"fp32": Path(work) / out_path.name}
            report["graph"] = export_fp32(classifier, config, params, fixed, temperature,
                                          calibrated, detector)
            if raw_input:
                staged["fixed"] = fixed
                report["graph"]["raw"] = export_raw(fixed, staged["fp32"], config, params,
                                                    temperature, calibrated, detector)
                report["preprocessing"] = preprocessing_check(classifier, staged["fp32"], decoded,
                                                              pixels, pp, temperature, threads)
            report["skipped_variants"] = {}
            build_s: dict[str, float] = {}
            for variant in params.variants:
                variant_started = time.perf_counter()
                staged[variant] = Path(work) / VARIANTS[variant].file
                try:
                    report |= STEPS[variant].build(fixed, staged[variant], params,
                                                   calibration_pixels)
                except VariantUnavailable as why:
                    print(f"export: {variant} not made here: {why}")
                    report["skipped_variants"][variant] = str(why)
                    del staged[variant]
                    continue
                set_metadata(staged[variant], precision=VARIANTS[variant].precision,
                             variant=variant)
                if detector is not None:  # its features moved: its own cut, 95 % of val through it
                    val_in = _run_fixed(staged[variant], val_pixels(), params, pp,
                                      engine=VARIANTS[variant].engine)[OOD_OUTPUT]
                    checks.thresholds[variant] = round(float(np.quantile(val_in, 1 - TPR)), 6)
                    set_metadata(staged[variant], out_of_distribution=json.dumps(
                        _ood_entry(detector) | {"threshold": checks.thresholds[variant]}))
                build_s[variant] = round(time.perf_counter() - variant_started, 1)
            # 3. check every file against PyTorch; any gate that fails stops the stage
            for variant, path in staged.items():
                check_started = time.perf_counter()
                engine = VARIANTS.get(variant, VARIANTS["fixed"]).engine
                row = _measure(variant, path, checks, params, pp, raw_input, engine)
                report["variants"][variant] = row
                failures += _check(variant, row, report, params)
                engines = _engine_checks(variant, path, row, checks, report, params, pp,
                                         raw_input)
                set_metadata(path, engines=json.dumps(engines))
                # what this variant adds to the stage: its build (variants only; the FP32
                # files come with the export itself) and its checks in every engine
                row["build_s"] = build_s.get(variant)
                row["check_s"] = round(time.perf_counter() - check_started, 1)
            if raw_input and report["preprocessing"]["odd_size_top1_agreement"] < 1.0:
                failures.append(f"the shipped model disagrees with PyTorch on "
                                f"{1 - report['preprocessing']['odd_size_top1_agreement']:.1%} of "
                                "the odd-size images (in-graph resize)")
            if failures and detector is not None and all(OOD_OUTPUT in f for f in failures):
                # the classifier passed; the detector is not reproduced by the files: ship
                # without it and say why (report, card), never fail the export for it
                print(f"export: shipping without {OOD_OUTPUT}: " + "; ".join(failures))
                detector, checks.ref_in, checks.probes = None, None, None
                ood_report = {"method": "none", "reason": "its check failed: " +
                              "; ".join(failures)}
                report["out_of_distribution"], report["variants"] = ood_report, {}
                checks.thresholds.clear()
                continue
            if failures:
                raise PipelineError("export checks failed, nothing written: " + "; ".join(failures))
            # 4. publish
            report["outputs"] = (["probabilities"] + (["logits"] if params.logits_output else [])
                                 + ([OOD_OUTPUT] if detector is not None else []))
            _publish(staged, out_path, variants_dir, params)
        break
    if plots_dir is not None:
        for name, t in (("uncalibrated", 1.0), ("calibrated", temperature)):
            write_csv(Path(plots_dir) / f"{name}.csv", ("confidence", "accuracy", "count"),
                      ((f"{r['confidence']:.6g}", f"{r['accuracy']:.6g}", r["count"])
                       for r in reliability(softmax(ref_logits, t), labels,
                                            params.reliability_bins)))
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_json(report_path, report)
    if metrics_path is not None:
        write_json(metrics_path, headline(report))
    _print_calibration(calibration)
    if detector is not None:
        print(f"export: {OOD_OUTPUT} by {detector.method} (threshold 0.5 = score "
              f"{detector.threshold:.4g} on val); passes {ood_report['test_pass_rate']:.1%} of "
              f"test and {ood_report['probe_pass_rate']:.0%} of the probe images of no class")
    else:
        print(f"export: no {OOD_OUTPUT} output ({ood_report['reason']})")
    for variant, row in report["variants"].items():
        others = "; ".join(f"{e} {v['test_accuracy']:.4f}" + ("" if v["passed"] else " refused")
                           for e, v in row.get("engines", {}).items()
                           if e != row.get("engine") and "test_accuracy" in v)
        print(f"export {variant:13s} {row['file']:26s} {row['bytes'] / 1e6:6.1f} MB  max |diff| "
              f"probs {row['max_abs_diff_probabilities']:.2e}  top-1 agreement "
              f"{row['top1_agreement']:.4f}  test accuracy {row['test_accuracy']:.4f} "
              f"({row.get('engine', 'onnxruntime')}{'; ' + others if others else ''}); "
              + (f"built in {row['build_s']} s, " if row.get("build_s") is not None else "")
              + f"checked in {row['check_s']} s")
    print(f"export: {report['seconds']} s in all")
    return report


def fit_detector(params: ExportParams, classifier: Any, images: PreparedImages,
                 train: list[dict[str, str]], val_features: np.ndarray | None,
                 val_logits: np.ndarray, classes: list[str],
                 pp: Preprocessing) -> tuple[Any, dict[str, Any]]:
    """The out-of-distribution detector (``export.ood``) fitted on the train split's pooled
    features of the model being exported, threshold on val; or None and the reason."""
    from ..core import ood

    if params.ood == "none":
        return None, {"method": "none", "reason": "export.ood: none"}
    if len(train) < 2 or val_features is None or len(val_features) < 2:
        return None, {"method": "none", "reason": f"too few images to fit {params.ood} "
                      f"({len(train)} train, {0 if val_features is None else len(val_features)}"
                      " val; at least 2 of each)"}
    train_features, _ = _split_forward(classifier, images, [r["path"] for r in train], pp)
    train_labels = np.array([classes.index(r["label"]) for r in train], dtype=np.int64)
    detector = ood.fit(params.ood, train_features, train_labels, len(classes), val_features,
                       val_logits)
    entry: dict[str, Any] = {"output": OOD_OUTPUT, **detector.describe(),
                             "train_images": len(train), "feature_dim": int(train_features.shape[1])}
    if params.ood == "mahalanobis" and len(train) <= train_features.shape[1]:
        entry["note"] = (f"{len(train)} train images for {train_features.shape[1]} feature "
                         "dimensions: the shared covariance is Ledoit-Wolf shrunk, which keeps "
                         "it invertible")
    return detector, entry


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
