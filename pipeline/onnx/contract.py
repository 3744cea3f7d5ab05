"""The model contract: one table of ``metadata_props`` keys, read by the writer and the reader.

``pipeline export`` stamps every ONNX file with these keys (:func:`encode_metadata`) and the
runner, bench and card read them back (:func:`decode_metadata`): the key names, their order,
their encoding and which ones a reader needs are defined once, in :data:`FIELDS`. No torch here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

CONTRACT = "pipeline-image-classifier/1"
INPUT_NAME = "image"
# the optional second output: in [0, 1], higher = more like the training data; the
# ``out_of_distribution`` key says how it was fitted and where an app should cut it
OOD_OUTPUT = "in_distribution"


def _text(value: Any) -> str:
    return str(value)


def _bool(value: Any) -> str:
    return "true" if value else "false"


@dataclass(frozen=True)
class Field:
    """One metadata key: how a value is written as text and read back; ``required`` keys are
    the ones a reader needs to run the model."""

    key: str
    encode: Callable[[Any], str] = _text
    decode: Callable[[str], Any] = str
    required: bool = False


FIELDS: tuple[Field, ...] = (
    Field("contract", required=True),
    Field("classes", json.dumps, json.loads, required=True),
    Field("input_name", required=True),
    Field("input_layout", required=True),          # NHWC (uint8) | NCHW (float32, normalised)
    Field("input_dtype", required=True),           # uint8 | float32
    Field("input_size", _text, int, required=True),
    Field("input_normalized_in_graph", _bool, lambda s: s == "true"),
    # true: any H x W (one size per batch); resize and centre crop run inside the graph
    Field("input_resized_in_graph", _bool, lambda s: s == "true"),
    Field("resize_size", _text, int, required=True),
    Field("interpolation", required=True),
    Field("crop"),
    Field("resize_policy"),
    Field("scale"),
    Field("mean", json.dumps, lambda s: tuple(json.loads(s)), required=True),
    Field("std", json.dumps, lambda s: tuple(json.loads(s)), required=True),
    Field("outputs", json.dumps, json.loads, required=True),
    Field("precision"),                            # fp32 | fp16 | int8 (the network's math)
    Field("probability_calibration"),
    Field("temperature", lambda t: repr(float(t)), float),
    Field("backbone"),
    Field("backbone_weights"),
    # last | the block group the features end at (an int)
    Field("backbone_layer", _text, lambda s: int(s) if s.isdigit() else s),
    Field("pipeline_version"),
    Field("training_metrics", json.dumps, json.loads),
    Field("training_manifest_sha256"),
    Field("finetune", json.dumps, json.loads),
    # {"method", "threshold" (on in_distribution), "score_threshold", "scale", "tpr_on_val"}
    # or {"method": "none", "reason": ...}
    Field("out_of_distribution", json.dumps, json.loads),
    # which file of the export this is (fp32 | fp16 | int8 | int8_openvino, VARIANTS' keys)
    # and the engines export ran it in and found it within its variant's limit there: an app
    # or `--providers auto` offers the file to those engines only
    Field("variant"),
    Field("engines", json.dumps, json.loads),
)
KEYS = tuple(f.key for f in FIELDS)


# the inference engines export checks every file in (when installed): onnxruntime's CPU
# provider, and OpenVINO (its plugin EP on Intel CPUs, the runtime itself elsewhere)
ENGINES = ("onnxruntime", "openvino")


def engine_of(provider: str) -> str:
    """The engine behind a short provider name (cpu, cuda, tensorrt: onnxruntime)."""
    return "openvino" if provider == "openvino" else "onnxruntime"


@dataclass(frozen=True)
class VariantFile:
    """One file of ``models/variants/``: its name, the precision its network computes in and
    the engine it is made for (its gate must pass there, or export fails)."""

    file: str
    precision: str  # fp32 | fp16 | int8 (the contract's ``precision`` key)
    engine: str = "onnxruntime"


# The variants `pipeline export` writes beside the shipped model.onnx (raw pixels in, FP32),
# one table for the writer (export) and the readers (bench, the runner, docs); each takes the
# fixed-size crop. export.variants picks among the keys after "fixed" (always written).
VARIANTS: dict[str, VariantFile] = {
    "fixed": VariantFile("model.fixed.onnx", "fp32"),
    "fp16": VariantFile("model.fp16.onnx", "fp16"),
    # onnxruntime's static QDQ quantisation: accurate in onnxruntime; OpenVINO executes the
    # same Q/DQ pairs with other rounding and lost 4.5 test points with it (AMD EPYC)
    "int8": VariantFile("model.int8.onnx", "int8"),
    # NNCF's post-training quantisation (symmetric, bias-corrected) for OpenVINO; onnxruntime
    # runs it too, but fuses few of its Q/DQ pairs and is then slower than FP32
    "int8_openvino": VariantFile("model.int8.openvino.onnx", "int8", engine="openvino"),
}


def resize_policy(resize_size: int, input_size: int, interpolation: str,
                  in_graph: bool = False) -> str:
    """The resize and crop, in words: done by the graph, or what an app must do before it."""
    geometry = (f"resize the shorter side to {resize_size} px ({interpolation}, antialiased), "
                f"then centre-crop {input_size} x {input_size}; RGB")
    if in_graph:
        return f"inside the graph: {geometry}; give it decoded RGB uint8 pixels of any size"
    return geometry


def sidecar_path(model_path: Any) -> Any:
    """``model.onnx`` -> ``model.onnx.json``: the contract as JSON, for apps (onnxruntime-node
    and -web expose no ONNX metadata to JavaScript)."""
    from pathlib import Path

    return Path(f"{model_path}.json")


# keys added after the first contract: a writer that does not give them writes these
DEFAULTS: dict[str, Any] = {"out_of_distribution": {"method": "none"}, "variant": "fp32",
                             "engines": list(ENGINES)}


def encode_metadata(values: dict[str, Any]) -> dict[str, str]:
    """Typed values -> ``metadata_props`` text, in table order; every key must be given
    (those in :data:`DEFAULTS` may be left out)."""
    values = DEFAULTS | values
    missing = [k for k in KEYS if k not in values]
    unknown = sorted(set(values) - set(KEYS))
    if missing or unknown:
        raise ValueError(f"model metadata: missing {missing}, unknown {unknown}")
    return {f.key: f.encode(values[f.key]) for f in FIELDS}


def decode_metadata(meta: dict[str, str]) -> dict[str, Any]:
    """``metadata_props`` text -> typed values; raises KeyError naming a missing required key
    and ValueError/TypeError for a malformed value. Unknown keys are kept as text."""
    out: dict[str, Any] = {}
    for f in FIELDS:
        if f.key in meta:
            out[f.key] = f.decode(meta[f.key])
        elif f.required:
            raise KeyError(f.key)
    return out
