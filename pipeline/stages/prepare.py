"""Stage prepare: scan, validate and split the images.

Sources (``prepare.source``): ``folder`` (``root/<class>/<images>``), ``csv`` (a manifest with
``path,label`` columns; relative paths are relative to the CSV's folder) or ``sklearn-digits``
(scikit-learn's 1,797 real 8x8 digits, written as PNGs into ``<out>/images/<digit>/`` and then
read through the same folder path).

Every file is fully decoded by :func:`pipeline.core.imageio.load_rgb`; bad files are skipped and listed
with the reason in ``rejected.csv``. Exact duplicates (same SHA-256) are dropped so that no image
lands in two splits. The split is stratified and seeded. Outputs in ``--out``:
``manifest.csv`` (path relative to the root, label, split, sha256), ``classes.json``,
``rejected.csv`` and ``summary.json``.

Run: ``pipeline prepare --params params.yaml --out data/prepared``
"""

from __future__ import annotations

import csv
import os
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..core.atomic import atomic_dir, write_csv, write_json
from ..core.config import PrepareParams
from ..core.dataset import INTERNAL_ROOT, MANIFEST_HEADER, SPLITS, sha256_file
from ..core.errors import PipelineError
from ..core.imageio import ImageRejected, load_rgb
from ..core.params import as_dict


@dataclass(frozen=True)
class Candidate:
    path: Path  # absolute or cwd-relative path to read
    rel: str  # path relative to the root, as written in the manifest
    label: str


