"""The resize-and-crop half of preprocessing as an ONNX graph: one definition for every runtime.

Raw decoded RGB ``uint8`` pixels ``[N, H, W, 3]`` (any H and W, one size per batch) ->
``uint8 [N, S, S, 3]``: the shorter side resized to ``resize_size`` (the longer side scaled and
truncated, as ``int(resize * long / short)``), then the centre ``S x S`` crop with offsets
rounded half to even, as Python's ``round``. The resize is onnxruntime's ``Resize`` (opset 18) on
the uint8 tensor with antialiasing (``cubic``, ``cubic_coeff_a=-0.5``, ``exclude_outside=1``,
``half_pixel``; or ``linear``), which follows Pillow's resampling to within one grey level.

Training runs this same graph (:func:`resize_and_crop_batch` with onnxruntime) and the exported
model embeds it, so what an app's image goes through is what training saw, whatever Pillow
version is installed.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

OPSET = 18
RAW_INPUT = "image"      # uint8 [N, H, W, 3], any H and W
CROP_OUTPUT = "crop"     # uint8 [N, S, S, 3]
_MODES = {"bicubic": {"mode": "cubic", "cubic_coeff_a": -0.5, "exclude_outside": 1},
          "bilinear": {"mode": "linear"},
          "nearest": {"mode": "nearest"}}


def resize_attributes(interpolation: str) -> dict[str, Any]:
    """onnxruntime Resize attributes that follow Pillow's filter ``interpolation``."""
    if interpolation not in _MODES:
        raise ValueError(f"interpolation {interpolation!r} has no ONNX Resize equivalent; use "
                         f"one of {', '.join(sorted(_MODES))}")
    attrs = dict(_MODES[interpolation], coordinate_transformation_mode="half_pixel")
    if interpolation != "nearest":
        attrs["antialias"] = 1
    return attrs


def resize_crop_nodes(resize_size: int, input_size: int, interpolation: str,
                      prefix: str = "pre_") -> tuple[list[Any], list[Any]]:
    """(nodes, initializers) that map ``RAW_INPUT`` to ``CROP_OUTPUT``."""
    from onnx import TensorProto, helper, numpy_helper

    def name(n: str) -> str:
        return prefix + n

    def const(n: str, value: Any, dtype: Any) -> Any:
        return numpy_helper.from_array(np.asarray(value, dtype=dtype), name(n))

    inits = [const("one", [1], np.int64), const("two", [2], np.int64),
             const("r", float(resize_size), np.float64),
             const("s", float(input_size), np.float64), const("half", 0.5, np.float64),
             const("s_i", [input_size, input_size], np.int64)]
    node = helper.make_node
    nodes = [
        node("Shape", [RAW_INPUT], [name("shape")]),
        node("Gather", [name("shape"), name("one")], [name("h_i")], axis=0),    # [1]
        node("Gather", [name("shape"), name("two")], [name("w_i")], axis=0),    # [1]
        node("Cast", [name("h_i")], [name("h")], to=TensorProto.DOUBLE),
        node("Cast", [name("w_i")], [name("w")], to=TensorProto.DOUBLE),
        node("LessOrEqual", [name("w_i"), name("h_i")], [name("portrait")]),
        # int(resize * long / short): truncation of the float64 quotient, as in Python
        node("Mul", [name("r"), name("h")], [name("rh")]),
        node("Div", [name("rh"), name("w")], [name("rh_w")]),
        node("Floor", [name("rh_w")], [name("long_h")]),
        node("Mul", [name("r"), name("w")], [name("rw")]),
        node("Div", [name("rw"), name("h")], [name("rw_h")]),
        node("Floor", [name("rw_h")], [name("long_w")]),
        node("Expand", [name("r"), name("one")], [name("r1")]),
        node("Where", [name("portrait"), name("long_h"), name("r1")], [name("new_h")]),
        node("Where", [name("portrait"), name("r1"), name("long_w")], [name("new_w")]),
        node("Concat", [name("new_h"), name("new_w")], [name("new_hw")], axis=0),
        node("Cast", [name("new_hw")], [name("sizes")], to=TensorProto.INT64),
        node("Resize", [RAW_INPUT, "", "", name("sizes")], [name("resized")], axes=[1, 2],
             **resize_attributes(interpolation)),
        # round((new - S) / 2) with ties to even, as Python's round()
        node("Sub", [name("new_hw"), name("s")], [name("spare")]),
        node("Mul", [name("spare"), name("half")], [name("offset_f")]),
        node("Round", [name("offset_f")], [name("offset_r")]),
        node("Cast", [name("offset_r")], [name("starts")], to=TensorProto.INT64),
        node("Add", [name("starts"), name("s_i")], [name("ends")]),
        node("Slice", [name("resized"), name("starts"), name("ends"), name("one_two")],
             [CROP_OUTPUT]),
    ]
    inits.append(const("one_two", [1, 2], np.int64))
    return nodes, inits


