"""Decoded copies of the prepared images: ``prepare`` decodes each original once and writes them;
every later stage reads the copies, never the originals.

The rule: a copy is the image after the training geometry's resize, so its shorter side is
``prepare.short_side`` (default 256, the resize size of Lite0 and of most 224-pixel networks);
an image whose shorter side is already at most that is stored as decoded (never enlarged).
Augmentation works on the centre crop made from that size, so no stage needs more pixels. When
the backbone's resize size equals ``short_side`` the copy gives the very crop the original gives
(the graph's resize of a copy is the identity), whatever the original's size.

Large JPEGs are decoded at a reduced DCT scale that keeps at least ``DRAFT_MARGIN`` x
``short_side`` pixels on the shorter side before the resize (Pillow's ``draft``): on
4032x3024 photos that is 47 ms instead of 155 ms per decode on an Intel Xeon, and the 224
crops differ from a full decode by at most 2 grey levels (mean 0.23).

Layout in the prepared folder: ``pixels.bin`` (uint8 HWC arrays back to back) and
``pixels.csv`` (``path, offset, height, width, crc32`` per manifest path). Reads check the
CRC-32 of each copy, so a changed or truncated store fails with a one-line error naming the
image, never silently.
"""

from __future__ import annotations

import csv
import io
import json
import os
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import PipelineError
from .imageio import DEFAULT_MAX_PIXELS, ImageRejected, load_rgb
from .preprocess import Preprocessing, resize_and_crop
from .resize_graph import resize_short_side

COPIES_FILE = "pixels.bin"
INDEX_FILE = "pixels.csv"
INDEX_HEADER = ("path", "offset", "height", "width", "crc32")
DRAFT_MARGIN = 2
COPY_INTERPOLATION = "bicubic"


def decode_copy(source: str | Path | BinaryIO, short_side: int,
                max_pixels: int = DEFAULT_MAX_PIXELS,
                draft_margin: int = DRAFT_MARGIN) -> np.ndarray:
    """Decode (and validate) one original into its copy: uint8 HWC, shorter side <= short_side;
    a large JPEG is decoded at the smallest DCT scale keeping ``draft_margin`` x short_side.
    Raises :class:`pipeline.core.imageio.ImageRejected` for a bad file."""
    image = load_rgb(source, max_pixels=max_pixels, draft_short_side=draft_margin * short_side)
    return resize_short_side(np.asarray(image, dtype=np.uint8), short_side, COPY_INTERPOLATION)


def decode_file(path: str | Path, short_side: int,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes, np.ndarray]:
    """(file bytes, copy): the file is read once, for its hash and its pixels."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ImageRejected("file not found") from None
    except IsADirectoryError:
        raise ImageRejected("is a directory, not an image file") from None
    return data, decode_copy(io.BytesIO(data), short_side, max_pixels)


class CopyWriter:
    """Appends copies to ``folder/pixels.bin``; :meth:`close` writes ``pixels.csv``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._handle = open(folder / COPIES_FILE, "wb")
        self._rows: list[tuple[str, int, int, int, int]] = []
        self._offset = 0

    def add(self, key: str, pixels: np.ndarray) -> None:
        data = np.ascontiguousarray(pixels, dtype=np.uint8)
        if data.ndim != 3 or data.shape[2] != 3:
            raise ValueError(f"copy of {key}: expected HxWx3 uint8, got {data.shape}")
        self._handle.write(data.tobytes())
        self._rows.append((key, self._offset, data.shape[0], data.shape[1], zlib.crc32(data)))
        self._offset += data.nbytes

    def close(self, keep: set[str] | None = None) -> int:
        """Flush the store and write the index (only ``keep`` keys, if given); returns bytes."""
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        rows = [r for r in self._rows if keep is None or r[0] in keep]
        with open(self.folder / INDEX_FILE, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(INDEX_HEADER)
            writer.writerows(rows)
        return self._offset


class PreparedImages:
    """The copies of one prepared folder, read by manifest path (picklable: each process opens
    the store itself)."""

    def __init__(self, prepared_dir: str | Path) -> None:
        self.folder = Path(prepared_dir)
        self.store = self.folder / COPIES_FILE
        index = self.folder / INDEX_FILE
        for needed in (self.store, index):
            if not needed.is_file():
                raise PipelineError(f"{needed} not found: the prepared folder has no decoded "
                                    "copies; re-run `pipeline prepare` (or dvc repro prepare)")
        summary = self.folder / "summary.json"
        self.short_side: int | None = (json.loads(summary.read_text(encoding="utf-8"))
                                       .get("copies", {}).get("short_side")
                                       if summary.is_file() else None)
        with open(index, newline="", encoding="utf-8") as handle:
            self.index = {row["path"]: (int(row["offset"]), int(row["height"]),
                                        int(row["width"]), int(row["crc32"]))
                          for row in csv.DictReader(handle)}
        self._fd: int | None = None
        self._pid = -1

    def __getstate__(self) -> dict[str, object]:
        return self.__dict__ | {"_fd": None, "_pid": -1}

    def __len__(self) -> int:
        return len(self.index)

    def rgb(self, key: str) -> np.ndarray:
        """The copy of manifest path ``key``: uint8 HWC."""
        try:
            offset, height, width, crc = self.index[key]
        except KeyError:
            raise PipelineError(f"{self.folder / INDEX_FILE}: no copy of {key}; the manifest and "
                                "the copies disagree; re-run `pipeline prepare`") from None
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.store, os.O_RDONLY), os.getpid()
        size = height * width * 3
        data = os.pread(self._fd, size, offset)
        if len(data) != size or zlib.crc32(data) != crc:
            raise PipelineError(f"{self.store}: the copy of {key} is missing or changed since "
                                "prepare (size or CRC-32 differs); re-run `pipeline prepare`")
        return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)

    def crop(self, key: str, pp: Preprocessing) -> np.ndarray:
        """The network's uint8 crop of ``key`` (the shared :func:`resize_and_crop`)."""
        self.require(pp.resize_size)
        return resize_and_crop(self.rgb(key), pp)

    def require(self, resize_size: int) -> None:
        """Refuse copies smaller than the backbone's resize: crops would come from enlarged
        pixels, not what the model gets from a full-size image."""
        if self.short_side is not None and resize_size > self.short_side:
            raise PipelineError(f"the backbone resizes to {resize_size} px but the copies in "
                                f"{self.folder} have prepare.short_side={self.short_side}; set "
                                f"prepare.short_side: {resize_size} and re-run prepare")

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None
