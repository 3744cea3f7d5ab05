"""Stage train_head: train a new classification head on the cached backbone features.

Linear by default (``train_head.head: mlp`` for a hidden layer with dropout). Seeded AdamW with
linear warm-up and cosine decay, class weighting for imbalance, optional label smoothing, and
early stopping on the validation loss (the best epoch's weights are kept).

Outputs: ``--model`` (safetensors) and ``--config`` (JSON: head shape, classes, backbone,
preprocessing), ``--report`` (``{"val": ..., "test": ...}`` with accuracy, macro F1 and per-class
scores) and, in ``--plots``, ``training.csv`` (curves) and ``confusion.csv`` (test predictions).

Run: ``pipeline train-head --features data/features --model models/head.safetensors ...``
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.atomic import write_csv, write_json
from ..core.caches import FeatureCache, load_cache
from ..core.config import TrainHeadParams
from ..core.errors import PipelineError
from ..core.evaluation import classification_report
from ..core.params import as_dict
from ..core.runtime import resolve_threads
from ..core.training import (
    BestState,
    EarlyStopping,
    loss_weights,
    train_step,
    warmup_cosine,
    write_history,
)


def new_head(xt: Any, train_y: np.ndarray, num_classes: int,
             params: TrainHeadParams) -> tuple[Any, Any]:
    """A freshly initialised head (seeded by the caller) that normalises with the training
    features' mean/std, and the class weights of the loss (None without weighting)."""

    from ..core.heads import Head, HeadConfig

    head = Head(HeadConfig(params.head, xt.shape[1], num_classes, params.hidden_dim,
                           params.dropout))
    head.feature_mean.copy_(xt.mean(0))
    std = xt.std(0, unbiased=False)
    # a channel (nearly) constant on clean training images must not be blown up on other
    # images (augmented views in fine-tuning, the user's photos after deployment)
    head.feature_std.copy_(std.clamp_min(max(float(std.mean()) * params.std_floor, 1e-6)))
    return head, loss_weights(train_y, num_classes, params.class_weighting)


@dataclass
class TrainResult:
    head: Any
    history: list[dict[str, float]]
    best_epoch: int
    seconds: float


def fit_head(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
             num_classes: int, params: TrainHeadParams) -> TrainResult:
    """Train a head on feature arrays; deterministic for a given seed and thread count."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(params.seed)
    xt, yt = torch.from_numpy(np.ascontiguousarray(train_x)), torch.from_numpy(train_y)
    xv, yv = torch.from_numpy(np.ascontiguousarray(val_x)), torch.from_numpy(val_y)
    head, weight = new_head(xt, train_y, num_classes, params)
    optimizer = torch.optim.AdamW(head.parameters(), lr=params.lr,
                                  weight_decay=params.weight_decay)
    scheduler = warmup_cosine(optimizer, params.epochs, math.ceil(len(xt) / params.batch_size),
                              params.warmup_epochs, params.schedule)
    generator = torch.Generator().manual_seed(params.seed)
    stopper, best = EarlyStopping(params.patience), BestState(head)
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    for epoch in range(1, params.epochs + 1):
        head.train()
        order = torch.randperm(len(xt), generator=generator)
        running, seen = 0.0, 0
        for start in range(0, len(xt), params.batch_size):
            idx = order[start:start + params.batch_size]
            loss = train_step(head, optimizer, xt[idx], yt[idx], weight, params.label_smoothing)
            scheduler.step()
            running += loss * len(idx)
            seen += len(idx)
        head.eval()
        with torch.no_grad():
            logits = head(xv)
            val_loss = float(F.cross_entropy(logits, yv))
            val_acc = float((logits.argmax(1) == yv).float().mean())
        history.append({"epoch": epoch, "train_loss": running / seen, "val_loss": val_loss,
                        "val_accuracy": val_acc, "lr": optimizer.param_groups[0]["lr"]})
        if stopper.update(val_loss):
            best.keep(epoch)
        if stopper.stop:
            break
    if best.state is None:
        raise PipelineError(f"train_head: the val loss was never finite at lr {params.lr:g} "
                            "(training diverged); lower train_head.lr")
    best.restore()
    best_epoch = best.epoch
    return TrainResult(head.eval(), history, best_epoch, time.perf_counter() - started)


def predict(head: Any, features: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return head(torch.from_numpy(np.ascontiguousarray(features))).argmax(1).numpy()


def headline(metrics: dict[str, Any], val_loss: float) -> dict[str, Any]:
    """The figures ``dvc metrics show`` compares across runs; the rest is in the report."""
    return {"val_acc": metrics["val"]["accuracy"], "test_acc": metrics["test"]["accuracy"],
            "test_f1": metrics["test"]["macro_f1"], "val_loss": val_loss}


def run(params: TrainHeadParams, features_dir: str | Path, model_path: str | Path,
        config_path: str | Path, report_path: str | Path, plots_dir: str | Path,
        metrics_path: str | Path | None = None) -> dict[str, Any]:
    """Train on the cache in ``features_dir``; write head, config, metrics and plots."""
    import torch

    from ..core.heads import save_head

    torch.set_num_threads(resolve_threads(params.threads))
    torch.use_deterministic_algorithms(True)
    cache: FeatureCache = load_cache(features_dir)
    classes = cache.meta["classes"]
    train_x, train_y = cache.split("train")
    val_x, val_y = cache.split("val")
    test_x, test_y = cache.split("test")
    if len(train_x) == 0 or len(val_x) == 0:
        raise PipelineError(f"{features_dir}: the train or val split is empty; re-run prepare")
    result = fit_head(train_x, train_y, val_x, val_y, len(classes), params)
    test_pred = predict(result.head, test_x)
    metrics = {
        "val": classification_report(val_y, predict(result.head, val_x), classes),
        "test": classification_report(test_y, test_pred, classes),
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
    }
    save_head(result.head, model_path, config_path, {
        "classes": classes,
        "backbone": cache.meta["backbone"],
        "manifest_sha256": cache.meta["manifest_sha256"],
        "params": as_dict(params),
        "best_epoch": result.best_epoch,
    })
    plots_dir = Path(plots_dir)
    write_history(plots_dir / "training.csv", result.history)
    write_csv(plots_dir / "confusion.csv", ("actual", "predicted"),
              ((classes[a], classes[p]) for a, p in zip(test_y, test_pred)))
    write_json(report_path, metrics)
    if metrics_path is not None:
        write_json(metrics_path, headline(metrics, result.history[result.best_epoch - 1]["val_loss"]))
    print(f"train_head: {len(result.history)} epochs in {result.seconds:.1f} s, best epoch "
          f"{result.best_epoch}; val accuracy {metrics['val']['accuracy']:.4f}, test accuracy "
          f"{metrics['test']['accuracy']:.4f}, test macro F1 {metrics['test']['macro_f1']:.4f}")
    return metrics
