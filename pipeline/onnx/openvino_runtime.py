"""The OpenVINO runtime (PyPI ``openvino``) behind the few onnxruntime session calls the project
makes, for CPUs where onnxruntime's OpenVINO plugin EP offers no device.

The plugin EP (``onnxruntime-ep-openvino`` 1.8) lists only Intel hardware: on an AMD CPU
``get_ep_devices()`` has no OpenVINO entry (onnxruntime PR #31981, open, lifts that), although
OpenVINO's CPU plugin runs on any x86-64 CPU with AVX2. There the ``openvino`` provider reads
the same ONNX file with ``openvino.Core`` and runs it on its CPU plugin, in strict FP32
(``INFERENCE_PRECISION_HINT=f32``, as the plugin EP is asked for). :class:`OpenVinoSession`
answers ``run``, ``get_inputs``, ``get_outputs``, ``get_providers`` and ``get_modelmeta`` like an
``onnxruntime.InferenceSession``, so the runner, ``pipeline predict`` and ``bench`` use it
unchanged. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ONNX_TYPES = {"u8": "tensor(uint8)", "f32": "tensor(float)", "f16": "tensor(float16)",
              "i64": "tensor(int64)", "i32": "tensor(int32)"}


@dataclass(frozen=True)
class NodeArg:
    """What onnxruntime's ``NodeArg`` tells: name, type string, shape (None/str = dynamic)."""

    name: str
    type: str
    shape: list[Any]


@dataclass(frozen=True)
class ModelMeta:
    custom_metadata_map: dict[str, str] = field(default_factory=dict)


def runtime_version() -> str | None:
    """The installed ``openvino`` runtime's version, or None."""
    try:
        import openvino
    except ImportError:
        return None
    return str(getattr(openvino, "__version__", "unknown")).split("-")[0]


def cpu_available() -> str | None:
    """None when the OpenVINO runtime runs on this CPU, else why not."""
    try:
        import openvino as ov
    except ImportError:
        return "the openvino runtime is not installed (pip install openvino)"
    try:
        devices = ov.Core().available_devices
    except Exception as exc:  # a broken install
        return f"the openvino runtime did not start: {str(exc).strip()[:200]}"
    return None if "CPU" in devices else f"the openvino runtime found no CPU device ({devices})"


def _metadata(path: Path) -> dict[str, str]:
    """The ONNX file's ``metadata_props`` (onnx package; without it the runner reads the JSON
    sidecar instead)."""
    try:
        import onnx
    except ImportError:
        return {}
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def _arg(port: Any, names: Sequence[str] = ()) -> NodeArg:
    """A port as onnxruntime describes it, named by the ONNX file's own name for it (a port
    can carry several names, e.g. an output that is also an inner tensor's)."""
    shape = [None if d.is_dynamic else d.get_length() for d in port.get_partial_shape()]
    name = next((n for n in names if n in port.get_names()), port.get_any_name())
    return NodeArg(name, ONNX_TYPES.get(port.get_element_type().get_type_name(),
                                        str(port.get_element_type())), shape)


def _io_names(path: Path) -> list[str]:
    """The ONNX graph's input and output names (onnx package; none without it)."""
    try:
        import onnx
    except ImportError:
        return []
    graph = onnx.load(str(path), load_external_data=False).graph
    return [v.name for v in graph.input] + [v.name for v in graph.output]


class OpenVinoSession:
    """An ONNX file compiled by OpenVINO's CPU plugin, used like an onnxruntime session."""

    provider = "OpenVINOExecutionProvider"

    def __init__(self, path: str | Path, threads: int, options: dict[str, Any] | None = None):
        import openvino as ov

        self.path = Path(path)
        core = ov.Core()
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32",
                                  "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = threads
        config.update(options or {})
        self._compiled = core.compile_model(core.read_model(str(self.path)), "CPU", config)
        self._request = self._compiled.create_infer_request()
        names = _io_names(self.path)
        self._inputs = [_arg(p, names) for p in self._compiled.inputs]
        self._outputs = [_arg(p, names) for p in self._compiled.outputs]
        self._meta = ModelMeta(_metadata(self.path))
        self.version = runtime_version()

    def run(self, output_names: Sequence[str] | None,
            feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self._request.infer({name: np.ascontiguousarray(value)
                                       for name, value in feeds.items()})
        names = list(output_names) if output_names else [o.name for o in self._outputs]
        ports = {o.name: port for o, port in zip(self._outputs, self._compiled.outputs)}
        return [np.array(results[ports[name]], copy=True) for name in names]

    def get_inputs(self) -> list[NodeArg]:
        return list(self._inputs)

    def get_outputs(self) -> list[NodeArg]:
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        return [self.provider]

    def get_modelmeta(self) -> ModelMeta:
        return self._meta
