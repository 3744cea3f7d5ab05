"""The training-loop toolkit shared by head training and fine-tuning (and the tools built on them).

Small single-purpose pieces rather than one loop with flags:

* :func:`class_weights` / :func:`loss_weights`: sklearn's "balanced" class weights for the loss;
* :func:`decay_groups` and :func:`warmup_cosine`: AdamW parameter groups (no decay on 1-D tensors:
  biases and norm weights) and the per-step schedule (linear warm-up, then cosine or constant);
* :func:`train_step`: one optimisation step on a batch;
* :class:`EarlyStopping`: epochs without a val-loss gain, and when to stop;
* :class:`BestState`: the best epoch's score, number and a copy of its weights;
* :func:`save_resume` / :func:`load_resume`: the per-epoch resume state (``weights_only`` load);
* :func:`write_history`: the per-epoch curves as the CSV that ``dvc plots`` reads.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .atomic import atomic_file, write_csv

HISTORY_KEYS = ("epoch", "train_loss", "val_loss", "val_accuracy", "lr")


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """sklearn's 'balanced' weights: n / (k * count_c); absent classes get weight 0."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.zeros(num_classes)
    present = counts > 0
    weights[present] = len(labels) / (present.sum() * counts[present])
    return weights.astype(np.float32)


def loss_weights(labels: np.ndarray, num_classes: int, class_weighting: str) -> Any:
    """The loss's class weights as a tensor (``balanced``), or None (``none``)."""
    import torch

    if class_weighting != "balanced":
        return None
    return torch.from_numpy(class_weights(labels, num_classes))


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """LR multiplier at ``step``: linear warm-up, then cosine decay to 0 or constant."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_cosine(optimizer: Any, epochs: int, steps_per_epoch: int, warmup_epochs: int,
                  schedule: str) -> Any:
    """A per-step LambdaLR following :func:`lr_factor`."""
    import torch

    total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, schedule))


def decay_groups(module: Any, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups of ``module``'s trainable tensors: decay on matrices and kernels, none on
    1-D tensors (biases, norm weights); empty groups are left out."""
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim > 1]
    plain = [p for p in module.parameters() if p.requires_grad and p.ndim <= 1]
    return [g for g in ({"params": decay, "lr": lr, "weight_decay": weight_decay},
                        {"params": plain, "lr": lr, "weight_decay": 0.0}) if g["params"]]


def train_step(model: Any, optimizer: Any, x: Any, y: Any, weight: Any = None,
               label_smoothing: float = 0.0) -> float:
    """One optimisation step on a batch; returns the batch loss."""
    import torch.nn.functional as F

    loss = F.cross_entropy(model(x), y, weight=weight, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


class EarlyStopping:
    """Counts epochs whose val loss did not beat the best by ``min_delta``; ``stop`` once
    ``patience`` of them follow each other (``patience`` 0 never stops)."""

    def __init__(self, patience: int, min_delta: float = 1e-6) -> None:
        self.patience, self.min_delta = patience, min_delta
        self.best, self.stale = math.inf, 0

    def update(self, val_loss: float) -> bool:
        """Record an epoch; True when it improved on the best val loss."""
        if val_loss < self.best - self.min_delta:
            self.best, self.stale = val_loss, 0
            return True
        self.stale += 1
        return False

    @property
    def stop(self) -> bool:
        return bool(self.patience) and self.stale >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "stale": self.stale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.stale = state["best"], state["stale"]


class BestState:
    """The best epoch so far: its score (higher is better; tuples compare in order), its number
    and a detached copy of the model's weights."""

    def __init__(self, model: Any, score: Any = None, epoch: int = 0) -> None:
        self.model, self.score, self.epoch = model, score, epoch
        self.state: dict[str, Any] | None = None

    def snapshot(self) -> dict[str, Any]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def keep(self, epoch: int, score: Any = None) -> None:
        """Make ``epoch`` (with ``score``) the best one, copying the weights now."""
        self.score, self.epoch, self.state = score, epoch, self.snapshot()

    def offer(self, epoch: int, score: Any) -> bool:
        """Keep ``epoch`` if ``score`` beats the best one (or there is none yet)."""
        if self.score is None or score > self.score:
            self.keep(epoch, score)
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "score": list(self.score) if isinstance(
            self.score, tuple) else self.score, "state": self.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        score = state["score"]
        self.epoch, self.state = state["epoch"], state["state"]
        self.score = tuple(score) if isinstance(score, list) else score

    def restore(self) -> None:
        """Load the best weights back into the model."""
        assert self.state is not None
        self.model.load_state_dict(self.state)


def save_resume(path: Path, state: dict[str, Any]) -> None:
    """Write the resume state atomically (a killed write leaves the previous state)."""
    import torch

    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def load_resume(path: Path | None, key: str) -> dict[str, Any] | None:
    """The resume state at ``path`` if it was written for ``key`` (same params, data, code);
    loaded with ``weights_only=True``, so nothing in it is unpickled as code."""
    import torch

    if path is None or not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state if state.get("key") == key else None


def write_history(path: str | Path, history: Iterable[dict[str, float]]) -> None:
    """Per-epoch curves (``HISTORY_KEYS``) as CSV; a NaN (epoch 0's train loss) stays empty."""
    write_csv(path, HISTORY_KEYS,
              ([row[k] if k == "epoch" else ("" if math.isnan(row[k]) else f"{row[k]:.6g}")
                for k in HISTORY_KEYS] for row in history))
