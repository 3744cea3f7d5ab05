"""Run an exported model: onnxruntime, numpy and Pillow only (importing this never imports torch).

Loads a ``.onnx`` written by ``pipeline export``, reads its contract (metadata, or the JSON
sidecar), decodes images as ``prepare`` does and feeds them as they are to a model that resizes
in its graph (``models/model.onnx``), or resized and cropped by the same graph for a fixed-size
variant, batches images of one size, and returns the top-k labels with probabilities::

    from pipeline.onnx.runner import OnnxClassifier
    model = OnnxClassifier("models/model.onnx", providers=["cuda", "cpu"])
    for result in model.predict_files(["cat.jpg", "dog.png"], top_k=3):
        print(result.path, result.error or result.top)

Refuses models without our metadata or whose graph does not match it, and ONNX files whose
external data lies outside their folder. ONNX files are protobuf, never pickles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from ..core.batches import shape_batches
from ..core.errors import PipelineError
from ..core.copies import DRAFT_MARGIN
from ..core.imageio import DEFAULT_MAX_PIXELS, ImageRejected, load_rgb
from ..core.preprocess import Preprocessing, normalize, resize_and_crop
from .contract import (CONTRACT, ENGINES, FIELDS, OOD_OUTPUT, VARIANTS, decode_metadata, engine_of,
                       sidecar_path)
from .sessions import resolve_providers

# how predict decodes: "copy" as prepare makes its copies (a large JPEG drafted to keep twice
# the resize size, then resized to it: what training saw); "fast" drafts to the resize size
# itself (a 12 MP photo at 1/8 DCT scale instead of 1/4, then a 4x smaller resize; its crops
# differ from a full decode by a few more grey levels); "full" hands every pixel to the model
DECODE_DRAFT_MARGIN = {"copy": DRAFT_MARGIN, "fast": 1, "full": None}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm")


class ModelError(PipelineError):
    """The ONNX file cannot be used: not ours, wrong contract, unsafe external data."""


@dataclass(frozen=True)
class Contract:
    """What the model's metadata promises about its input and output."""

    classes: list[str]
    input_name: str
    layout: str  # NHWC (uint8, normalised in the graph) or NCHW (float32, normalised here)
    dtype: str
    preprocessing: Preprocessing
    outputs: list[str]
    values: dict[str, Any] = field(repr=False)  # every metadata key, decoded (typed)
    resized_in_graph: bool = False  # True: raw RGB pixels of any size in

    @classmethod
    def from_session(cls, session: Any, path: Path) -> "Contract":
        """The contract from the model's ``metadata_props``, or from its JSON sidecar
        (``<model>.onnx.json``) when the file carries none (the same table either way)."""
        meta = dict(session.get_modelmeta().custom_metadata_map)
        sidecar = sidecar_path(path)
        if "contract" not in meta and sidecar.is_file():
            try:
                typed = json.loads(sidecar.read_text(encoding="utf-8"))
                meta = {f.key: f.encode(typed[f.key]) for f in FIELDS if f.key in typed}
            except (ValueError, TypeError, KeyError) as exc:
                raise ModelError(f"{sidecar}: not a readable contract ({exc})") from None
        if meta.get("contract") != CONTRACT:
            raise ModelError(f"{path}: not a model exported by `pipeline export` (metadata "
                             f"'contract' is {meta.get('contract')!r}, expected {CONTRACT!r}); "
                             "export it with `pipeline export`")
        try:
            values = decode_metadata(meta)
            pp = Preprocessing(input_size=values["input_size"],
                               resize_size=values["resize_size"],
                               interpolation=values["interpolation"],
                               mean=values["mean"], std=values["std"])
            contract = cls(classes=values["classes"], input_name=values["input_name"],
                           layout=values["input_layout"], dtype=values["input_dtype"],
                           preprocessing=pp, outputs=values["outputs"], values=values,
                           resized_in_graph=values.get("input_resized_in_graph", False))
        except (KeyError, ValueError, TypeError) as exc:
            raise ModelError(f"{path}: incomplete or invalid pipeline metadata ({exc}); "
                             "re-export it with `pipeline export`") from None
        contract.check_graph(session, path)
        return contract

    def check_graph(self, session: Any, path: Path) -> None:
        inputs = session.get_inputs()
        size = self.preprocessing.input_size
        expected_shape = ([size, size, 3] if self.layout == "NHWC" else [3, size, size])
        shape = list(inputs[0].shape[1:]) if inputs else []
        if self.resized_in_graph:  # height and width are free (symbolic)
            expected_shape = [None, None, 3]
            shape = [None if isinstance(d, str) or d is None else d for d in shape]
        expected_type = f"tensor({'uint8' if self.dtype == 'uint8' else 'float'})"
        ok = (len(inputs) == 1 and inputs[0].name == self.input_name
              and inputs[0].type == expected_type and shape == expected_shape
              and (self.layout, self.dtype) in (("NHWC", "uint8"), ("NCHW", "float32"))
              and (not self.resized_in_graph or self.layout == "NHWC"))
        if not ok:
            got = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
            raise ModelError(f"{path}: graph input ({got}) does not match its metadata "
                             f"({self.input_name} {self.dtype} {self.layout} {size} px); "
                             "re-export it with `pipeline export`")
        names = [o.name for o in session.get_outputs()]
        if "probabilities" not in names or len(self.classes) != _width(session, "probabilities"):
            raise ModelError(f"{path}: outputs {names} do not give probabilities for the "
                             f"{len(self.classes)} classes in its metadata")


