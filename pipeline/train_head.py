"""Stage 3, train_head: train a new classification head on the cached backbone features.

Linear by default (``train_head.head: mlp`` for a hidden layer with dropout). Seeded AdamW with
linear warm-up and cosine decay, class weighting for imbalance, optional label smoothing, and
early stopping on the validation loss (the best epoch's weights are kept).

Outputs: ``--model`` (safetensors) and ``--config`` (JSON: head shape, classes, backbone,
preprocessing), ``--metrics`` (``{"val": ..., "test": ...}`` with accuracy, macro F1 and per-class
scores) and, in ``--plots``, ``training.csv`` (curves) and ``confusion.csv`` (test predictions).

Run: ``pipeline train-head --features data/features --model models/head.safetensors ...``
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .atomic import write_csv, write_json
from .errors import PipelineError
from .evaluation import classification_report
from .features import FeatureCache, load_cache
from .params import as_dict, param
from .runtime import resolve_threads


@dataclass(frozen=True)
class TrainHeadParams:
    """``train_head`` section of params.yaml."""

    head: Literal["linear", "mlp"] = "linear"
    hidden_dim: int = param(512, ge=1)
    dropout: float = param(0.0, ge=0.0, lt=1.0)
    epochs: int = param(100, ge=1)
    batch_size: int = param(64, ge=1)
    lr: float = param(1e-3, gt=0.0, le=10.0)
    weight_decay: float = param(1e-4, ge=0.0)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: int = param(2, ge=0)
    patience: int = param(15, ge=0, help="epochs without val-loss improvement; 0 disables")
    class_weighting: Literal["balanced", "none"] = "balanced"
    label_smoothing: float = param(0.0, ge=0.0, lt=1.0)
    std_floor: float = param(1.0, gt=0.0, help="feature std floor, as a multiple of the mean "
                             "std over channels")
    seed: int = param(0, ge=0)
    threads: int = param(0, ge=0)


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """sklearn's 'balanced' weights: n / (k * count_c); absent classes get weight 0."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.zeros(num_classes)
    present = counts > 0
    weights[present] = len(labels) / (present.sum() * counts[present])
    return weights.astype(np.float32)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_step(head: Any, optimizer: Any, x: Any, y: Any, weight: Any = None,
               label_smoothing: float = 0.0) -> float:
    """One optimisation step of the head on a batch; returns the batch loss."""
    import torch.nn.functional as F

    loss = F.cross_entropy(head(x), y, weight=weight, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def new_head(xt: Any, train_y: np.ndarray, num_classes: int,
             params: TrainHeadParams) -> tuple[Any, Any]:
    """A freshly initialised head (seeded by the caller) that normalises with the training
    features' mean/std, and the class weights of the loss (None without weighting)."""
    import torch

    from .heads import Head, HeadConfig

    head = Head(HeadConfig(params.head, xt.shape[1], num_classes, params.hidden_dim,
                           params.dropout))
    head.feature_mean.copy_(xt.mean(0))
    std = xt.std(0, unbiased=False)
    # a channel (nearly) constant on clean training images must not be blown up on other
    # images (augmented views in fine-tuning, the user's photos after deployment)
    head.feature_std.copy_(std.clamp_min(max(float(std.mean()) * params.std_floor, 1e-6)))
    weight = (torch.from_numpy(class_weights(train_y, num_classes))
              if params.class_weighting == "balanced" else None)
    return head, weight


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
    steps_per_epoch = math.ceil(len(xt) / params.batch_size)
    total, warmup = params.epochs * steps_per_epoch, params.warmup_epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, params.schedule))
    generator = torch.Generator().manual_seed(params.seed)
    best_loss, best_epoch, best_state, stale = math.inf, 0, None, 0
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
        if val_loss < best_loss - 1e-6:
            best_loss, best_epoch, stale = val_loss, epoch, 0
            best_state = {k: v.clone() for k, v in head.state_dict().items()}
        else:
            stale += 1
            if params.patience and stale >= params.patience:
                break
    if best_state is None:
        raise PipelineError(f"train_head: the val loss was never finite at lr {params.lr:g} "
                            "(training diverged); lower train_head.lr")
    head.load_state_dict(best_state)
    return TrainResult(head.eval(), history, best_epoch, time.perf_counter() - started)


def predict(head: Any, features: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return head(torch.from_numpy(np.ascontiguousarray(features))).argmax(1).numpy()


def run(params: TrainHeadParams, features_dir: str | Path, model_path: str | Path,
        config_path: str | Path, metrics_path: str | Path, plots_dir: str | Path) -> dict[str, Any]:
    """Train on the cache in ``features_dir``; write head, config, metrics and plots."""
    import torch

    from .heads import save_head

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
    keys = ("epoch", "train_loss", "val_loss", "val_accuracy", "lr")
    write_csv(plots_dir / "training.csv", keys,
              ([row[k] if k == "epoch" else f"{row[k]:.6g}" for k in keys]
               for row in result.history))
    write_csv(plots_dir / "confusion.csv", ("actual", "predicted"),
              ((classes[a], classes[p]) for a, p in zip(test_y, test_pred)))
    write_json(metrics_path, metrics)
    print(f"train_head: {len(result.history)} epochs in {result.seconds:.1f} s, best epoch "
          f"{result.best_epoch}; val accuracy {metrics['val']['accuracy']:.4f}, test accuracy "
          f"{metrics['test']['accuracy']:.4f}, test macro F1 {metrics['test']['macro_f1']:.4f}")
    return metrics
