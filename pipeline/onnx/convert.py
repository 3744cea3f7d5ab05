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
from typing import Any, Callable, Sequence

import numpy as np

from ..core.atomic import atomic_file
from ..core.errors import PipelineError
from ..core.preprocess import Preprocessing
from .contract import OOD_OUTPUT

DEFAULT_OPSET = 18


EXPORT_CACHE_ENV = "PIPELINE_EXPORT_CACHE"
EXPORT_CACHE_ENTRIES = 24


def export_cache_dir() -> Path | None:
    """Where exported ONNX files are kept for reuse: ``$PIPELINE_EXPORT_CACHE`` (``off``
    disables), else ``$XDG_CACHE_HOME/pipeline/onnx`` (``~/.cache/pipeline/onnx``)."""
    import os

    setting = os.environ.get(EXPORT_CACHE_ENV, "")
    if setting.lower() in ("off", "0", "false", "none"):
        return None
    if setting:
        return Path(setting)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pipeline" / "onnx"


def export_key(model: Any, example: Any, input_name: str, output_names: Sequence[str],
               opset: int) -> str:
    """SHA-256 of everything the exported file depends on: every parameter and buffer (bytes,
    dtype, shape), the module tree (``repr``), each module's plain attributes (a temperature,
    a size) and train/eval mode, the source files of every module class and of this exporter,
    the example's shape and dtype, names, opset, torch and onnx versions."""
    import hashlib
    import inspect
    import itertools

    import onnx
    import torch

    digest = hashlib.sha256()

    def add(*parts: Any) -> None:
        for part in parts:
            digest.update(part if isinstance(part, bytes) else repr(part).encode())
            digest.update(b"\0")

    def add_tensor(name: str, tensor: Any) -> None:
        data = tensor.detach().cpu().contiguous()
        add(name, str(data.dtype), tuple(data.shape),
            data.view(-1).view(torch.uint8).numpy().tobytes())

    add("export-v1", torch.__version__, onnx.__version__, input_name, list(output_names), opset,
        tuple(example.shape), str(example.dtype), repr(model))
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        add_tensor(name, tensor)
    sources = {__file__}
    for name, module in model.named_modules():
        for attr, value in sorted(vars(module).items()):
            if attr.startswith("_"):
                continue
            if isinstance(value, torch.Tensor):  # a constant that is not a registered buffer
                add_tensor(attr, value)
            elif " at 0x" not in repr(value):
                add(attr, value)
        forward = getattr(type(module), "forward", None)
        for cell in getattr(forward, "__closure__", None) or ():  # a wrapper's closed-over
            value = cell.cell_contents                            # settings (temperature)
            if not isinstance(value, (torch.nn.Module, torch.Tensor)):
                add(repr(value) if " at 0x" not in repr(value) else type(value).__name__)
        add(name, module.training)
        try:
            sources.add(inspect.getsourcefile(type(module)) or "")
        except TypeError:  # a builtin class
            pass
    for source in sorted(s for s in sources if s):
        add(Path(source).read_bytes())
    return digest.hexdigest()


def export_module(model: Any, example: Any, path: str | Path, *, input_name: str = "input",
                  output_names: Sequence[str] = ("output",), opset: int = DEFAULT_OPSET) -> Path:
    """Export ``model`` (eval mode) to one self-contained ONNX file with a dynamic batch axis.

    torch's exporter takes 15-20 s for Lite0 on a 2-core CPU, longer than the network needs
    for a thousand images, and every stage that runs the backbone used to pay it on every run.
    The file is deterministic, so it is kept in :func:`export_cache_dir` under
    :func:`export_key` and copied from there when the same module is exported again (the same
    bytes; at most ``EXPORT_CACHE_ENTRIES`` files, the oldest go)."""
    import shutil

    path = Path(path)
    cache = export_cache_dir()
    key = export_key(model, example, input_name, output_names, opset) if cache else ""
    cached = cache / f"{key}.onnx" if cache else None
    if cached is not None and cached.is_file():
        with atomic_file(path) as tmp:
            shutil.copyfile(cached, tmp)
        cached.touch()
        return path
    _export_module(model, example, path, input_name, output_names, opset)
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(cached) as tmp:
                shutil.copyfile(path, tmp)
            entries = sorted(cached.parent.glob("*.onnx"), key=lambda p: p.stat().st_mtime)
            for old in entries[:-EXPORT_CACHE_ENTRIES]:
                old.unlink(missing_ok=True)
        except OSError:  # a read-only or full cache folder only costs the next export time
            pass
    return path