def _width(session: Any, name: str) -> int | None:
    for out in session.get_outputs():
        if out.name == name and len(out.shape) == 2 and isinstance(out.shape[1], int):
            return out.shape[1]
    return None


def check_external_data(path: Path) -> None:
    """Refuse tensors stored outside the model's folder (when the onnx package is present;
    onnxruntime >= 1.20 refuses them itself)."""
    try:
        import onnx
    except ImportError:
        return
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelError(f"{path}: not a readable ONNX file ({str(exc).splitlines()[0]})") \
            from None
    folder = path.resolve().parent
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if Path(location).is_absolute() or folder not in target.parents:
            raise ModelError(f"{path}: tensor {tensor.name!r} references external data "
                             f"{location!r} outside the model's folder; refused")


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None
    # the model's in_distribution output (None when it has none) and whether it is below the
    # model's threshold: an image of none of the classes
    in_distribution: float | None = None
    unknown: bool = False


def _variant(values: dict[str, Any]) -> str:
    """The file's variant (``fp32``, ``int8_openvino``, ...; older files: their precision)."""
    return str(values.get("variant") or values.get("precision", "fp32"))


def _check_engine(path: Path, values: dict[str, Any], provider: str) -> None:
    """Refuse a file on an engine its export did not pass it for (the ``engines`` key of its
    decoded contract ``values``)."""
    engines = values.get("engines", list(ENGINES))
    if engine_of(provider) not in engines:
        raise ModelError(f"{path}: export checked this file for {', '.join(engines) or 'no engine'} "
                         f"only (it lost accuracy in {engine_of(provider)}, see "
                         "reports/export.json); use the variant made for it "
                         f"({_suggest(engine_of(provider))}) or another --providers")


def _suggest(engine: str) -> str:
    files = [v.file for v in VARIANTS.values() if v.engine == engine and v.precision == "int8"]
    return ", ".join(files) or "model.fixed.onnx"


