"""The two on-disk activation caches that training reads: features and the cut cache.

* :class:`FeatureCache` (written by the ``features`` stage): pooled backbone features
  ``features.npy`` (N x D float32, manifest order), ``labels.npy``, ``splits.npy``, ``meta.json``.
* :class:`CutCache` (written by the ``cut_cache`` stage): the frozen prefix's activations at the
  fine-tuning cut, ``train.npy`` (N, views, ...), ``val.npy``/``test.npy`` and labels.

Both are memory-mapped, and both refuse a cache made for another format, backbone or data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .backbones import Backbone
from .batches import check_same_backbone
from .blocks import Split
from .config import CUT_CACHE_KEYS, FinetuneParams
from .dataset import SPLITS
from .errors import PipelineError
from .runtime import resolve_threads

FEATURES_FORMAT = 1
CUT_CACHE_FORMAT = 1


@dataclass
class FeatureCache:
    features: np.ndarray  # memory-mapped (N, D)
    labels: np.ndarray
    splits: np.ndarray
    meta: dict[str, Any]

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        mask = self.splits == SPLITS.index(name)
        return np.asarray(self.features[mask]), self.labels[mask]


def load_cache(features_dir: str | Path) -> FeatureCache:
    features_dir = Path(features_dir)
    meta_path = features_dir / "meta.json"
    if not meta_path.is_file():
        raise PipelineError(f"{meta_path} not found; run `pipeline features` first")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != FEATURES_FORMAT:
        raise PipelineError(f"{meta_path}: unsupported feature cache format; re-run features")
    features = np.load(features_dir / "features.npy", mmap_mode="r")
    labels = np.load(features_dir / "labels.npy")
    splits = np.load(features_dir / "splits.npy")
    if list(features.shape) != meta["feature_shape"] or len(labels) != len(features):
        raise PipelineError(f"{features_dir}: feature cache is inconsistent; re-run features")
    return FeatureCache(features, labels, splits, meta)


def cache_params(params: FinetuneParams) -> dict[str, Any]:
    """The cache-deciding keys as this run uses them (``threads`` resolved to a count)."""
    values = {k: getattr(params, k) for k in CUT_CACHE_KEYS}
    values["threads"] = resolve_threads(params.threads)
    return values


def uses_cache(params: FinetuneParams, split: Split) -> bool:
    return params.enabled and params.mode == "cut" and split.blocks < split.num_groups


class CutCache:
    """A written cut cache, memory-mapped."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise PipelineError(f"{meta_path} not found; run `pipeline cut-cache` (or dvc repro)")
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if self.meta.get("format") != CUT_CACHE_FORMAT:
            raise PipelineError(f"{meta_path}: unsupported cut cache format; re-run cut-cache")
        self.folder = folder

    def check_matches(self, backbone: Backbone, split: Split, params: FinetuneParams,
                      manifest_sha256: str) -> None:
        """Refuse a cache built for another backbone, cut, augmentation or data."""
        fix = "re-run `pipeline cut-cache` (dvc repro does it)"
        source = str(self.folder / "meta.json")
        check_same_backbone(backbone.describe(), self.meta["backbone"], source, fix)
        if self.meta["cut"] != split.describe():
            raise PipelineError(f"{source}: cached for cut {self.meta['cut']}, but this run "
                                f"cuts at {split.describe()}; {fix}")
        if self.meta["manifest_sha256"] != manifest_sha256:
            raise PipelineError(f"{source}: cached for other data (manifest hash differs); {fix}")
        wanted = cache_params(params)
        # threads only move activations by rounding (~1e-6): a cache made with another count
        # (another machine sharing the DVC cache) is still the right one
        for key, value in wanted.items():
            if key != "threads" and self.meta["params"].get(key) != value:
                raise PipelineError(f"{source}: cached with finetune.{key} = "
                                    f"{self.meta['params'].get(key)!r}, but params say "
                                    f"{value!r}; {fix}")

    def array(self, name: str) -> np.ndarray:
        return np.load(self.folder / f"{name}.npy", mmap_mode="r")

    def labels(self, name: str) -> np.ndarray:
        return np.load(self.folder / f"{name}_labels.npy")


def reuse_cache(source: str | Path | None, expected: dict[str, Any], out_dir: str | Path) -> bool:
    """Copy the cache in ``source`` to ``out_dir`` (atomically) when its ``meta.json`` agrees
    with every key of ``expected``, the meta this run would write: the same code made it from
    the same inputs, so the bytes are the ones a fresh run would write. False (nothing
    written) when there is no such cache."""
    import shutil

    from .atomic import atomic_dir

    if source is None:
        return False
    meta_path = Path(source) / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or any(meta.get(k) != v for k, v in
                                         json.loads(json.dumps(expected)).items()):
        return False
    with atomic_dir(out_dir) as tmp:
        for item in Path(source).iterdir():
            shutil.copy2(item, tmp / item.name)
    return True