def resize_crop_model(resize_size: int, input_size: int, interpolation: str,
                      opset: int = OPSET, ir_version: int | None = None) -> Any:
    """A standalone ONNX model: raw uint8 NHWC -> the uint8 centre crop."""
    from onnx import TensorProto, checker, helper

    nodes, inits = resize_crop_nodes(resize_size, input_size, interpolation)
    graph = helper.make_graph(
        nodes, "resize_and_crop",
        [helper.make_tensor_value_info(RAW_INPUT, TensorProto.UINT8, ["N", "H", "W", 3])],
        [helper.make_tensor_value_info(CROP_OUTPUT, TensorProto.UINT8,
                                       ["N", input_size, input_size, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="pipeline")
    # the IR version of the opset, not the installed onnx package's newest (onnxruntime may lag)
    model.ir_version = ir_version if ir_version is not None else 8
    checker.check_model(model, full_check=True)
    return model


@functools.lru_cache(maxsize=8)
def _session(resize_size: int, input_size: int, interpolation: str) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    model = resize_crop_model(resize_size, input_size, interpolation)
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def resized_shape(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(height, width) after the shorter side goes to ``short_side``, the longer one to
    ``int(short_side * long / short)``: the graph's rounding, in Python."""
    if width <= height:
        return int(float(short_side) * height / width), short_side
    return short_side, int(float(short_side) * width / height)


def _crop(batch: np.ndarray, input_size: int) -> np.ndarray:
    height, width = batch.shape[1:3]
    top = int(round((height - input_size) / 2.0))
    left = int(round((width - input_size) / 2.0))
    return batch[:, top:top + input_size, left:left + input_size]


def resize_and_crop_array(pixels: np.ndarray, resize_size: int, input_size: int,
                          interpolation: str) -> np.ndarray:
    """uint8 HWC (or NHWC, one size) -> uint8 (N)SS3, through the graph with onnxruntime.

    An image already at its resized shape (a copy that ``prepare`` made for this resize size)
    is only cropped: the graph's resize is then the identity (a test checks it on noise)."""
    batch = np.ascontiguousarray(pixels[None] if pixels.ndim == 3 else pixels, dtype=np.uint8)
    if resized_shape(*batch.shape[1:3], resize_size) == batch.shape[1:3]:
        out = np.ascontiguousarray(_crop(batch, input_size))
    else:
        out = _session(resize_size, input_size, interpolation).run(None, {RAW_INPUT: batch})[0]
    return out[0] if pixels.ndim == 3 else out


@functools.lru_cache(maxsize=8)
def _resize_session(interpolation: str) -> Any:
    import onnxruntime as ort
    from onnx import TensorProto, checker, helper

    sizes = "sizes"
    graph = helper.make_graph(
        [helper.make_node("Resize", [RAW_INPUT, "", "", sizes], ["resized"], axes=[1, 2],
                          **resize_attributes(interpolation))], "resize",
        [helper.make_tensor_value_info(RAW_INPUT, TensorProto.UINT8, ["N", "H", "W", 3]),
         helper.make_tensor_value_info(sizes, TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("resized", TensorProto.UINT8, ["N", "h", "w", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="pipeline")
    model.ir_version = 8
    checker.check_model(model, full_check=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def resize_short_side(pixels: np.ndarray, short_side: int, interpolation: str) -> np.ndarray:
    """uint8 HWC -> uint8 HWC with the shorter side at ``short_side`` (the graph's Resize and
    rounding, without the crop); images whose shorter side is already <= ``short_side`` are
    returned unchanged (never enlarged)."""
    height, width = pixels.shape[:2]
    if min(height, width) <= short_side:
        return pixels
    shape = resized_shape(height, width, short_side)
    out = _resize_session(interpolation).run(None, {
        RAW_INPUT: np.ascontiguousarray(pixels[None], dtype=np.uint8),
        "sizes": np.asarray(shape, dtype=np.int64)})[0]
    return out[0]


def clear_sessions() -> None:
    """Forget cached sessions (a forked worker process makes its own)."""
    _session.cache_clear()
    _resize_session.cache_clear()
