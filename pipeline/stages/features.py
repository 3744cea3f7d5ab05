"""Stage features: run the frozen pretrained backbone once and cache its features on disk.

The backbone is exported to ONNX and run with onnxruntime (``features.engine: onnxruntime``,
several times faster than PyTorch eager on CPU), or run in PyTorch (``engine: torch``). The
first batch is also run through the PyTorch model on CPU and the largest difference is checked
against ``features.verify_tolerance`` (1e-4), so a bad export cannot go unnoticed; with
``features.device: cuda`` (either engine) this checks the GPU run too, which is strict FP32 (no
TF32), so GPU and CPU caches agree.

Features are streamed batch by batch into a memory-mapped ``features.npy`` (a data set larger
than RAM works). Outputs in ``--out`` (written to a temporary folder, then renamed):
``features.npy`` (N x D float32, manifest order), ``labels.npy`` (int64), ``splits.npy``
(int8: 0 train, 1 val, 2 test) and ``meta.json`` (backbone, preprocessing, shapes, classes).
Timings go to ``--report`` (the backbone rate also to ``--metrics``) (they differ between runs; the cache itself is byte-identical).

Run: ``pipeline features --prepared data/prepared --out data/features``
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from tqdm import tqdm

from ..core.atomic import atomic_dir, write_json
from ..core.backbones import Backbone, build_backbone
from ..core.caches import FEATURES_FORMAT, reuse_cache
from ..core.config import BackboneParams, FeaturesParams
from ..core.dataset import SPLITS, read_prepared
from ..core.errors import PipelineError
from ..core.copies import PreparedImages
from ..core.params import as_dict
from ..core.preprocess import Preprocessing
from ..core.runtime import cuda_tf32, resolve_threads
from ..onnx.convert import check_first_batch


def iter_batches(images: PreparedImages, keys: list[str], pp: Preprocessing, batch_size: int,
                 workers: int | None) -> Iterator[np.ndarray]:
    """Yield float32 NCHW batches of the decoded copies in order (made in worker processes
    when ``workers`` > 0)."""
    from ..core.batches import image_batches, sequential_batches

    yield from image_batches(images, keys, pp, sequential_batches(len(keys), batch_size),
                             workers)


def make_extractor(backbone: Backbone, params: FeaturesParams,
                   workdir: Path) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """Return (batch -> features function, provider description)."""
    import torch

    if params.engine == "torch":
        device = torch.device(params.device)
        if params.device == "cuda" and not torch.cuda.is_available():
            raise PipelineError("features.device is cuda but torch sees no GPU; set "
                                "features.device: cpu")
        model = backbone.model.to(device)

        def run_torch(batch: np.ndarray) -> np.ndarray:
            with torch.inference_mode(), cuda_tf32(False):
                return model(torch.from_numpy(batch).to(device)).float().cpu().numpy()

        return run_torch, f"torch:{device}"

    from ..onnx.convert import onnx_function

    return onnx_function(backbone.model, backbone.preprocessing.input_size, workdir, "pixels",
                         "features", params.threads, params.device)


def reference_features(model: Any, batch: np.ndarray) -> np.ndarray:
    """The backbone's output in PyTorch on CPU, FP32: what every engine and device must match."""
    import torch

    with torch.inference_mode():
        return model.cpu()(torch.from_numpy(batch)).numpy()


