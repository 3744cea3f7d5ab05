"""What the features, cut_cache and finetune stages share: the images, the compatibility checks.

* :func:`image_batches`: decoded, preprocessed (and, for training views, augmented) images in
  batches, optionally decoded in worker processes, in a given order.
* :func:`shape_batches`: indices of arrays grouped by shape, then cut to a batch size (an
  ONNX batch shares one size): how export, interpret and the runner batch raw pixels.
* :func:`check_same_backbone`: refuses a head or a cache made for another backbone, weights,
  preprocessing or data, naming the key that differs.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from .augment import Augment, augment, view_rng
from .errors import PipelineError
from .copies import PreparedImages
from .preprocess import Preprocessing, normalize

def view_pixels(images: PreparedImages, key: str, pp: Preprocessing, policy: Augment, seed: int,
                image: int, view: int) -> np.ndarray:
    """One network input (float32 CHW) from the decoded copy of ``key``: shared preprocessing,
    then the seeded augmentation."""
    pixels = images.crop(key, pp)
    if policy != "none":
        pixels = augment(pixels, policy, view_rng(seed, image, view))
    return normalize(pixels, pp)


def image_batches(images: PreparedImages, keys: Sequence[str], pp: Preprocessing,
                  batches: Sequence[Sequence[int]], workers: int | None = 0,
                  policy: Augment = "none",
                  seed: int = 0, view: int = 0) -> Iterator[np.ndarray]:
    """Yield float32 NCHW arrays for each list of indices (into ``keys``) in ``batches``, in
    that order. With ``workers`` > 0 (None: :func:`~pipeline.core.runtime.resolve_workers`)
    the batches are made in worker processes while the caller
    runs the network, at most two batches ahead per worker (bounded memory)."""
    from torch.utils.data import DataLoader, Dataset

    from .runtime import resolve_workers

    images.require(pp.resize_size)
    workers = resolve_workers(workers)

    class _Views(Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return len(keys)

        def __getitem__(self, index: int) -> np.ndarray:
            return view_pixels(images, keys[index], pp, policy, seed, index, view)

    loader = DataLoader(_Views(), batch_sampler=[list(b) for b in batches], num_workers=workers,
                        collate_fn=_stack, prefetch_factor=2 if workers else None,
                        worker_init_fn=_worker_init if workers else None)
    yield from loader


def _stack(items: list[np.ndarray]) -> np.ndarray:
    return np.stack(items)


def _worker_init(_worker: int) -> None:
    from .resize_graph import clear_sessions

    clear_sessions()


def shape_batches(arrays: Sequence[np.ndarray], batch_size: int) -> list[list[int]]:
    """Indices into ``arrays``, grouped by shape (first appearance first, input order within
    a group), each group cut into batches of at most ``batch_size``."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(arrays):
        groups.setdefault(tuple(x.shape), []).append(i)
    return [group[s:s + batch_size] for group in groups.values()
            for s in range(0, len(group), batch_size)]


def sequential_batches(n: int, batch_size: int) -> list[list[int]]:
    return [list(range(s, min(n, s + batch_size))) for s in range(0, n, batch_size)]


def check_same_backbone(expected: dict[str, Any], found: dict[str, Any], source: str,
                        fix: str) -> None:
    """Refuse ``found`` (a head's or cache's backbone record) unless it matches ``expected``."""
    for key in ("name", "architecture", "weights", "layer", "feature_dim", "preprocessing"):
        if expected.get(key) != found.get(key):
            raise PipelineError(f"{source} was made for backbone {key} {found.get(key)!r}, but "
                                f"this run uses {expected.get(key)!r}; {fix}")
