"""Benchmark: one fine-tuning epoch on the cut cache versus the classic path, side by side.

The same model (backbone cut at ``finetune.blocks``, a new head), the same training and
validation images, batch size, thread count and augmentation, trained by both paths with the
real training code (:func:`pipeline.stages.finetune.train_epoch` and :func:`~pipeline.stages.finetune.evaluate`):

* classic: decode + augment every image, frozen prefix forward (PyTorch, no grad), then the
  trainable suffix and head forward + backward;
* cut: read the cached activations, then the same suffix and head forward + backward.

It reports the training pass, the validation pass and the whole epoch (training + validation)
for each, their ratios, the time to build the cut cache, and after how many epochs the cache
has paid for itself. Prints the figures and writes them as JSON.

Both paths run the same trainable step, so the cut path's speedup is bounded by how fast that
step can go. To show the bound, the report also gives the step's convolution and linear work
(multiply-accumulates counted per layer, forward; forward + backward taken as 3x), the rate
the cut path's training pass achieved on it, and this CPU's FP32 matrix-product rate at the
same thread count (best of 10 2048x2048 products, before and after the epochs): the ceiling
for that work.

Run: ``pipeline bench-finetune --images 256 --epochs 2 --out reports/bench_finetune.json``
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from ..core.atomic import write_json
from ..core.backbones import build_backbone
from ..core.blocks import set_bn_modes, split_backbone
from ..core.caches import CutCache
from ..core.compute import forward_macs, matmul_gflops
from ..core.config import BackboneParams, FinetuneParams
from ..core.copies import PreparedImages
from ..core.dataset import SPLITS, read_prepared, split_rows
from ..core.errors import PipelineError
from ..core.heads import Head, HeadConfig
from ..core.runtime import available_cpus, cpu_name, resolve_threads
from ..stages.cut_cache import write_arrays
from ..stages.finetune import (
    ClassicSource,
    CutSource,
    count_trainable,
    evaluate,
    freeze_all_but_suffix,
    make_optimizer,
    train_epoch,
    trainable_model,
)


def run(backbone_params: BackboneParams, params: FinetuneParams, prepared_dir: str | Path,
        out_path: str | Path, images: int = 256, val_images: int = 10**9,
        epochs: int = 2) -> dict[str, Any]:
    import onnxruntime
    import torch

    threads = resolve_threads(params.threads)
    torch.set_num_threads(threads)
    ceiling_before = matmul_gflops()  # measured before and after the epochs; the best is kept
    summary, classes, rows = read_prepared(prepared_dir)
    copies = PreparedImages(prepared_dir)
    paths, labels = {}, {}
    for name in SPLITS:
        paths[name], labels[name] = split_rows(rows, classes, name)
    limits = {"train": images, "val": val_images, "test": 0}
    for name in SPLITS:
        paths[name], labels[name] = paths[name][:limits[name]], labels[name][:limits[name]]
    if len(paths["train"]) < params.batch_size:
        raise PipelineError(f"bench-finetune: {len(paths['train'])} training images, fewer than "
                            f"one batch of {params.batch_size}; use more --images")
    backbone = build_backbone(backbone_params)
    split = split_backbone(backbone, params.blocks)
    if split.blocks in (0, split.num_groups):
        raise PipelineError("bench-finetune: finetune.blocks must leave a frozen prefix and a "
                            f"trainable suffix (1..{split.num_groups - 1})")
    freeze_all_but_suffix(backbone, split)
    head = Head(HeadConfig("linear", backbone.feature_dim, len(classes)))
    run_params = dataclasses.replace(params, mode="cut", enabled=True)

    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        info = write_arrays(split, backbone, copies, paths, labels, run_params, threads,
                            Path(work))
        cache_build_s = time.perf_counter() - t0
        (Path(work) / "meta.json").write_text('{"format": 1}')
        sources = {"cut": CutSource(CutCache(work)),
                   "classic": ClassicSource(split, backbone.preprocessing, copies, paths,
                                            labels, params)}
        timings: dict[str, dict[str, list[float]]] = {}
        for path_name in ("classic", "cut"):
            source = sources[path_name]
            own_split, own_head = copy.deepcopy(split), copy.deepcopy(head)
            if path_name == "classic":
                source.split = own_split
            model = trainable_model(own_split, own_head)
            optimizer = make_optimizer(own_split, own_head, params)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
            generator = torch.Generator().manual_seed(params.seed)
            y = torch.from_numpy(labels["train"])
            train_s, val_s = [], []
            for epoch in range(1, epochs + 1):
                set_bn_modes(own_split, params.train_bn)
                order = torch.randperm(len(y), generator=generator)
                t0 = time.perf_counter()
                train_epoch(model, source, epoch, order, y, optimizer, scheduler,
                            params.batch_size, None, params.label_smoothing)
                train_s.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                evaluate(model, source, "val", params.batch_size)
                val_s.append(time.perf_counter() - t0)
            timings[path_name] = {"train": train_s, "val": val_s}
        probe = list(range(min(params.batch_size, len(paths["train"]))))
        probe_x = next(sources["cut"].train_batches(1, [probe]))
        step_model = trainable_model(copy.deepcopy(split), copy.deepcopy(head)).eval()
        macs_per_image = forward_macs(step_model, probe_x) / len(probe)
    ceiling_gflops = max(ceiling_before, matmul_gflops())

    def med(path_name: str, part: str) -> float:
        return statistics.median(timings[path_name][part])

    # forward + grad-input + grad-weight ~ 3x forward, 2 FLOP per multiply-accumulate
    train_gflop = 6 * macs_per_image * len(paths["train"]) / 1e9
    classic_epoch = med("classic", "train") + med("classic", "val")
    cut_epoch = med("cut", "train") + med("cut", "val")
    saved = classic_epoch - cut_epoch
    report = {
        "benchmark": "finetune_cut_vs_classic",
        "backbone": backbone.name,
        "input_size": backbone.preprocessing.input_size,
        "blocks": split.blocks,
        "cut_before": split.cut_module,
        "trainable_parameters": count_trainable(trainable_model(split, head)),
        "activation_shape": info["activation_shape"],
        "train_images": len(paths["train"]),
        "val_images": len(paths["val"]),
        "epochs_timed": epochs,
        "batch_size": params.batch_size,
        "augment": params.augment,
        "threads": threads,
        "available_cpus": available_cpus(),
        "cpu": cpu_name(),
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "classic": {"train_pass_s": round(med("classic", "train"), 3),
                    "val_pass_s": round(med("classic", "val"), 3),
                    "epoch_s": round(classic_epoch, 3)},
        "cut": {"train_pass_s": round(med("cut", "train"), 3),
                "val_pass_s": round(med("cut", "val"), 3),
                "epoch_s": round(cut_epoch, 3)},
        "speedup_train_pass": round(med("classic", "train") / med("cut", "train"), 2),
        "speedup_epoch": round(classic_epoch / cut_epoch, 2),
        "cache_build_s": round(cache_build_s, 3),
        "cache_views": info["views"],
        "break_even_epochs": round(cache_build_s / saved, 2) if saved > 0 else None,
        "compute": {
            "trainable_forward_gmac_per_image": round(macs_per_image / 1e9, 4),
            "trainable_train_gflop_per_epoch": round(train_gflop, 4),
            "cut_train_pass_gflops": round(train_gflop / med("cut", "train"), 2),
            "cpu_fp32_matmul_gflops": round(ceiling_gflops, 1),
        },
    }
    write_json(out_path, report)
    c, k = report["classic"], report["cut"]
    print(f"backbone {backbone.name} @ {report['input_size']}px, blocks {split.blocks} (cut "
          f"before {split.cut_module}), {report['train_images']} train / "
          f"{report['val_images']} val images, batch {params.batch_size}, {threads} threads "
          f"({report['cpu']})")
    print(f"training pass  classic {c['train_pass_s']:8.2f} s | cut {k['train_pass_s']:8.2f} s | "
          f"speedup {report['speedup_train_pass']:.2f}x")
    print(f"validation     classic {c['val_pass_s']:8.2f} s | cut {k['val_pass_s']:8.2f} s")
    print(f"epoch          classic {c['epoch_s']:8.2f} s | cut {k['epoch_s']:8.2f} s | "
          f"speedup {report['speedup_epoch']:.2f}x")
    print(f"cut cache build {report['cache_build_s']:.2f} s ({info['views']} views); pays for "
          f"itself after {report['break_even_epochs']} epochs")
    work = report["compute"]
    print(f"trainable step {work['trainable_train_gflop_per_epoch']:.1f} GFLOP per epoch "
          f"(convolutions + linear, forward + backward): the cut path's training pass runs it "
          f"at {work['cut_train_pass_gflops']:.1f} GFLOP/s; this CPU's FP32 matrix-product "
          f"ceiling is {work['cpu_fp32_matmul_gflops']:.1f} GFLOP/s")
    print(f"wrote {out_path}")
    return report