def run(backbone_params: BackboneParams, params: FeaturesParams, prepared_dir: str | Path,
        out_dir: str | Path, report_path: str | Path | None = None,
        backend: str = "auto", metrics_path: str | Path | None = None,
        reuse_dir: str | Path | None = None) -> dict[str, Any]:
    """Extract features for every manifest row into ``out_dir``; return timing metrics.
    ``reuse_dir``: a cache the auto stage kept; copied instead when its meta is this run's.

    Under torchrun, rank ``r`` of ``W`` extracts batches ``r, r + W, ...`` into the one
    memory-mapped cache that rank 0 created and publishes: same batches, same order, same
    bytes as a single process.
    """
    import contextlib

    import torch

    from ..core.batches import image_batches, sequential_batches
    from ..core.distributed import context

    ctx = context(params.device, backend)
    summary, classes, rows = read_prepared(prepared_dir)
    images = PreparedImages(prepared_dir)
    threads = resolve_threads(params.threads)
    torch.set_num_threads(threads)
    backbone = build_backbone(backbone_params)
    keys = [row["path"] for row in rows]
    class_index = {c: i for i, c in enumerate(classes)}
    try:
        labels = np.array([class_index[row["label"]] for row in rows], dtype=np.int64)
        splits = np.array([SPLITS.index(row["split"]) for row in rows], dtype=np.int8)
    except (KeyError, ValueError) as exc:
        raise PipelineError(f"{prepared_dir}/manifest.csv: unexpected label or split {exc}; "
                            "re-run prepare") from None
    n, dim = len(rows), backbone.feature_dim
    meta = {
        "format": FEATURES_FORMAT,
        "backbone": backbone.describe(),
        "feature_shape": [n, dim],
        "dtype": "float32",
        "classes": classes,
        "split_codes": list(SPLITS),
        "split_counts": {s: int((splits == i).sum()) for i, s in enumerate(SPLITS)},
        "manifest_sha256": summary["manifest_sha256"],
        "engine": params.engine,
        "params": as_dict(params) | {"threads": threads},
    }
    started = time.perf_counter()
    if not ctx.active and reuse_cache(reuse_dir, meta, out_dir):
        metrics = {"images": n, "provider": None, "threads": threads,
                   "batch_size": params.batch_size, "world_size": 1, "reused": str(reuse_dir),
                   "seconds_total": round(time.perf_counter() - started, 3),
                   "seconds_backbone": 0.0, "images_per_second_backbone": None,
                   "max_abs_diff_vs_torch_first_batch": None}
        print(f"features: reused the auto stage's cache {reuse_dir} (same backbone, layer, "
              "params and data)")
        if report_path is not None:
            write_json(report_path, metrics)
        if metrics_path is not None:
            write_json(metrics_path, {"img_s": None})
        ctx.close()
        return metrics
    batches = sequential_batches(n, params.batch_size)
    mine = batches[ctx.rank::ctx.world_size]
    max_diff = None
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        tmp = stack.enter_context(atomic_dir(out_dir)) if ctx.is_main else None
        if tmp is not None:
            np.lib.format.open_memmap(tmp / "features.npy", mode="w+", dtype=np.float32,
                                      shape=(n, dim)).flush()
        tmp = Path(ctx.broadcast(str(tmp) if tmp is not None else None))
        # PyTorch on CPU is the reference; make_extractor may move the model to the GPU
        reference = None
        if params.engine != "torch":
            reference = backbone.model
        elif params.device == "cuda":
            reference = copy.deepcopy(backbone.model)
        extract, provider = make_extractor(backbone, params, work)
        features = np.load(tmp / "features.npy", mmap_mode="r+")
        extract_seconds = 0.0
        stream = image_batches(images, keys, backbone.preprocessing, mine, params.workers)
        label = f"features ({provider})" + (f" rank {ctx.rank}/{ctx.world_size}"
                                            if ctx.active else "")
        with tqdm(total=sum(len(b) for b in mine), desc=label, unit="img") as bar:
            for indices, batch in zip(mine, stream):
                t0 = time.perf_counter()
                out = extract(batch)
                extract_seconds += time.perf_counter() - t0
                if out.shape != (len(batch), dim):
                    raise PipelineError(f"backbone returned shape {out.shape}, expected "
                                        f"({len(batch)}, {dim})")
                if max_diff is None and reference is not None:
                    fix = ("set features.device: cpu" if params.engine == "torch" else
                           "use features.engine: torch for this backbone")
                    max_diff = check_first_batch(out, reference_features(reference, batch),
                                                 params.verify_tolerance,
                                                 f"features ({provider})",
                                                 f"features.verify_tolerance; {fix}")
                features[indices[0]:indices[-1] + 1] = out
                bar.update(len(batch))
        features.flush()
        del features
        ctx.barrier()  # every rank's rows are on disk before rank 0 publishes the folder
        if ctx.is_main:
            np.save(tmp / "labels.npy", labels)
            np.save(tmp / "splits.npy", splits)
            write_json(tmp / "meta.json", meta)
    ctx.barrier()
    total = time.perf_counter() - started
    metrics = {
        "images": n,
        "provider": provider,
        "threads": threads,
        "batch_size": params.batch_size,
        "world_size": ctx.world_size,
        "seconds_total": round(total, 3),
        "seconds_backbone": round(extract_seconds, 3),
        "images_per_second_backbone": (round(sum(len(b) for b in mine) / extract_seconds, 2)
                                       if extract_seconds else None),
        "max_abs_diff_vs_torch_first_batch": max_diff,
    }
    if report_path is not None and ctx.is_main:
        write_json(report_path, metrics)
    if metrics_path is not None and ctx.is_main:
        write_json(metrics_path, {"img_s": metrics["images_per_second_backbone"]})
    ctx.close()
    return metrics
