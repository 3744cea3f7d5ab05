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
OUTPUT_NAMES = ("probabilities", "logits")


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
    Field("resize_size", _text, int, required=True),
    Field("interpolation", required=True),
    Field("crop"),
    Field("resize_policy"),
    Field("scale"),
    Field("mean", json.dumps, lambda s: tuple(json.loads(s)), required=True),
    Field("std", json.dumps, lambda s: tuple(json.loads(s)), required=True),
    Field("outputs", json.dumps, json.loads, required=True),
    Field("probability_calibration"),
    Field("temperature", lambda t: repr(float(t)), float),
    Field("backbone"),
    Field("backbone_weights"),
    Field("pipeline_version"),
    Field("training_metrics", json.dumps, json.loads),
    Field("training_manifest_sha256"),
    Field("finetune", json.dumps, json.loads),
)
KEYS = tuple(f.key for f in FIELDS)


def resize_policy(resize_size: int, input_size: int, interpolation: str) -> str:
    """The preprocessing an app must apply before the graph, in words."""
    return (f"resize the shorter side to {resize_size} px ({interpolation}), then centre-crop "
            f"{input_size} x {input_size}; RGB")


def encode_metadata(values: dict[str, Any]) -> dict[str, str]:
    """Typed values -> ``metadata_props`` text, in table order; every key must be given."""
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
