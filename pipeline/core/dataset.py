"""The prepared data set as later stages read it: manifest rows, classes, splits, image paths.

``prepare`` writes ``manifest.csv`` (path relative to the image root, label, split, sha256),
``classes.json`` and ``summary.json``; every other stage reads them through this module.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from .errors import PipelineError

SPLITS = ("train", "val", "test")
MANIFEST_HEADER = ("path", "label", "split", "sha256")
INTERNAL_ROOT = "<prepared>/images"  # root of images written by this stage (sklearn-digits)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def image_root(prepared_dir: str | Path, summary: dict[str, Any]) -> Path:
    """Folder that the manifest's relative paths start from."""
    if summary["root"] == INTERNAL_ROOT:
        return Path(prepared_dir) / "images"
    return Path(summary["root"])


def read_prepared(prepared_dir: str | Path) -> tuple[dict[str, Any], list[str], list[dict[str, str]]]:
    """Load (summary, classes, manifest rows) written by :func:`run`."""
    prepared_dir = Path(prepared_dir)
    needed = [prepared_dir / n for n in ("summary.json", "classes.json", "manifest.csv")]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise PipelineError(f"{missing[0]} not found; run `pipeline prepare` (or `dvc repro "
                            "prepare`) first")
    summary = json.loads(needed[0].read_text(encoding="utf-8"))
    classes = json.loads(needed[1].read_text(encoding="utf-8"))
    with open(needed[2], newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return summary, classes, rows


def split_rows(rows: list[dict[str, str]], classes: list[str],
               split: str) -> tuple[list[str], np.ndarray]:
    """(manifest paths, class indices) of one split: the keys of its decoded copies."""
    index = {c: i for i, c in enumerate(classes)}
    chosen = [r for r in rows if r["split"] == split]
    return [r["path"] for r in chosen], np.array([index[r["label"]] for r in chosen],
                                                 dtype=np.int64)
