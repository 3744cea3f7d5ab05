"""Stage prepare: scan, validate and split the images.

Sources (``prepare.source``): ``folder`` (``root/<class>/<images>``), ``csv`` (a manifest with
``path,label`` columns; relative paths are relative to the CSV's folder) or ``sklearn-digits``
(scikit-learn's 1,797 real 8x8 digits, written as PNGs into ``<out>/images/<digit>/`` and then
read through the same folder path).

Every file is read once and fully decoded, in worker processes (``prepare.workers``; default
one per CPU), by :func:`pipeline.core.copies.decode_file`; bad files are skipped and listed with
the reason in ``rejected.csv``. The same pass writes the decoded copy that every later stage
reads instead of the original (:mod:`pipeline.core.copies`: shorter side ``prepare.short_side``,
EXIF orientation, mode and alpha already applied). Exact duplicates (same SHA-256) are dropped
so that no image lands in two splits. The split is stratified and seeded. Outputs in ``--out``:
``manifest.csv`` (path relative to the root, label, split, sha256), ``classes.json``,
``rejected.csv``, ``summary.json`` and the copies (``pixels.bin``, ``pixels.csv``).

Run: ``pipeline prepare --params params.yaml --out data/prepared``
"""

from __future__ import annotations

import csv
import errno
import hashlib
import multiprocessing
import os
import random
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np
from tqdm import tqdm

from ..core.atomic import atomic_dir, write_csv, write_json
from ..core.config import PrepareParams
from ..core.copies import CopyWriter, decode_file
from ..core.dataset import INTERNAL_ROOT, MANIFEST_HEADER, SPLITS, sha256_file
from ..core.errors import PipelineError
from ..core.imageio import ImageRejected
from ..core.params import as_dict
from ..core.resize_graph import clear_sessions
from ..core.runtime import available_cpus

T = TypeVar("T")
R = TypeVar("R")
Decoded = tuple[str, np.ndarray] | str  # (sha256, copy) or the reason it was rejected


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


def decode_candidate(path: Path, short_side: int, max_pixels: int) -> Decoded:
    """Worker job: read one file once; its SHA-256 and decoded copy, or why it is rejected."""
    try:
        data, pixels = decode_file(path, short_side, max_pixels)
    except ImageRejected as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    return hashlib.sha256(data).hexdigest(), pixels


def ordered_map(fn: Callable[..., R], items: Iterable[T], workers: int,
                window: int = 64) -> Iterator[R]:
    """``fn(*item)`` for each item, in order, in ``workers`` processes (in this one when
    ``workers`` <= 1); at most ``window`` results wait in memory, so memory does not grow with
    the number of items."""
    if workers <= 1:
        for item in items:
            yield fn(*item)
        return
    with multiprocessing.get_context("fork").Pool(workers, initializer=clear_sessions) as pool:
        pending: deque[Any] = deque()
        for item in items:
            pending.append(pool.apply_async(fn, item))
            if len(pending) >= window:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _rejected_hint(rejected: list[tuple[str, str, str]]) -> str:
    if not rejected:
        return "no files rejected"
    path, _label, reason = rejected[0]
    return f"{len(rejected)} files rejected, e.g. {path}: {reason}"


def run(params: PrepareParams, out_dir: str | Path) -> dict[str, Any]:
    """Scan, validate, de-duplicate and split; write the outputs atomically into ``out_dir``."""
    out_dir = Path(out_dir)
    try:
        return _prepare(params, out_dir)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise PipelineError(f"prepare: disk full while writing {out_dir} (copies need about "
                            f"{params.short_side}x{params.short_side * 4 // 3}x3 bytes per "
                            "image); free space and re-run; nothing was written") from None


def _prepare(params: PrepareParams, out_dir: Path) -> dict[str, Any]:
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
        copies = CopyWriter(tmp)
        workers = params.workers if params.workers is not None else available_cpus()
        jobs = ((cand.path, params.short_side, params.max_image_pixels) for cand in candidates)
        decoded = ordered_map(decode_candidate, jobs, workers)
        for cand, result in tqdm(zip(candidates, decoded), total=len(candidates),
                                 desc="prepare: decoding", unit="img", leave=False):
            if isinstance(result, str):
                rejected.append((cand.rel, cand.label, result))
                continue
            digest, pixels = result
            twin = first_seen.get(digest)
            if twin is not None and params.duplicates == "drop":
                why = (f"duplicate of {twin.rel}" if twin.label == cand.label else
                       f"duplicate of {twin.rel} with another label ({twin.label})")
                rejected.append((cand.rel, cand.label, why))
                continue
            first_seen.setdefault(digest, cand)
            accepted[cand.label].append((cand, digest))
            copies.add(cand.rel, pixels)

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

        copies_bytes = copies.close(keep={r[0] for r in rows})
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
            "copies": {"short_side": params.short_side, "bytes": copies_bytes,
                       "workers": workers},
            "manifest_sha256": manifest_hash,
            "params": as_dict(params),
        }
        write_json(tmp / "summary.json", summary)
    return summary
