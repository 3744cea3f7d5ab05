"""LR range test for the head on the cached features (fastai's ``lr_find``), checked by training.

Trains a fresh head (the ``train_head`` params: head type, batch size, weight decay, class
weighting, label smoothing, seed) on the cached training features while the learning rate
grows exponentially from ``--lr-min`` to ``--lr-max`` over ``--steps`` batches, one step per
LR, and records the loss (also smoothed: an exponential moving average with bias correction,
as fastai does, but with 0.9 instead of 0.98 so the curve does not lag the LR). It stops early
once the smoothed loss exceeds 4x its minimum (diverged).

Two suggestions are read off the smoothed curve: ``steepest`` (where the loss falls fastest
per log-LR step) and ``minimum / 10`` (a tenth of the LR at the lowest loss, the classic rule).
Because a suggestion is a heuristic, the command then *checks* it: it trains the real head
(``fit_head``, all ``train_head`` params) at each suggested LR and at ``train_head.lr`` and
reports val loss and accuracy, so you pick an LR on evidence. It reads only the feature cache,
so it takes seconds; the test split is never used.

Writes ``lr_find.json`` and ``lr_find.png`` into ``--out``.

Run: ``pipeline lr-find --features data/features --out reports/lr_find``
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..core.atomic import atomic_file, write_json
from ..core.caches import load_cache
from ..core.config import TrainHeadParams
from ..core.errors import PipelineError
from ..core.runtime import machine_fingerprint, resolve_threads
from ..core.training import train_step
from ..stages.train_head import fit_head, new_head

# lighter than fastai's 0.98, which lags the raw loss by ~3 LR decades over 100 steps
SMOOTHING = 0.9
DIVERGED = 4.0  # stop once the smoothed loss exceeds this multiple of its minimum


def range_test(train_x: np.ndarray, train_y: np.ndarray, num_classes: int,
               params: TrainHeadParams, lr_min: float, lr_max: float,
               steps: int) -> dict[str, list[float]]:
    """LR, raw loss and smoothed loss per step of an exponentially growing LR."""
    import torch

    torch.manual_seed(params.seed)
    xt, yt = torch.from_numpy(np.ascontiguousarray(train_x)), torch.from_numpy(train_y)
    head, weight = new_head(xt, train_y, num_classes, params)
    head.train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr_min, weight_decay=params.weight_decay)
    generator = torch.Generator().manual_seed(params.seed)
    growth = (lr_max / lr_min) ** (1.0 / max(1, steps - 1))
    order = torch.randperm(len(xt), generator=generator)
    cursor, average, best = 0, 0.0, math.inf
    curve: dict[str, list[float]] = {"lr": [], "loss": [], "smoothed_loss": []}
    for step in range(steps):
        lr = lr_min * growth ** step
        for group in optimizer.param_groups:
            group["lr"] = lr
        if cursor + params.batch_size > len(xt):  # a new epoch: reshuffle
            order, cursor = torch.randperm(len(xt), generator=generator), 0
        idx = order[cursor:cursor + params.batch_size]
        cursor += params.batch_size
        loss = train_step(head, optimizer, xt[idx], yt[idx], weight, params.label_smoothing)
        if not math.isfinite(loss):
            break
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        smoothed = average / (1 - SMOOTHING ** (step + 1))
        curve["lr"].append(lr)
        curve["loss"].append(loss)
        curve["smoothed_loss"].append(smoothed)
        best = min(best, smoothed)
        if smoothed > DIVERGED * best:
            break
    return curve


def suggestions(curve: dict[str, list[float]]) -> dict[str, float]:
    """``steepest`` and ``minimum_over_10`` LRs read off the smoothed curve."""
    lrs, smoothed = np.array(curve["lr"]), np.array(curve["smoothed_loss"])
    if len(lrs) < 3:
        raise PipelineError("lr-find: the loss diverged within the first steps; lower --lr-min")
    # skip the first steps: the moving average has not settled there
    start = min(len(lrs) // 10, len(lrs) - 3)
    slope = np.gradient(smoothed[start:], np.log(lrs[start:]))
    lowest = int(np.argmin(smoothed))
    return {"steepest": float(lrs[start + int(np.argmin(slope))]),
            "minimum_over_10": float(lrs[lowest] / 10.0)}


def run(params: TrainHeadParams, features_dir: str | Path, out_dir: str | Path,
        lr_min: float = 1e-6, lr_max: float = 10.0, steps: int = 100) -> dict[str, Any]:
    import torch

    if not 0 < lr_min < lr_max:
        raise PipelineError(f"--lr-min must be > 0 and below --lr-max (got {lr_min:g}, "
                            f"{lr_max:g})")
    torch.set_num_threads(resolve_threads(params.threads))
    cache = load_cache(features_dir)
    classes = cache.meta["classes"]
    train_x, train_y = cache.split("train")
    val_x, val_y = cache.split("val")
    if len(train_x) == 0 or len(val_x) == 0:
        raise PipelineError(f"{features_dir}: the train or val split is empty; re-run prepare")
    curve = range_test(train_x, train_y, len(classes), params, lr_min, lr_max, steps)
    suggested = suggestions(curve)
    checks = []
    for name, lr in [("train_head.lr", params.lr)] + sorted(suggested.items()):
        try:
            result = fit_head(train_x, train_y, val_x, val_y, len(classes),
                              dataclasses.replace(params, lr=lr))
        except PipelineError:  # diverged at this LR: that is the finding
            checks.append({"lr_from": name, "lr": lr, "val_loss": None, "val_accuracy": None,
                           "diverged": True})
            continue
        best = result.history[result.best_epoch - 1]
        checks.append({"lr_from": name, "lr": lr, "val_loss": best["val_loss"],
                       "val_accuracy": best["val_accuracy"], "best_epoch": result.best_epoch,
                       "epochs_run": len(result.history), "diverged": False})
    report = {"features": str(features_dir), "train_images": int(len(train_x)),
              "lr_min": lr_min, "lr_max": lr_max, "steps_run": len(curve["lr"]),
              "suggestions": suggested, "checked_by_training": checks, "curve": curve}
    out_dir = Path(out_dir)
    report["machine"] = machine_fingerprint()  # every figure names its machine
    write_json(out_dir / "lr_find.json", report)
    plot(report, out_dir / "lr_find.png")
    for c in checks:
        print(f"lr-find: {c['lr_from']:16s} lr {c['lr']:.3g}: " + (
            "diverged" if c["diverged"] else f"val loss {c['val_loss']:.4f}, val accuracy "
            f"{c['val_accuracy']:.4f} (best epoch {c['best_epoch']})"))
    print(f"wrote {out_dir / 'lr_find.json'} and lr_find.png")
    return report


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = report["curve"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(curve["lr"], curve["loss"], color="lightgrey", label="loss")
    ax.plot(curve["lr"], curve["smoothed_loss"], label="smoothed loss")
    for (name, lr), marker in zip(sorted(report["suggestions"].items()), ("o", "s")):
        y = float(np.interp(np.log(lr), np.log(curve["lr"]), curve["smoothed_loss"]))
        ax.plot([lr], [y], marker, label=f"{name}: {lr:.2g}")
    ax.set_xscale("log")
    # the raw loss explodes at the end: scale the axis to the smoothed curve
    smoothed = curve["smoothed_loss"]
    ax.set_ylim(min(smoothed) * 0.9, max(smoothed[0], min(smoothed) * 2) * 1.2)
    ax.set_xlabel("learning rate (head, one step each)")
    ax.set_ylabel("training loss")
    ax.set_title(f"LR range test: {report['train_images']} training images")
    ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
