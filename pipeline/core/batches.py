"""What the cut_cache and finetune stages share: their params, the images, the compatibility checks.

* :class:`FinetuneParams`: the ``finetune`` section of params.yaml. ``CUT_CACHE_KEYS`` are the
  keys that decide the cut cache's bytes; ``dvc.yaml`` gives the cut_cache stage exactly those
  (a test keeps the two lists equal), so changing epochs or LRs never rebuilds the cache.
* :func:`image_batches`: decoded, preprocessed (and, for training views, augmented) images in
  batches, optionally decoded in worker processes, in a given order.
* :func:`check_same_backbone`: refuses a head or a cache made for another backbone, weights,
  preprocessing or data, naming the key that differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .augment import Augment, augment, view_rng
from .errors import PipelineError
from .imageio import DEFAULT_MAX_PIXELS, load_prepared_rgb
from .preprocess import Preprocessing, normalize, resize_and_crop

CUT_CACHE_KEYS = ("enabled", "blocks", "mode", "views", "augment", "cache_dtype", "seed",
                  "threads")


def view_pixels(path: Path, pp: Preprocessing, policy: Augment, seed: int, image: int,
                view: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """One network input (float32 CHW): shared preprocessing, then the seeded augmentation."""
    pixels = resize_and_crop(load_prepared_rgb(path, max_pixels=max_pixels), pp)
    if policy != "none":
        pixels = augment(pixels, policy, view_rng(seed, image, view))
    return normalize(pixels, pp)


def image_batches(paths: Sequence[Path], pp: Preprocessing, batches: Sequence[Sequence[int]],
                  workers: int = 0, policy: Augment = "none", seed: int = 0, view: int = 0,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[np.ndarray]:
    """Yield float32 NCHW arrays for each list of indices in ``batches``, in that order."""
    from torch.utils.data import DataLoader, Dataset

    class _Views(Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, index: int) -> np.ndarray:
            return view_pixels(paths[index], pp, policy, seed, index, view, max_pixels)

    loader = DataLoader(_Views(), batch_sampler=[list(b) for b in batches], num_workers=workers,
                        collate_fn=lambda items: np.stack(items))
    yield from loader


def sequential_batches(n: int, batch_size: int) -> list[list[int]]:
    return [list(range(s, min(n, s + batch_size))) for s in range(0, n, batch_size)]


def check_same_backbone(expected: dict[str, Any], found: dict[str, Any], source: str,
                        fix: str) -> None:
    """Refuse ``found`` (a head's or cache's backbone record) unless it matches ``expected``."""
    for key in ("name", "architecture", "weights", "feature_dim", "preprocessing"):
        if expected.get(key) != found.get(key):
            raise PipelineError(f"{source} was made for backbone {key} {found.get(key)!r}, but "
                                f"this run uses {expected.get(key)!r}; {fix}")