class OnnxClassifier:
    """An exported model with its contract; ``provider`` is the one onnxruntime really uses."""

    def __init__(self, path: str | Path, providers: Sequence[str] = ("cpu",),
                 threads: int = 0, bench_report: str | Path | None = None) -> None:
        """``providers``: short names in order of preference, or ``("auto",)``: the fastest
        engine for this kind of file in ``bench_report`` (else a fixed order); ``chosen_why``
        says why."""
        from .sessions import (
            ANTIALIASED_RESIZE,
            auto_provider,
            new_session,
            preload_gpu_libraries,
            session_options,
        )

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"{self.path}: model file not found")
        check_external_data(self.path)
        self.chosen_why = "as requested"
        if list(providers) == ["auto"]:
            values = file_contract(self.path)
            name, self.chosen_why = auto_provider(
                _resizes_in_graph(values), _variant(values), bench_report,
                engines=values.get("engines", list(ENGINES)))
            providers = [name, "cpu"] if name != "cpu" else ["cpu"]
        chosen = resolve_providers(providers)
        if chosen[0] in ("cuda", "tensorrt"):
            preload_gpu_libraries()
        options = []
        for name in chosen:
            if name == "tensorrt":
                cache = self.path.parent / ".trt_cache"
                options.append({"trt_engine_cache_enable": True,
                                "trt_engine_cache_path": str(cache)})
            else:
                options.append({})
        try:
            self.session = new_session(self.path, chosen, session_options(threads), options)
        except PipelineError:
            raise
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{self.path}: onnxruntime cannot load it ({text[-300:]})") from None
        self.contract = Contract.from_session(self.session, self.path)
        if self.contract.resized_in_graph and chosen[0] not in ANTIALIASED_RESIZE:
            raise ModelError(f"{self.path}: resizes inside the graph with antialiasing, which "
                             f"{chosen[0]} ignores; use the fixed-size variant "
                             "(models/variants/model.fixed.onnx or model.int8.onnx) with it")
        _check_engine(self.path, self.contract.values, chosen[0])
        self.provider = self.session.get_providers()[0]
        self.requested = chosen

    @property
    def classes(self) -> list[str]:
        return self.contract.classes

    @property
    def ood_threshold(self) -> float | None:
        """The in_distribution value below which an image counts as none of the classes (the
        contract's ``out_of_distribution.threshold``); None for a model without the output."""
        if OOD_OUTPUT not in self.contract.outputs:
            return None
        info = self.contract.values.get("out_of_distribution") or {}
        return float(info.get("threshold", 0.5))

    def prepare(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """RGB image (PIL, or uint8 HWC) -> one model input: its own pixels (uint8 HWC) for a
        model that resizes in the graph; else the crop (uint8 HWC, or normalised float32 CHW)."""
        if self.contract.resized_in_graph:
            return np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image,
                              dtype=np.uint8)
        pixels = resize_and_crop(image, self.contract.preprocessing)
        return pixels if self.contract.layout == "NHWC" else normalize(pixels,
                                                                       self.contract.preprocessing)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(["probabilities"], {self.contract.input_name: batch})[0]

    def probabilities_of(self, inputs: Sequence[np.ndarray], batch_size: int = 16) -> np.ndarray:
        """Probabilities for prepared inputs (:meth:`prepare`), in input order; inputs of one
        size share a batch."""
        return self.scores_of(inputs, batch_size)[0]

    def scores_of(self, inputs: Sequence[np.ndarray],
                  batch_size: int = 16) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities and the ``in_distribution`` score (None for a model without it) for
        prepared inputs, in input order; inputs of one size share a batch."""
        names = ["probabilities"] + ([OOD_OUTPUT] if self.ood_threshold is not None else [])
        if not inputs:
            return (np.zeros((0, len(self.classes)), np.float32),
                    np.zeros(0, np.float32) if len(names) > 1 else None)
        out: list[list[np.ndarray | None]] = [[None] * len(inputs) for _ in names]
        for batch in shape_batches(inputs, batch_size):
            values = self.session.run(names, {self.contract.input_name:
                                              np.stack([inputs[i] for i in batch])})
            for column, value in zip(out, values):
                for i, v in zip(batch, value):
                    column[i] = v
        stacked = [np.stack(column) for column in out]  # type: ignore[arg-type]
        return stacked[0], (stacked[1] if len(stacked) > 1 else None)

    def predict_images(self, images: Sequence[Image.Image],
                       top_k: int = 5) -> list[list[tuple[str, float]]]:
        """Top-k per image; images of one size share a batch."""
        probs = self.probabilities_of([self.prepare(img) for img in images])
        return [self.top_k(p, top_k) for p in probs]

    def top_k(self, probs: np.ndarray, k: int) -> list[tuple[str, float]]:
        order = np.argsort(-probs, kind="stable")[:k]
        return [(self.classes[i], float(probs[i])) for i in order]

    def predict_files(self, paths: Iterable[str | Path], top_k: int = 5,
                      batch_size: int = 16, workers: int | None = None,
                      decode: str = "copy",
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[Prediction]:
        """Predict each file, in input order, streaming; an unreadable one yields a
        Prediction with ``error`` set and the others go on.

        ``decode`` (:data:`DECODE_DRAFT_MARGIN`): ``copy`` decodes as ``prepare`` makes its
        copies (a large JPEG at a reduced DCT scale, then resized to the model's resize size
        by the graph's own resize), so predictions see what training saw and memory does not
        grow with photo size; ``fast`` drafts further; ``full`` hands every pixel to the
        model.
        ``workers`` threads (None: one per CPU) decode ahead of the network, at most
        ``2 x batch_size`` files ahead (``batch_size + workers`` with ``full``)."""
        from ..core.parallel import ordered_thread_map
        from ..core.runtime import available_cpus

        if decode not in DECODE_DRAFT_MARGIN:
            raise PipelineError(f"decode must be one of {', '.join(DECODE_DRAFT_MARGIN)} "
                                f"(got {decode!r})")
        margin = DECODE_DRAFT_MARGIN[decode]
        short_side = None if margin is None else self.contract.preprocessing.resize_size
        workers = available_cpus() if workers is None else workers

        def load(path: str | Path) -> tuple[str, np.ndarray | str]:
            # with "full" (margin None) short_side is None and the margin is not used
            pixels = decode_for_model(path, short_side, max_pixels, margin or DRAFT_MARGIN)
            return str(path), pixels if isinstance(pixels, str) else self.prepare(pixels)

        chunk: list[tuple[str, np.ndarray | str]] = []

        threshold = self.ood_threshold

        def flush() -> Iterator[Prediction]:
            ready = [(i, x) for i, (_, x) in enumerate(chunk) if not isinstance(x, str)]
            probs, in_dist = self.scores_of([x for _, x in ready], batch_size)  # type: ignore[misc]
            by_index = {i: k for k, (i, _) in enumerate(ready)}
            for i, (name, x) in enumerate(chunk):
                if isinstance(x, str):
                    yield Prediction(name, error=x)
                    continue
                k = by_index[i]
                score = None if in_dist is None else float(in_dist[k])
                yield Prediction(name, self.top_k(probs[k], top_k), in_distribution=score,
                                 unknown=score is not None and score < threshold)
            chunk.clear()

        # full-size images: no more decoded ahead than a batch needs (12 MP is 36 MB each)
        window = batch_size + workers if margin is None else 2 * batch_size
        for item in ordered_thread_map(load, paths, workers, window):
            chunk.append(item)
            if len(chunk) >= batch_size:
                yield from flush()
        yield from flush()


def decode_for_model(path: str | Path, short_side: int | None,
                     max_pixels: int = DEFAULT_MAX_PIXELS,
                     draft_margin: int = DRAFT_MARGIN) -> np.ndarray | str:
    """uint8 HWC pixels of ``path``: a copy as ``prepare`` makes them at ``short_side`` (never
    enlarged; a large JPEG drafted to ``draft_margin`` x short_side), or every pixel when
    ``short_side`` is None; for a bad file, why (one line)."""
    from ..core.copies import decode_copy

    try:
        if short_side is None:
            return np.asarray(load_rgb(path, max_pixels=max_pixels), dtype=np.uint8)
        return decode_copy(path, short_side, max_pixels, draft_margin)
    except ImageRejected as exc:
        return str(exc)
    except OSError as exc:  # the file vanished or cannot be read between listing and decoding
        return f"cannot read: {exc.strerror or exc}"


def file_contract(path: Path) -> dict[str, Any]:
    """The typed contract of an exported file without a session: its JSON sidecar, else its
    ONNX metadata (decoded by the one table, :func:`decode_metadata`); ``{}`` when neither
    can be read."""
    sidecar = sidecar_path(path)
    try:
        if sidecar.is_file():
            typed = json.loads(sidecar.read_text(encoding="utf-8"))
            return typed if isinstance(typed, dict) else {}
        import onnx

        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False)
                .metadata_props}
        return decode_metadata(meta)
    except Exception:  # unreadable here; the session's own contract check reports it later
        return {}


def _resizes_in_graph(values: dict[str, Any]) -> bool:
    """Whether the file resizes in its graph; unknown (no readable contract, or the key
    missing) counts as yes, so that only engines honouring antialiased Resize are picked."""
    return bool(values.get("input_resized_in_graph", True))


def expand_inputs(items: Sequence[str | Path]) -> list[Path]:
    """Files as given; folders expanded (recursively, sorted) to their image files."""
    out: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            out += sorted(p for p in path.rglob("*")
                          if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(path)
    return out
