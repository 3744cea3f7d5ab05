"""The model contract: one metadata table, written by export and read by the runner."""

from __future__ import annotations

import json

import pytest

from pipeline.onnx.contract import (
    CONTRACT,
    FIELDS,
    KEYS,
    decode_metadata,
    encode_metadata,
    resize_policy,
)


def values() -> dict:
    return {
        "contract": CONTRACT, "classes": ["cat", "dog"], "input_name": "image",
        "input_layout": "NHWC", "input_dtype": "uint8", "input_size": 224,
        "input_normalized_in_graph": True, "input_resized_in_graph": True, "resize_size": 256, "interpolation": "bicubic",
        "crop": "center", "resize_policy": "words", "scale": "1/255", "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5), "outputs": ["probabilities"], "precision": "fp32",
        "probability_calibration": "none",
        "temperature": 1.0, "backbone": "efficientnet_lite0", "backbone_weights": "default",
        "backbone_layer": 5,
        "pipeline_version": "0.1.0", "training_metrics": {"test_accuracy": 0.9},
        "training_manifest_sha256": "ab", "finetune": {"blocks": 2},
        "out_of_distribution": {"method": "none"}, "variant": "fp32",
        "engines": ["onnxruntime", "openvino"],
    }


def test_round_trip_gives_back_every_typed_value():
    text = encode_metadata(values())
    assert list(text) == list(KEYS) and all(isinstance(v, str) for v in text.values())
    assert json.loads(text["classes"]) == ["cat", "dog"] and text["input_size"] == "224"
    assert decode_metadata(text) == values()
    one_engine = values() | {"variant": "int8_openvino", "engines": ["openvino"]}
    assert decode_metadata(encode_metadata(one_engine)) == one_engine


def test_a_writer_without_variant_and_engines_gets_the_defaults():
    """Files of older writers: the FP32 file, offered to every engine."""
    short = {k: v for k, v in values().items() if k not in ("variant", "engines")}
    typed = decode_metadata(encode_metadata(short))
    assert typed["variant"] == "fp32" and typed["engines"] == ["onnxruntime", "openvino"]


def test_false_flags_come_back_false():
    flags = {"input_normalized_in_graph": False, "input_resized_in_graph": False}
    text = encode_metadata(values() | flags)
    assert [text[k] for k in flags] == ["false", "false"]
    assert decode_metadata(text) == values() | flags


def test_the_resize_policy_says_who_resizes():
    outside = resize_policy(256, 224, "bicubic")
    assert outside == ("resize the shorter side to 256 px (bicubic, antialiased), then "
                       "centre-crop 224 x 224; RGB")
    inside = resize_policy(256, 224, "bicubic", in_graph=True)
    assert inside.startswith("inside the graph: ") and outside in inside
    assert inside.endswith("give it decoded RGB uint8 pixels of any size")


def test_encode_refuses_missing_or_unknown_keys():
    partial = values()
    del partial["temperature"]
    with pytest.raises(ValueError) as missing:
        encode_metadata(partial)
    assert str(missing.value) == "model metadata: missing ['temperature'], unknown []"
    with pytest.raises(ValueError) as unknown:
        encode_metadata(values() | {"surprise": 1})
    assert str(unknown.value) == "model metadata: missing [], unknown ['surprise']"


# what a reader cannot run the model without, written out here rather than read from the table
# under test (a key dropped from the table's required set must fail this test, not vanish from it)
REQUIRED = ("contract", "classes", "input_name", "input_layout", "input_dtype", "input_size",
            "resize_size", "interpolation", "mean", "std", "outputs")


def test_the_required_keys_are_the_ones_a_reader_needs():
    assert tuple(f.key for f in FIELDS if f.required) == REQUIRED


@pytest.mark.parametrize("key", REQUIRED)
def test_decode_names_a_missing_required_key(key):
    text = encode_metadata(values())
    del text[key]
    with pytest.raises(KeyError, match=key):
        decode_metadata(text)


def test_optional_keys_may_be_absent_and_unknown_keys_are_ignored():
    text = {k: v for k, v in encode_metadata(values()).items()
            if any(f.key == k and f.required for f in FIELDS)}
    decoded = decode_metadata(text | {"added_later": "x"})
    assert "temperature" not in decoded and decoded["classes"] == ["cat", "dog"]


def test_the_exporter_and_the_runner_use_the_table(exported):
    """Every exported file carries exactly the table's keys with the values export meant
    (the precision of each variant from the variants table), and the runner reads them back
    typed."""
    import onnx

    from pipeline.onnx.contract import VARIANTS
    from pipeline.onnx.runner import OnnxClassifier

    root, _ = exported
    files = {"model.onnx": ("fp32", True)} | {
        f"variants/{v.file}": (v.precision, False) for v in VARIANTS.values()}
    for name, (precision, resized) in files.items():
        model = onnx.load(str(root / "out" / name), load_external_data=False)
        assert [p.key for p in model.metadata_props] == list(KEYS)
        runner = OnnxClassifier(root / "out" / name)
        typed = runner.contract.values
        assert typed["precision"] == precision and typed["input_resized_in_graph"] is resized
        assert typed["classes"] == runner.contract.classes and len(typed["classes"]) == 10
        assert typed["input_size"] == runner.contract.preprocessing.input_size == \
            json.loads((root / "model.json").read_text())["preprocessing"]["input_size"]
        assert isinstance(typed["temperature"], float) and typed["outputs"] == ["probabilities", "in_distribution"]
