"""Benchmark of the training-side speed claims, measured side by side in one run.

1. Feature extraction: onnxruntime on the exported frozen backbone versus PyTorch eager, same
   backbone, same preprocessed images, same batch size and thread count (throughput, images/s;
   plus the largest difference between the two outputs).
2. Head training: one epoch on cached features versus one epoch that runs the frozen backbone
   (PyTorch eager, no grad) on every batch before the same head step.

Prints the figures and writes them as JSON.

Run: ``pipeline bench-features --images 128 --out reports/bench_features.json``
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..core.atomic import write_json
from ..core.backbones import build_backbone
from ..core.config import BackboneParams, FeaturesParams, TrainHeadParams
from ..core.copies import PreparedImages
from ..core.dataset import read_prepared
from ..core.errors import PipelineError
from ..core.runtime import available_cpus, cpu_name, resolve_threads
from ..core.training import train_step
from ..stages.features import iter_batches


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(backbone_params: BackboneParams, features_params: FeaturesParams,
        head_params: TrainHeadParams, prepared_dir: str | Path, out_path: str | Path,
        images: int = 128, repeats: int = 3, head_epochs: int = 20) -> dict[str, Any]:
    import onnxruntime
    import torch

    from ..core.heads import Head, HeadConfig
    from ..onnx.convert import export_module
    from ..onnx.sessions import ort_session

    summary, classes, rows = read_prepared(prepared_dir)
    rows = rows[:images]
    if len(rows) < features_params.batch_size:
        raise PipelineError(f"bench: only {len(rows)} images, fewer than one batch of "
                            f"{features_params.batch_size}; use a smaller --batch-size")
    threads = resolve_threads(features_params.threads)
    torch.set_num_threads(threads)
    backbone = build_backbone(backbone_params)
    batches = list(iter_batches(PreparedImages(prepared_dir), [r["path"] for r in rows],
                                backbone.preprocessing, features_params.batch_size, 0))
    n = sum(len(b) for b in batches)
    labels = torch.tensor([classes.index(r["label"]) for r in rows])
    model = backbone.model

    def eager_pass() -> list[np.ndarray]:
        with torch.inference_mode():
            return [model(torch.from_numpy(b)).numpy() for b in batches]

    with tempfile.TemporaryDirectory() as work:
        size = backbone.preprocessing.input_size
        onnx_path = export_module(model, torch.zeros(2, 3, size, size),
                                  Path(work) / "backbone.onnx", input_name="pixels")
        session = ort_session(onnx_path, threads)

    def ort_pass() -> list[np.ndarray]:
        return [session.run(None, {"pixels": b})[0] for b in batches]

    eager_out, ort_out = eager_pass(), ort_pass()  # warm-up (and outputs to compare)
    max_diff = max(float(np.abs(a - b).max()) for a, b in zip(eager_out, ort_out))
    eager_s = _median_seconds(eager_pass, repeats)
    ort_s = _median_seconds(ort_pass, repeats)

    # ---- head epochs: cached features vs frozen backbone in the loop
    cached = torch.from_numpy(np.concatenate(ort_out))
    head = Head(HeadConfig(head_params.head, backbone.feature_dim, len(classes),
                           head_params.hidden_dim, head_params.dropout))
    optimizer = torch.optim.AdamW(head.parameters(), lr=head_params.lr)
    bs = features_params.batch_size

    def head_step(x: torch.Tensor, y: torch.Tensor) -> None:
        train_step(head, optimizer, x, y, label_smoothing=head_params.label_smoothing)

    def cached_epoch() -> None:
        for start in range(0, n, bs):
            head_step(cached[start:start + bs], labels[start:start + bs])

    def backbone_epoch() -> None:
        for i, batch in enumerate(batches):
            with torch.no_grad():
                x = model(torch.from_numpy(batch))
            head_step(x, labels[i * bs:i * bs + len(batch)])

    cached_epoch()
    cached_s = _median_seconds(cached_epoch, head_epochs)
    backbone_s = _median_seconds(backbone_epoch, max(1, repeats - 1))

    report = {
        "benchmark": "features_and_head",
        "backbone": backbone.name,
        "input_size": backbone.preprocessing.input_size,
        "images": n,
        "batch_size": bs,
        "threads": threads,
        "available_cpus": available_cpus(),
        "cpu": cpu_name(),
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "feature_extraction": {
            "torch_eager_images_per_s": round(n / eager_s, 2),
            "onnxruntime_images_per_s": round(n / ort_s, 2),
            "speedup_onnxruntime_over_eager": round(eager_s / ort_s, 2),
            "max_abs_diff": max_diff,
        },
        "head_epoch": {
            "cached_features_ms": round(cached_s * 1000, 3),
            "frozen_backbone_each_epoch_ms": round(backbone_s * 1000, 1),
            "speedup_cached_over_backbone": round(backbone_s / cached_s, 1),
        },
        "repeats": repeats,
    }
    write_json(out_path, report)
    fe, he = report["feature_extraction"], report["head_epoch"]
    print(f"backbone {backbone.name} @ {backbone.preprocessing.input_size}px, {n} images, batch "
          f"{bs}, {threads} threads ({report['cpu']})")
    print(f"feature extraction  torch eager {fe['torch_eager_images_per_s']:8.1f} img/s | "
          f"onnxruntime {fe['onnxruntime_images_per_s']:8.1f} img/s | speedup "
          f"{fe['speedup_onnxruntime_over_eager']:.2f}x | max |diff| {max_diff:.2e}")
    print(f"head epoch          cached features {he['cached_features_ms']:.2f} ms | frozen "
          f"backbone each epoch {he['frozen_backbone_each_epoch_ms']:.0f} ms | speedup "
          f"{he['speedup_cached_over_backbone']:.0f}x")
    print(f"wrote {out_path}")
    return report
