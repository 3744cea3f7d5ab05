"""Training-time augmentation for fine-tuning, seeded per (seed, image, view).

Applied to the uint8 crop that :func:`pipeline.core.preprocess.resize_and_crop` makes, before
:func:`pipeline.core.preprocess.normalize`, so the shared preprocessing stays the one definition.
Each view's randomness comes from ``numpy.random.default_rng([seed, image, view])``: the same
view of the same image is identical whichever process or worker makes it, which keeps the cut
cache and the classic path reproducible and equal to each other.

Policies (``finetune.augment``):

* ``none``: the evaluation crop.
* ``light``: random resized crop (area 70-100 %, aspect 3/4-4/3) and a rotation of up to
  10 degrees. No flip: a flipped digit or letter is another symbol.
* ``flip``: ``light`` plus a horizontal flip half of the time (natural photos).

Depends only on numpy and Pillow.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from PIL import Image

Augment = Literal["none", "light", "flip"]


def view_rng(seed: int, image: int, view: int) -> np.random.Generator:
    return np.random.default_rng([seed, image, view])


def augment(pixels: np.ndarray, policy: Augment, rng: np.random.Generator) -> np.ndarray:
    """uint8 HWC crop -> augmented uint8 HWC crop of the same size."""
    if policy == "none":
        return pixels
    height, width = pixels.shape[:2]
    img = Image.fromarray(pixels)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    fill = tuple(int(v) for v in np.median(border, axis=0))
    # random resized crop (torchvision's RandomResizedCrop rule, 10 tries then the full image)
    box = (0.0, 0.0, float(width), float(height))
    for _ in range(10):
        area = width * height * rng.uniform(0.7, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = math.sqrt(area * ratio), math.sqrt(area / ratio)
        if w <= width and h <= height:
            left, top = rng.uniform(0, width - w), rng.uniform(0, height - h)
            box = (left, top, left + w, top + h)
            break
    img = img.resize((width, height), Image.Resampling.BILINEAR, box=box)
    angle = float(rng.uniform(-10.0, 10.0))
    img = img.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=fill)
    if policy == "flip" and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(img, dtype=np.uint8)


def view_of_epoch(epoch: int, views: int) -> int:
    """The cached augmented view that fine-tuning epoch ``epoch`` (1, 2, ...) trains on: the
    views in turn, the same in the cut and the classic path."""
    return (epoch - 1) % views
