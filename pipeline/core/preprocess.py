"""The one preprocessing definition, shared by features, training, export and every runtime.

Depends on numpy, Pillow (decoded images in) and onnxruntime. Two halves:

* :func:`resize_and_crop`: geometry (resize the shorter side, then centre crop). It runs the
  ONNX graph of :mod:`pipeline.core.resize_graph` with onnxruntime, the same nodes that the
  exported model carries inside it, so training, export and an app's model agree whatever
  Pillow version is installed.
* :func:`normalize`: uint8 HWC -> float32 CHW, scaled to [0, 1] then ``(x - mean) / std``.
  The export stage puts exactly this arithmetic inside the ONNX graph.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

# the filters the in-graph resize has (ONNX Resize: nearest, linear, cubic); Lanczos has none
Interpolation = Literal["nearest", "bilinear", "bicubic"]
_PIL_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB image becomes the backbone's input tensor."""

    input_size: int  # square crop fed to the network
    resize_size: int  # shorter side is resized to this before the centre crop
    interpolation: Interpolation
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        _interp(self.interpolation)  # a filter the in-graph resize lacks fails here, in one line

    @classmethod
    def from_crop_pct(cls, input_size: int, crop_pct: float, interpolation: str,
                      mean: Any, std: Any) -> "Preprocessing":
        """timm's convention: resize to floor(input_size / crop_pct), then crop input_size."""
        return cls(input_size=int(input_size), resize_size=int(math.floor(input_size / crop_pct)),
                   interpolation=_interp(interpolation),
                   mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["crop"] = "center"
        d["layout"] = "NCHW"
        d["scale"] = "1/255"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        return cls(input_size=int(d["input_size"]), resize_size=int(d["resize_size"]),
                   interpolation=_interp(d["interpolation"]),
                   mean=tuple(float(m) for m in d["mean"]), std=tuple(float(s) for s in d["std"]))


def _interp(name: str) -> Interpolation:
    from .errors import PipelineError

    name = str(name).lower().replace("interpolationmode.", "")
    if name not in _PIL_RESAMPLE:
        raise PipelineError(f"interpolation {name!r} has no resize in the exported graph (ONNX "
                            f"Resize); this backbone's preprocessing must use one of "
                            f"{', '.join(sorted(_PIL_RESAMPLE))}")
    return name  # type: ignore[return-value]


def resize_and_crop(img: Image.Image | np.ndarray, pp: Preprocessing) -> np.ndarray:
    """RGB image (PIL, or uint8 HWC array) -> uint8 array (input_size, input_size, 3).

    The shorter side goes to ``resize_size`` (the longer one to ``int(resize * long /
    short)``), then the centre crop, offsets rounded half to even: the graph of
    :mod:`pipeline.core.resize_graph`, run by onnxruntime, which the exported model embeds."""
    from .resize_graph import resize_and_crop_array

    pixels = np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img,
                        dtype=np.uint8)
    return resize_and_crop_array(pixels, pp.resize_size, pp.input_size, pp.interpolation)


def pillow_resize_and_crop(img: Image.Image, pp: Preprocessing) -> np.ndarray:
    """The same geometry with Pillow's resampling: what an app that resizes by itself gets
    (within one grey level of :func:`resize_and_crop`; export measures it)."""
    width, height = img.size
    if width <= height:
        new_w, new_h = pp.resize_size, int(pp.resize_size * height / width)
    else:
        new_w, new_h = int(pp.resize_size * width / height), pp.resize_size
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), resample=_PIL_RESAMPLE[pp.interpolation])
    top = int(round((new_h - pp.input_size) / 2.0))
    left = int(round((new_w - pp.input_size) / 2.0))
    img = img.crop((left, top, left + pp.input_size, top + pp.input_size))
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def normalize(pixels: np.ndarray, pp: Preprocessing) -> np.ndarray:
    """uint8 HWC (or NHWC) -> float32 CHW (or NCHW), scaled and mean/std normalised."""
    x = pixels.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(pp.mean, dtype=np.float32)) / np.asarray(pp.std, dtype=np.float32)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def preprocess(img: Image.Image | np.ndarray, pp: Preprocessing) -> np.ndarray:
    """RGB PIL image -> float32 CHW network input."""
    return normalize(resize_and_crop(img, pp), pp)
