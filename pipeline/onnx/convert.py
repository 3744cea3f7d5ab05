"""torch -> ONNX: the export helper (frozen backbone, cut prefix, deployable model), the deployable
wrapper (uint8 NHWC in, probabilities and logits out) and the FP16 and INT8 variants."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..core.atomic import atomic_file
from ..core.errors import PipelineError
from ..core.preprocess import Preprocessing

DEFAULT_OPSET = 18


def export_module(model: Any, example: Any, path: str | Path, *, input_name: str = "input",
                  output_names: Sequence[str] = ("output",), opset: int = DEFAULT_OPSET) -> Path:
    """Export ``model`` (eval mode) to one self-contained ONNX file with a dynamic batch axis."""
    import onnx
    import torch

    path = Path(path)
    batch = torch.export.Dim("batch", min=1, max=4096)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            program = torch.onnx.export(
                model, (example,), input_names=[input_name], output_names=list(output_names),
                dynamic_shapes={next(iter(_forward_arg_names(model))): {0: batch}},
                opset_version=opset, dynamo=True, optimize=True, verbose=False)
        program.save(str(path), external_data=False)
    except Exception as exc:
        raise PipelineError(f"ONNX export of {type(model).__name__} failed: "
                            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}") \
            from None
    model_proto = onnx.load(str(path))
    strip_debug_info(model_proto)
    onnx.save_model(model_proto, str(path), save_as_external_data=False)
    onnx.checker.check_model(str(path), full_check=True)
    return path


def strip_debug_info(model: Any) -> None:
    """Drop the exporter's per-node debug metadata (Python stack traces with this machine's
    absolute paths, FX node dumps, module scopes): the graph is unchanged, the file no longer
    depends on where the package is installed, and it is smaller."""
    graphs = [model.graph] + [f for f in model.functions]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
            for attr in node.attribute:
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)


def _forward_arg_names(model: Any) -> list[str]:
    import inspect

    params = list(inspect.signature(model.forward).parameters)
    return params or ["x"]


def deployable(classifier: Any, pp: Preprocessing, input_kind: str,
               temperature: float = 1.0) -> Any:
    """Wrap the classifier: (uint8 NHWC | normalised float NCHW) -> (probabilities, logits);
    probabilities = softmax(logits / temperature)."""
    import torch
    from torch import nn

    class Deployable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.classifier = classifier
            self.register_buffer("mean", torch.tensor(pp.mean).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(pp.std).view(1, 3, 1, 1))

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if input_kind == "uint8_nhwc":
                x = image.permute(0, 3, 1, 2).to(torch.float32) / 255.0
                x = (x - self.mean) / self.std
            else:
                x = image
            logits = self.classifier(x)
            scaled = logits / temperature if temperature != 1.0 else logits
            return torch.softmax(scaled, dim=1), logits

    return Deployable().eval()


def write_model(model: Any, path: Path) -> None:
    import onnx

    with atomic_file(path) as tmp:
        onnx.save_model(model, str(tmp), save_as_external_data=False)


def drop_logits_output(path: Path) -> None:
    """Keep ``probabilities`` only (logits stay computed inside: softmax needs them)."""
    import onnx

    model = onnx.load(str(path))
    keep = [o for o in model.graph.output if o.name != "logits"]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    for prop in model.metadata_props:
        if prop.key == "outputs":
            prop.value = json.dumps([o.name for o in keep])
    onnx.checker.check_model(model, full_check=True)
    write_model(model, path)


def export_fp16(fp32_path: Path, path: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True,
                                     disable_shape_infer=False)
    onnx.checker.check_model(model, full_check=True)
    write_model(model, path)


def export_int8(fp32_path: Path, path: Path, calibration: np.ndarray,
                method: str = "minmax") -> None:
    """Static QDQ quantisation (U8 activations, S8 per-channel weights)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([calibration[i:i + 16] for i in range(0, len(calibration), 16)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"image": batch}

    with tempfile.TemporaryDirectory() as work:
        pre = Path(work) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        out = Path(work) / "int8.onnx"
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=True,
                        calibrate_method={"minmax": CalibrationMethod.MinMax,
                                          "percentile": CalibrationMethod.Percentile,
                                          "entropy": CalibrationMethod.Entropy}[method])
        model = onnx.load(str(out))
    fp32 = onnx.load(str(fp32_path), load_external_data=False)
    del model.metadata_props[:]
    model.metadata_props.extend(fp32.metadata_props)
    onnx.checker.check_model(model, full_check=True)
    write_model(model, path)


def add_resize_and_crop(model: Any, resize_size: int, input_size: int,
                        interpolation: str) -> Any:
    """Put the resize-and-crop graph in front of a fixed-size uint8 NHWC network: the result
    takes raw RGB uint8 pixels ``[N, H, W, 3]`` of any size (one size per batch)."""
    import onnx
    from onnx import TensorProto, helper

    from ..core.resize_graph import CROP_OUTPUT, RAW_INPUT, resize_crop_nodes

    graph = model.graph
    (old_input,) = graph.input
    batch_dim = old_input.type.tensor_type.shape.dim[0]
    for node in graph.node:
        node.input[:] = [CROP_OUTPUT if name == old_input.name else name for name in node.input]
    nodes, initializers = resize_crop_nodes(resize_size, input_size, interpolation)
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + existing)
    graph.initializer.extend(initializers)
    raw = helper.make_tensor_value_info(
        RAW_INPUT, TensorProto.UINT8,
        [batch_dim.dim_param or batch_dim.dim_value or "batch", "height", "width", 3])
    del graph.input[:]
    graph.input.append(raw)
    model = onnx.shape_inference.infer_shapes(model, check_type=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def write_sidecar(onnx_path: Path) -> dict[str, Any]:
    """Write ``<model>.onnx.json``: the typed contract read back from the file's own metadata
    (one table, :mod:`pipeline.onnx.contract`) plus the file's name, size and SHA-256."""
    import hashlib

    import onnx

    from ..core.atomic import write_json
    from .contract import decode_metadata, sidecar_path

    model = onnx.load(str(onnx_path), load_external_data=False)
    contract = decode_metadata({p.key: p.value for p in model.metadata_props})
    contract["file"] = {"name": onnx_path.name, "bytes": onnx_path.stat().st_size,
                        "sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest()}
    write_json(sidecar_path(onnx_path), contract)
    return contract
