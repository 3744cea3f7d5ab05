"""Safe image decoding to RGB, shared by ``prepare``, every stage that reads images and the ONNX runner.

Depends only on Pillow and numpy (no torch), so the deployment runner can import it.

* decodes the whole image (a truncated file fails here, not halfway through training);
* applies the EXIF orientation;
* converts every mode to 8-bit RGB correctly: alpha (LA, PA, RGBA, palette with transparency)
  is composited over white, 16-bit and 32-bit grey are scaled (not clipped) to 8 bits,
  CMYK/YCbCr/LAB/HSV/1-bit go through Pillow's converters;
* refuses decompression bombs (declared size over ``max_pixels``) before decoding pixels;
* optionally decodes a large JPEG at a reduced DCT scale (Pillow's ``draft``) when only a
  smaller copy is needed: the whole file is still read and checked, at a fraction of the cost.
"""

from __future__ import annotations

import math
import struct
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default limit (about 0.25 GB of RGBA)
ALPHA_BACKGROUND = (255, 255, 255)


class ImageRejected(Exception):
    """The file is not a usable image; the message says why."""


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        scale = 255.0 if np.nanmax(arr, initial=0.0) <= 1.0 else 1.0
        arr = np.nan_to_num(arr * scale)
    else:
        arr = arr.astype(np.float64)
        peak = float(arr.max(initial=0))
        if peak > 255:
            # 16-bit data (I;16*, or mode I holding 16-bit values): full range 0..65535
            arr = arr / 257.0 if peak <= 65535 else arr * (255.0 / peak)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (alpha composited over white)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        return _sixteen_bit_to_l(img).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: str | Path | BinaryIO, max_pixels: int = DEFAULT_MAX_PIXELS,
             draft_short_side: int | None = None) -> Image.Image:
    """Fully decode ``path`` into an upright 8-bit RGB image, or raise :class:`ImageRejected`.

    With ``draft_short_side``, a JPEG whose shorter side is at least twice that is decoded at
    the largest DCT reduction (1/2, 1/4, 1/8) that keeps its shorter side >= ``draft_short_side``
    (the caller then resizes it further)."""
    try:
        with warnings.catch_warnings():
            # our own max_pixels check below replaces Pillow's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageRejected(
                        f"decompression bomb: declared size {width}x{height} = {width * height} "
                        f"pixels exceeds max_image_pixels={max_pixels}")
                if width < 1 or height < 1:
                    raise ImageRejected(f"empty image ({width}x{height})")
                if draft_short_side and img.format == "JPEG" \
                        and min(width, height) >= 2 * draft_short_side:
                    scale = draft_short_side / min(width, height)
                    img.draft(img.mode, (math.ceil(width * scale), math.ceil(height * scale)))
                img.load()
                upright = ImageOps.exif_transpose(img)
                return to_rgb(upright).copy()
    except ImageRejected:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageRejected(f"decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise ImageRejected("not an image: Pillow cannot identify the format") from None
    except FileNotFoundError:
        raise ImageRejected("file not found") from None
    except IsADirectoryError:
        raise ImageRejected("is a directory, not an image file") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError,
            struct.error) as exc:
        raise ImageRejected(f"cannot decode: {exc}") from None

