"""The runner on small hand-built ONNX files (no torch, no export): batching, the order of
results around unreadable files, the default threads, and graphs that break the contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from pipeline.core.runtime import resolve_threads
from pipeline.onnx.contract import encode_metadata
from pipeline.onnx.runner import (ModelError, OnnxClassifier, _resizes_in_graph, _suggest,
                                  _variant, file_contract)

from .test_contract import values

CLASSES = ["red", "green", "blue"]
SIZE = 8


def metadata(**changes) -> dict[str, str]:
    """The contract test's full set of values, for this 3-colour, 8-pixel model."""
    return encode_metadata(values() | {
        "classes": CLASSES, "input_size": SIZE, "resize_size": SIZE,
        "input_resized_in_graph": False, "outputs": ["probabilities", "logits"], "backbone": "hand-built"} | changes)


def channel_mean_model(path: Path, inputs: int = 1, width: int = 3,
                       classes: list[str] | None = None, any_size: bool = False,
                       **meta_changes) -> Path:
    """probabilities = softmax(mean colour / 8) over ``width`` classes: a red image is "red"."""
    nodes = [helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["pixels"], ["mean"], axes=[1, 2], keepdims=0),
             helper.make_node("Div", ["mean", "eight"], ["logits3"])]
    if width == 3:
        nodes.append(helper.make_node("Identity", ["logits3"], ["logits"]))
    elif width < 3:
        nodes.append(helper.make_node("Slice", ["logits3", "start", "stop", "axis"], ["logits"]))
    else:  # the colours, then their copies at half the logit
        nodes += [helper.make_node("Div", ["logits3", "two"], ["half"]),
                  helper.make_node("Concat", ["logits3", "half"], ["logits"], axis=1)]
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
    # any_size: takes raw pixels of any height and width, as a model that resizes in its graph
    hw = ["H", "W"] if any_size else [SIZE, SIZE]
    graph_inputs = [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", *hw, 3])]
    graph_inputs += [helper.make_tensor_value_info(f"extra{i}", TensorProto.FLOAT, [1])
                     for i in range(inputs - 1)]
    initializers = [helper.make_tensor("eight", TensorProto.FLOAT, [], [8.0]),
                    helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
                    helper.make_tensor("start", TensorProto.INT64, [1], [0]),
                    helper.make_tensor("stop", TensorProto.INT64, [1], [width]),
                    helper.make_tensor("axis", TensorProto.INT64, [1], [1])]
    if inputs == 0:  # the image comes from a constant: a graph with no input at all
        nodes.insert(0, helper.make_node("Constant", [], ["image"], value=helper.make_tensor(
            "c", TensorProto.UINT8, [1, SIZE, SIZE, 3], [0] * (SIZE * SIZE * 3))))
        graph_inputs = []
    outputs = [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", width]),
               helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", width])]
    graph = helper.make_graph(nodes, "channel_mean", graph_inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, metadata(classes=classes or CLASSES,
                                           input_resized_in_graph=any_size) | meta_changes)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def colour_image(path: Path, colour: int, size: tuple[int, int] = (20, 12)) -> Path:
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    pixels[..., colour] = 255
    Image.fromarray(pixels).save(path)
    return path


class RecordingSession:
    """Wraps a session and records the batch size of every run."""

    def __init__(self, session):
        self.session, self.batches = session, []

    def run(self, names, feeds):
        self.batches.append(len(next(iter(feeds.values()))))
        return self.session.run(names, feeds)

    def __getattr__(self, name):
        return getattr(self.session, name)


def test_predict_files_runs_full_batches_in_order(tmp_path):
    model = OnnxClassifier(channel_mean_model(tmp_path / "m.onnx"))
    model.session = RecordingSession(model.session)
    files = [colour_image(tmp_path / f"{i}.png", i % 3) for i in range(5)]
    results = list(model.predict_files(files, top_k=1, batch_size=2))
    assert model.session.batches == [2, 2, 1]
    assert [r.path for r in results] == [str(f) for f in files]
    assert [r.top[0][0] for r in results] == [CLASSES[i % 3] for i in range(5)]


def test_predict_files_batches_16_by_default_and_predict_images_runs_one_batch(tmp_path):
    model = OnnxClassifier(channel_mean_model(tmp_path / "m.onnx"))
    model.session = RecordingSession(model.session)
    files = [colour_image(tmp_path / f"{i}.png", i % 3) for i in range(17)]
    assert len(list(model.predict_files(files))) == 17
    assert model.session.batches == [16, 1]
    images = [Image.open(f) for f in files[:3]]
    assert [top[0][0] for top in model.predict_images(images, top_k=1)] == CLASSES
    assert model.session.batches[2:] == [3]


def test_five_answers_by_default(tmp_path):
    six = CLASSES + [f"pale {c}" for c in CLASSES]
    model = OnnxClassifier(channel_mean_model(tmp_path / "m.onnx", width=6, classes=six))
    image = colour_image(tmp_path / "r.png", 0)
    (top,) = model.predict_images([Image.open(image)])
    assert [name for name, _ in top] == ["red", "pale red", "green", "blue", "pale green"]
    (result,) = model.predict_files([image])
    assert result.top == top


def test_an_unreadable_file_gets_its_error_and_the_files_after_it_still_run(tmp_path):
    model = OnnxClassifier(channel_mean_model(tmp_path / "m.onnx"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    files = [colour_image(tmp_path / "a.png", 0), tmp_path / "missing.png",
             colour_image(tmp_path / "b.png", 1), broken, colour_image(tmp_path / "c.png", 2)]
    results = list(model.predict_files(files, top_k=2, batch_size=16))
    assert [r.path for r in results] == [str(f) for f in files]
    assert [r.error is None for r in results] == [True, False, True, False, True]
    assert results[1].error == "file not found" and "not an image" in results[3].error
    assert [r.top[0][0] for r in results if r.error is None] == CLASSES
    assert all(len(r.top) == 2 for r in results if r.error is None)


def test_by_default_the_session_uses_every_cpu_this_process_may_use(tmp_path):
    model = OnnxClassifier(channel_mean_model(tmp_path / "m.onnx"))
    assert model.session.get_session_options().intra_op_num_threads == resolve_threads(0)
    assert OnnxClassifier(tmp_path / "m.onnx", threads=1).session.get_session_options() \
        .intra_op_num_threads == 1


@pytest.mark.parametrize("inputs", [0, 2])
def test_a_graph_without_exactly_one_image_input_is_refused(tmp_path, inputs):
    path = channel_mean_model(tmp_path / "m.onnx", inputs=inputs)
    with pytest.raises(ModelError, match="does not match its metadata"):
        OnnxClassifier(path)


def test_a_graph_with_fewer_outputs_than_classes_is_refused(tmp_path):
    path = channel_mean_model(tmp_path / "m.onnx", width=2)
    with pytest.raises(ModelError, match="3 classes"):
        OnnxClassifier(path)


def test_a_file_onnxruntime_cannot_load_is_refused_with_its_reason(tmp_path):
    path = channel_mean_model(tmp_path / "m.onnx")
    model = onnx.load(str(path))
    model.graph.node[0].op_type = "NoSuchOperator"
    onnx.save(model, str(path))
    with pytest.raises(ModelError, match=r"onnxruntime cannot load it \(.*NoSuchOperator"):
        OnnxClassifier(path)


def test_whether_a_file_resizes_in_its_graph_is_read_without_a_session(tmp_path):
    fixed = channel_mean_model(tmp_path / "m.onnx")
    assert file_contract(fixed)["input_resized_in_graph"] is False
    assert _resizes_in_graph(file_contract(fixed)) is False
    model = onnx.load(str(fixed))
    helper.set_model_props(model, metadata(input_resized_in_graph=True, precision="int8"))
    onnx.save(model, str(tmp_path / "raw.onnx"))
    raw = file_contract(tmp_path / "raw.onnx")  # typed by the contract table
    assert _resizes_in_graph(raw) is True and raw["precision"] == "int8"
    (tmp_path / "m.onnx.json").write_text('{"input_resized_in_graph": true}')
    assert _resizes_in_graph(file_contract(fixed)) is True  # the sidecar is read first
    (tmp_path / "m.onnx.json").write_text("{broken")
    assert file_contract(fixed) == {}
    assert _resizes_in_graph({}) is True  # unknown counts as yes
    assert _resizes_in_graph({"contract": "x"}) is True  # a missing key is unknown too


def test_images_of_another_size_start_a_new_batch(tmp_path):
    model = OnnxClassifier(channel_mean_model(tmp_path / "m.onnx", any_size=True))
    assert model.contract.resized_in_graph
    model.session = RecordingSession(model.session)
    sizes = [(20, 12), (20, 12), (10, 6), (30, 40), (30, 40)]
    files = [colour_image(tmp_path / f"{i}.png", i % 3, size) for i, size in enumerate(sizes)]
    results = list(model.predict_files(files, top_k=1))
    assert model.session.batches == [2, 1, 2]
    assert [r.top[0][0] for r in results] == [CLASSES[i % 3] for i in range(5)]


def test_a_broken_sidecar_or_malformed_metadata_is_a_one_line_refusal(tmp_path):
    bare = channel_mean_model(tmp_path / "bare.onnx")
    model = onnx.load(str(bare))
    del model.metadata_props[:]
    onnx.save(model, str(bare))
    (tmp_path / "bare.onnx.json").write_text("{broken")
    with pytest.raises(ModelError, match="bare.onnx.json: not a readable contract"):
        OnnxClassifier(bare)
    bad_mean = channel_mean_model(tmp_path / "mean.onnx", mean="5")  # tuple(5): TypeError
    with pytest.raises(ModelError, match="incomplete or invalid pipeline metadata"):
        OnnxClassifier(bad_mean)
    bad_size = channel_mean_model(tmp_path / "size.onnx", input_size="big")  # ValueError
    with pytest.raises(ModelError, match="incomplete or invalid pipeline metadata"):
        OnnxClassifier(bad_size)


def test_the_width_checked_is_that_of_the_probabilities_output(tmp_path):
    """A file may carry other outputs, listed first and wider: only ``probabilities`` must
    have one column per class."""
    path = channel_mean_model(tmp_path / "m.onnx")
    model = onnx.load(str(path))
    graph = model.graph
    graph.node.extend([helper.make_node("Concat", ["logits", "logits"], ["extra"], axis=1)])
    extra = helper.make_tensor_value_info("extra", TensorProto.FLOAT, ["N", 6])
    outputs = [extra] + list(graph.output)
    del graph.output[:]
    graph.output.extend(outputs)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    runner = OnnxClassifier(path)
    assert [o.name for o in runner.session.get_outputs()][0] == "extra"
    (top,) = runner.predict_images([Image.open(colour_image(tmp_path / "g.png", 1))], top_k=1)
    assert top[0][0] == "green"


def test_the_variant_and_the_file_suggested_for_an_engine():
    """``_variant`` feeds ``--providers auto`` (rows are per variant); older files have only a
    precision. A refused file names the INT8 file made for the engine asked for. Engine names
    are built at run time, as read from a file, not the code's interned literals."""
    assert _variant({"variant": "int8_openvino", "precision": "int8"}) == "int8_openvino"
    assert _variant({"variant": "", "precision": "fp16"}) == "fp16"
    assert _variant({"precision": "int8"}) == "int8" and _variant({}) == "fp32"
    assert _suggest("".join(["open", "vino"])) == "model.int8.openvino.onnx"
    assert _suggest("".join(["onnx", "runtime"])) == "model.int8.onnx"
    assert _suggest("tensorrt") == "model.fixed.onnx"