def _export_module(model: Any, example: Any, path: Path, input_name: str,
                   output_names: Sequence[str], opset: int) -> None:
    import onnx
    import torch

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


def onnx_function(module: Any, input_size: int, workdir: Path, input_name: str,
                  output_name: str, threads: int = 0,
                  device: str = "cpu") -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """Export a frozen image module (float32 NCHW at ``input_size``) and return (batch ->
    output run by onnxruntime, the provider that runs it): the path the features and the cut
    cache share."""
    import torch

    from .sessions import ort_session

    path = export_module(module.eval(), torch.zeros(2, 3, input_size, input_size),
                         workdir / f"{output_name}.onnx", input_name=input_name,
                         output_names=(output_name,))
    session = ort_session(path, threads, device)
    return (lambda batch: session.run(None, {input_name: batch})[0],
            f"onnxruntime:{session.get_providers()[0]}")


def check_first_batch(out: np.ndarray, reference: np.ndarray, tolerance: float, what: str,
                      fix: str) -> float:
    """max |out - reference|, refused above ``tolerance`` x max(1, max |reference|): one rule
    for every engine checked against the PyTorch CPU reference (absolute for outputs up to 1,
    relative for larger activations)."""
    from ..core.errors import PipelineError

    diff = float(np.abs(out - reference).max())
    if not diff <= tolerance * max(1.0, float(np.abs(reference).max())):
        raise PipelineError(f"{what} differ from the PyTorch CPU reference by {diff:.3g} "
                            f"(limit {tolerance:g} x max(1, max |reference|)); {fix}")
    return diff


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
               temperature: float = 1.0, in_distribution: Any = None) -> Any:
    """Wrap the classifier: (uint8 NHWC | normalised float NCHW) -> (probabilities, logits
    [, in_distribution]); probabilities = softmax(logits / temperature); ``in_distribution``
    (a module of pooled features and logits, :func:`pipeline.core.ood.torch_module`) adds
    the third output."""
    import torch
    from torch import nn

    class Deployable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.classifier = classifier
            self.in_distribution = in_distribution
            self.input_kind, self.temperature = input_kind, float(temperature)
            self.register_buffer("mean", torch.tensor(pp.mean).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(pp.std).view(1, 3, 1, 1))

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
            if self.input_kind == "uint8_nhwc":
                x = image.permute(0, 3, 1, 2).to(torch.float32) / 255.0
                x = (x - self.mean) / self.std
            else:
                x = image
            if self.in_distribution is None:  # any classifier module: pixels -> logits
                logits = self.classifier(x)
                scaled = logits / self.temperature if self.temperature != 1.0 else logits
                return torch.softmax(scaled, dim=1), logits
            features = self.classifier.backbone(x)
            logits = self.classifier.head(features)
            scaled = logits / self.temperature if self.temperature != 1.0 else logits
            return (torch.softmax(scaled, dim=1), logits,
                    self.in_distribution(features, logits))

    return Deployable().eval()


def nodes_only_for(model: Any, output: str) -> list[str]:
    """Names of the nodes that compute ``output`` and no other graph output (the detector's
    own nodes): the INT8 variant leaves them unquantised, so the score keeps its resolution
    and the classifier is quantised exactly as without it. Unnamed nodes get names."""
    producers = {}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
        for out in node.output:
            producers[out] = node

    def ancestors(names: list[str]) -> set[str]:
        seen: set[str] = set()
        todo = [producers[n] for n in names if n in producers]
        while todo:
            node = todo.pop()
            if node.name in seen:
                continue
            seen.add(node.name)
            todo += [producers[i] for i in node.input if i in producers]
        return seen

    others = [o.name for o in model.graph.output if o.name != output]
    return sorted(ancestors([output]) - ancestors(others))