def write_sklearn_digits(root: Path) -> None:
    """Materialise scikit-learn's digits as 8x8 greyscale PNGs in ``root/<digit>/``."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for index, (image, target) in enumerate(zip(digits.images, digits.target)):
        folder = root / str(int(target))
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(np.rint(image * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"digit_{index:04d}.png", optimize=False)


def scan_folder(root: Path) -> tuple[list[Candidate], list[str]]:
    """Candidates from ``root/<class>/**``; returns (candidates, empty class folders)."""
    if not root.is_dir():
        raise PipelineError(f"prepare.path: image folder not found: {root} (expected "
                            "root/<class>/<images>)")
    candidates: list[Candidate] = []
    empty: list[str] = []
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for class_dir in class_dirs:
        files = sorted(p for p in class_dir.rglob("*")
                       if p.is_file() and not any(part.startswith(".")
                                                  for part in p.relative_to(root).parts))
        if not files:
            empty.append(class_dir.name)
        candidates += [Candidate(f, f.relative_to(root).as_posix(), class_dir.name) for f in files]
    return candidates, empty


def scan_csv(manifest: Path) -> list[Candidate]:
    if not manifest.is_file():
        raise PipelineError(f"prepare.path: CSV manifest not found: {manifest}")
    with open(manifest, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
            raise PipelineError(f"{manifest}: needs a header with columns 'path' and 'label' "
                                f"(got {reader.fieldnames})")
        rows = list(reader)
    base = manifest.parent
    out = []
    for line, row in enumerate(rows, start=2):
        raw, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        if not raw or not label:
            raise PipelineError(f"{manifest}:{line}: empty path or label")
        full = Path(raw) if Path(raw).is_absolute() else base / raw
        rel = os.path.relpath(full, base) if not Path(raw).is_absolute() else raw
        out.append(Candidate(full, Path(rel).as_posix(), label))
    return out


def split_class(items: list[Any], val_fraction: float, test_fraction: float,
                rng: random.Random) -> dict[str, list[Any]]:
    """Shuffle one class and cut it into train/val/test, each at least one item."""
    items = list(items)
    rng.shuffle(items)
    n = len(items)
    n_test = max(1, round(n * test_fraction))
    n_val = max(1, round(n * val_fraction))
    return {"test": items[:n_test], "val": items[n_test:n_test + n_val],
            "train": items[n_test + n_val:]}


def _rejected_hint(rejected: list[tuple[str, str, str]]) -> str:
    if not rejected:
        return "no files rejected"
    path, _label, reason = rejected[0]
    return f"{len(rejected)} files rejected, e.g. {path}: {reason}"


def run(params: PrepareParams, out_dir: str | Path) -> dict[str, Any]:
    """Scan, validate, de-duplicate and split; write the outputs atomically into ``out_dir``."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        empty_classes: list[str] = []
        if params.source == "sklearn-digits":
            write_sklearn_digits(tmp / "images")
            candidates, empty_classes = scan_folder(tmp / "images")
            root_for_manifest = INTERNAL_ROOT
        elif params.source == "folder":
            candidates, empty_classes = scan_folder(Path(params.path))
            root_for_manifest = Path(params.path).as_posix()
        else:
            candidates = scan_csv(Path(params.path))
            root_for_manifest = Path(params.path).parent.as_posix()

        accepted: dict[str, list[tuple[Candidate, str]]] = defaultdict(list)
        rejected: list[tuple[str, str, str]] = []
        first_seen: dict[str, Candidate] = {}
        for cand in tqdm(candidates, desc="prepare: validating", unit="img", leave=False):
            try:
                load_rgb(cand.path, max_pixels=params.max_image_pixels)
                digest = sha256_file(cand.path)
            except ImageRejected as exc:
                rejected.append((cand.rel, cand.label, str(exc)))
                continue
            except OSError as exc:
                rejected.append((cand.rel, cand.label, f"cannot read: {exc.strerror or exc}"))
                continue
            twin = first_seen.get(digest)
            if twin is not None and params.duplicates == "drop":
                why = (f"duplicate of {twin.rel}" if twin.label == cand.label else
                       f"duplicate of {twin.rel} with another label ({twin.label})")
                rejected.append((cand.rel, cand.label, why))
                continue
            first_seen.setdefault(digest, cand)
            accepted[cand.label].append((cand, digest))

        classes = sorted(accepted)
        if len(classes) < 2:
            where = "sklearn-digits" if params.source == "sklearn-digits" else params.path
            raise PipelineError(f"prepare: only {len(classes)} usable class(es) in {where} "
                                f"({_rejected_hint(rejected)}); at least 2 classes are needed")
        short = {c: len(accepted[c]) for c in classes
                 if len(accepted[c]) < params.min_images_per_class}
        if short:
            detail = ", ".join(f"{c!r}: {n}" for c, n in sorted(short.items()))
            raise PipelineError(
                f"prepare: class(es) with fewer than prepare.min_images_per_class="
                f"{params.min_images_per_class} usable images ({detail}); add images, remove the "
                "class folder, or lower the minimum (3 is needed for train/val/test)")

        rng = random.Random(params.seed)
        rows: list[tuple[str, str, str, str]] = []
        counts: dict[str, dict[str, int]] = {}
        for label in classes:
            items = sorted(accepted[label], key=lambda item: item[0].rel)
            if params.max_images_per_class is not None and len(items) > params.max_images_per_class:
                items = sorted(rng.sample(items, params.max_images_per_class),
                               key=lambda item: item[0].rel)
            parts = split_class(items, params.val_fraction, params.test_fraction, rng)
            if not parts["train"]:
                raise PipelineError(f"prepare: class {label!r} has {len(items)} images, too few "
                                    "for train/val/test; add images or lower the fractions")
            counts[label] = {split: len(parts[split]) for split in SPLITS}
            for split in SPLITS:
                rows += [(cand.rel, label, split, digest) for cand, digest in parts[split]]
        rows.sort(key=lambda r: (SPLITS.index(r[2]), classes.index(r[1]), r[0]))

        write_csv(tmp / "manifest.csv", MANIFEST_HEADER, rows)
        write_csv(tmp / "rejected.csv", ("path", "label", "reason"), sorted(rejected))
        write_json(tmp / "classes.json", classes)
        manifest_hash = sha256_file(tmp / "manifest.csv")
        summary = {
            "source": params.source,
            "root": root_for_manifest,
            "num_images": len(rows),
            "num_rejected": len(rejected),
            "num_classes": len(classes),
            "empty_class_folders_ignored": empty_classes,
            "split_counts": {split: sum(c[split] for c in counts.values()) for split in SPLITS},
            "class_counts": counts,
            "manifest_sha256": manifest_hash,
            "params": as_dict(params),
        }
        write_json(tmp / "summary.json", summary)
    return summary
