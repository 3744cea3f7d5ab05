"""Stage cut_cache: run the frozen prefix of the backbone once and cache its output at the cut.

Fine-tuning trains only the last ``finetune.blocks`` block groups and the head; everything
before the cut is frozen and gives the same activations every epoch. This stage exports that
prefix to ONNX, runs it with onnxruntime (first batch checked against PyTorch) and stores:

* ``train.npy``: (N_train, views, *activation) -- ``finetune.views`` seeded augmented views of
  every training image (one view when ``finetune.augment: none``);
* ``val.npy`` / ``test.npy``: (N, *activation) of the plain evaluation crop;
* ``{train,val,test}_labels.npy`` and ``meta.json`` (backbone, cut, shapes, data hash).

When fine-tuning is off, runs in ``mode: classic`` or trains every block, there is nothing to
cache and only ``meta.json`` (``"cached": false``) is written, so DVC's outputs stay the same.

Run: ``pipeline cut-cache --prepared data/prepared --out data/cut_cache``
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..core.atomic import atomic_dir, write_json
from ..core.backbones import Backbone, build_backbone
from ..core.batches import image_batches, sequential_batches
from ..core.blocks import Split, split_backbone
from ..core.caches import CUT_CACHE_FORMAT, cache_params, reuse_cache, uses_cache
from ..core.config import VERIFY_TOLERANCE, BackboneParams, FinetuneParams
from ..core.copies import PreparedImages
from ..core.dataset import SPLITS, read_prepared, split_rows
from ..core.errors import PipelineError
from ..core.runtime import resolve_threads
from ..onnx.convert import check_first_batch, onnx_function

def prefix_runner(split: Split, backbone: Backbone, threads: int, workdir: Path) -> Any:
    """Export the prefix to ONNX; return a batch -> activations function (onnxruntime)."""
    return onnx_function(split.prefix, backbone.preprocessing.input_size, workdir, "pixels",
                         "activations", threads)[0]


def _check_first_batch(split: Split, batch: np.ndarray, out: np.ndarray) -> float:
    import torch

    with torch.no_grad():
        ref = split.prefix.eval()(torch.from_numpy(batch)).numpy()
    return check_first_batch(out, ref, VERIFY_TOLERANCE, "cut cache activations",
                             "use finetune.mode: classic for this backbone")


def write_arrays(split: Split, backbone: Backbone, images: PreparedImages,
                 keys: dict[str, list[str]], labels: dict[str, np.ndarray],
                 params: FinetuneParams, threads: int, folder: Path) -> dict[str, Any]:
    """Run the prefix (onnxruntime) over every split's decoded copies; write ``<split>.npy``
    and labels."""
    import torch

    pp = backbone.preprocessing
    with torch.no_grad():
        shape = tuple(split.prefix.eval()(torch.zeros(1, 3, pp.input_size,
                                                      pp.input_size)).shape[1:])
    dtype = np.dtype(params.cache_dtype)
    views = params.cached_views
    max_diff = None
    network_s = 0.0
    with tempfile.TemporaryDirectory() as work:
        run_prefix = prefix_runner(split, backbone, threads, Path(work))
        for name in SPLITS:
            np.save(folder / f"{name}_labels.npy", labels[name])
            n_views = views if name == "train" else 1
            n = len(keys[name])
            full = (n, n_views, *shape) if name == "train" else (n, *shape)
            store = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype,
                                              shape=full)
            batches = sequential_batches(n, params.batch_size)
            policy = params.augment if name == "train" else "none"
            with tqdm(total=n * n_views, desc=f"cut cache {name}", unit="img") as bar:
                for view in range(n_views):
                    stream = image_batches(images, keys[name], pp, batches, params.workers,
                                           policy, params.seed, view)
                    for indices, batch in zip(batches, stream):
                        t0 = time.perf_counter()
                        out = run_prefix(batch)
                        network_s += time.perf_counter() - t0
                        if max_diff is None:
                            max_diff = _check_first_batch(split, batch, out)
                        rows = slice(indices[0], indices[-1] + 1)
                        if name == "train":
                            store[rows, view] = out
                        else:
                            store[rows] = out
                        bar.update(len(indices))
            store.flush()
            del store
    return {"cached": True, "activation_shape": list(shape), "dtype": dtype.name,
            "views": views, "split_counts": {k: len(v) for k, v in keys.items()},
            "max_abs_diff_vs_torch_first_batch": max_diff, "seconds_network": network_s}


def run(backbone_params: BackboneParams, params: FinetuneParams, prepared_dir: str | Path,
        out_dir: str | Path, reuse_dir: str | Path | None = None) -> dict[str, Any]:
    """Write the cut cache (or its 'nothing to cache' meta) to ``out_dir``; ``reuse_dir``: a
    cache the auto stage kept, copied instead when it was made for this cut, params and data."""
    import torch

    threads = resolve_threads(params.threads)
    torch.set_num_threads(threads)
    summary, classes, rows = read_prepared(prepared_dir)
    backbone = build_backbone(backbone_params)
    split = split_backbone(backbone, params.blocks)
    meta: dict[str, Any] = {
        "format": CUT_CACHE_FORMAT,
        "backbone": backbone.describe(),
        "cut": split.describe(),
        "manifest_sha256": summary["manifest_sha256"],
        "classes": classes,
        "params": cache_params(params),
    }
    started = time.perf_counter()
    if uses_cache(params, split) and reuse_cache(reuse_dir, meta, out_dir):
        print(f"cut_cache: reused the auto stage's cache {reuse_dir} (same cut, params and data)")
        written = json.loads((Path(out_dir) / "meta.json").read_text(encoding="utf-8"))
        return written | {"reused": str(reuse_dir),
                          "seconds": round(time.perf_counter() - started, 3)}
    with atomic_dir(out_dir) as tmp:
        if not uses_cache(params, split):
            meta["cached"] = False
        else:
            keys, labels = {}, {}
            for name in SPLITS:
                keys[name], labels[name] = split_rows(rows, classes, name)
            meta |= write_arrays(split, backbone, PreparedImages(prepared_dir), keys, labels,
                                 params, threads, tmp)
        network_s = meta.pop("seconds_network", None)
        write_json(tmp / "meta.json", meta)  # no timings in the output: its bytes are reproducible
    meta["seconds_network"] = None if network_s is None else round(network_s, 3)
    meta["seconds"] = round(time.perf_counter() - started, 3)
    return meta