def write_model(model: Any, path: Path) -> None:
    import onnx

    with atomic_file(path) as tmp:
        onnx.save_model(model, str(tmp), save_as_external_data=False)


def set_metadata(path: Path, **values: str) -> None:
    """Rewrite the text of existing ``metadata_props`` keys of the file at ``path``."""
    import onnx

    model = onnx.load(str(path))
    for prop in model.metadata_props:
        if prop.key in values:
            prop.value = values[prop.key]
    write_model(model, path)


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

    # the detector's nodes convert too (the converter's node_block_list leaves mistyped
    # graphs): its arrays are scaled so its sums stay in FP16 range (pipeline.core.ood)
    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True,
                                     disable_shape_infer=False)
    onnx.checker.check_model(model, full_check=True)
    write_model(model, path)


def export_int8(fp32_path: Path, path: Path, calibration: np.ndarray,
                method: str = "minmax", reduce_range: bool = True) -> None:
    """Static QDQ quantisation (U8 activations, S8 per-channel weights; with ``reduce_range``
    7-bit weights). onnxruntime's U8S8 kernels multiply u8 x s8 pairs into saturating 16-bit
    sums on CPUs without VNNI: on a 2-core AMD EPYC the default's INT8 model lost 1.49 test
    points with 8-bit weights and 0.74 with 7-bit ones, at the same speed (U8U8 kept 0.37
    points but ran 6x slower than FP32)."""
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
        prepared = onnx.load(str(pre))
        keep = nodes_only_for(prepared, OOD_OUTPUT) if any(
            o.name == OOD_OUTPUT for o in prepared.graph.output) else []
        if keep:  # names given to unnamed nodes must be in the file quantize_static reads
            onnx.save_model(prepared, str(pre))
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        nodes_to_exclude=keep,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=True, reduce_range=reduce_range,
                        calibrate_method={"minmax": CalibrationMethod.MinMax,
                                          "percentile": CalibrationMethod.Percentile,
                                          "entropy": CalibrationMethod.Entropy}[method])
        model = onnx.load(str(out))
    fp32 = onnx.load(str(fp32_path), load_external_data=False)
    del model.metadata_props[:]
    model.metadata_props.extend(fp32.metadata_props)
    onnx.checker.check_model(model, full_check=True)
    write_model(model, path)


def export_int8_openvino(fp32_path: Path, path: Path, calibration: np.ndarray,
                         subset_size: int = 300) -> None:
    """Static QDQ quantisation by NNCF (OpenVINO's post-training quantiser, ONNX backend):
    symmetric INT8 weights and activations, fast bias correction, and its overflow fix on the
    first layer (CPUs without VNNI saturate u8 x s8 sums there). OpenVINO runs this file within
    a point of FP32 where it lost 4.5 on onnxruntime's (``export_int8``): see
    docs/deployment.md. The detector's nodes stay FP32, as in :func:`export_int8`."""
    import nncf
    import onnx

    logging.getLogger("nncf").setLevel(logging.ERROR)
    model = onnx.load(str(fp32_path))
    for i, node in enumerate(model.graph.node):  # NNCF's ignored scope matches node names
        node.name = node.name or f"{node.op_type}_{i}"
    keep = nodes_only_for(model, OOD_OUTPUT) if any(
        o.name == OOD_OUTPUT for o in model.graph.output) else []
    dataset = nncf.Dataset([calibration[i:i + 1] for i in range(len(calibration))],
                           lambda batch: {"image": batch})
    quantized = nncf.quantize(model, dataset, subset_size=min(subset_size, len(calibration)),
                              ignored_scope=nncf.IgnoredScope(names=keep, validate=False))
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(model.metadata_props)
    onnx.checker.check_model(quantized, full_check=True)
    write_model(quantized, path)


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
