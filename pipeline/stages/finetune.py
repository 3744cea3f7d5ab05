"""Stage finetune: unfreeze the last block group(s) and train them with the head at a low LR.

The Keras recipe: the head trained by ``train_head`` on frozen features is the warm start, then
the last ``finetune.blocks`` block groups of the backbone (0 = head only, N, or ``all``) train
together with it, with discriminative learning rates (``lr_backbone``, ``lr_head``), AdamW
(no decay on biases and norms), linear warm-up then cosine, class weighting, label smoothing
and early stopping. The warm start itself is evaluated as epoch 0 and the best epoch on the
validation split is kept, so the result is never worse on val than the head alone.

BatchNorm in the frozen part always runs in inference mode; in the unfrozen blocks it follows
``finetune.train_bn`` (default off, as Keras advises for small data: running statistics stay
fixed, the scale and shift still learn).

Two paths give the same model (a test checks it):

* ``mode: cut`` (default): trains on the activations that ``cut_cache`` stored at the cut,
  epoch ``e`` using cached augmented view ``(e - 1) % views`` of every training image.
* ``mode: classic``: decodes and augments the images every epoch and runs the frozen prefix
  (no grad) before the trainable part: slower, but no cache on disk.

``finetune.device: cuda`` runs either path on the GPU, deterministic and in strict FP32.

With ``enabled: false`` the head-only model is written through the same outputs, so later stages
always read ``models/model.safetensors`` (``backbone.*`` and ``head.*`` tensors) and
``models/model.json``. The training state is saved after every epoch next to the model
(``.model.safetensors.resume.pt``): a killed run resumes after its last finished epoch and ends
with the same bytes as an uninterrupted one. Final outputs are written only at the end.

Run: ``pipeline finetune --prepared data/prepared --cut-cache data/cut_cache ...``
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from ..core.atomic import write_csv, write_json
from ..core.augment import view_of_epoch
from ..core.backbones import Backbone, build_backbone
from ..core.batches import check_same_backbone, image_batches, sequential_batches
from ..core.blocks import Split, set_bn_modes, split_backbone
from ..core.caches import CutCache, uses_cache
from ..core.config import BackboneParams, FinetuneParams
from ..core.copies import PreparedImages
from ..core.dataset import read_prepared, sha256_file, split_rows
from ..core.distributed import DistContext, context
from ..core.errors import PipelineError
from ..core.evaluation import classification_report
from ..core.heads import Head, load_head
from ..core.model import MODEL_FORMAT, module_device, save_model
from ..core.params import as_dict
from ..core.preprocess import Preprocessing
from ..core.runtime import resolve_threads, set_cuda_tf32
from ..core.training import (
    BestState,
    EarlyStopping,
    decay_groups,
    load_resume,
    loss_weights,
    save_resume,
    warmup_cosine,
    write_history,
)

# --------------------------------------------------------------------------- data sources


def training_layout(x: torch.Tensor) -> torch.Tensor:
    """Activation maps in channels-last memory order (about 2x faster convolutions on CPU:
    1.7x for the trainable blocks' forward + backward and 2.1x for the frozen prefix's forward,
    measured on Lite0 at batch 32); pooled features (2-D) as they are."""
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


class CutSource:
    """Training/eval inputs at the cut, read from the cut cache."""

    def __init__(self, cache: CutCache) -> None:
        self.cache = cache
        self.train = cache.array("train")
        self.train_labels = cache.labels("train")
        self.views = self.train.shape[1]

    def train_batches(self, epoch: int, batches: list[list[int]]) -> Iterator[torch.Tensor]:
        view = view_of_epoch(epoch, self.views)
        for indices in batches:
            yield training_layout(torch.from_numpy(np.array(self.train[indices, view],
                                                            dtype=np.float32)))

    def eval_batches(self, name: str, batch_size: int) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        data, labels = self.cache.array(name), self.cache.labels(name)
        for indices in sequential_batches(len(labels), batch_size):
            yield (training_layout(torch.from_numpy(np.array(data[indices[0]:indices[-1] + 1],
                                                             dtype=np.float32))),
                   labels[indices])


class ClassicSource:
    """Training/eval inputs at the cut, made every epoch from the images by the frozen prefix."""

    def __init__(self, split: Split, pp: Preprocessing, images: PreparedImages,
                 keys: dict[str, list[str]], labels: dict[str, np.ndarray],
                 params: FinetuneParams) -> None:
        self.split, self.pp, self.images, self.keys, self.labels = split, pp, images, keys, labels
        self.params = params
        self.train_labels = labels["train"]
        self.views = params.cached_views

    def _prefix(self, batch: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            x = torch.from_numpy(batch).to(module_device(self.split.prefix))
            return self.split.prefix(training_layout(x))

    def train_batches(self, epoch: int, batches: list[list[int]]) -> Iterator[torch.Tensor]:
        p = self.params
        stream = image_batches(self.images, self.keys["train"], self.pp, batches, p.workers,
                               p.augment, p.seed, view_of_epoch(epoch, self.views))
        for batch in stream:
            yield self._prefix(batch)

    def eval_batches(self, name: str, batch_size: int) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        batches = sequential_batches(len(self.keys[name]), batch_size)
        stream = image_batches(self.images, self.keys[name], self.pp, batches,
                               self.params.workers)
        for indices, batch in zip(batches, stream):
            yield self._prefix(batch), self.labels[name][indices]


# --------------------------------------------------------------------------- model and training


def training_device(name: str) -> torch.device:
    """``finetune.device`` as a torch device, with the switches that keep training
    reproducible there: on CUDA deterministic cuDNN, cuBLAS and strict FP32 (no TF32), so a
    re-run gives the same bytes and the model matches the CPU's to float rounding."""
    import os

    if name == "cuda":
        if not torch.cuda.is_available():
            raise PipelineError("finetune.device is cuda but torch sees no CUDA GPU; set "
                                "finetune.device: cpu")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        set_cuda_tf32(False)
    return torch.device(name)


def trainable_model(split: Split, head: Head) -> nn.Sequential:
    """The part that trains: suffix blocks then head (input: activations at the cut).

    Prefix, suffix and head move to channels-last memory order (see :func:`training_layout`);
    saved weights are made contiguous again."""
    split.prefix.to(memory_format=torch.channels_last)
    return nn.Sequential(split.suffix, head).to(memory_format=torch.channels_last)


def freeze_all_but_suffix(backbone: Backbone, split: Split) -> None:
    for p in backbone.model.parameters():
        p.requires_grad_(False)
    for p in split.suffix.parameters():
        p.requires_grad_(True)


def count_trainable(module: nn.Module) -> int:
    return sum(int(p.numel()) for p in module.parameters() if p.requires_grad)


def make_optimizer(split: Split, head: Head, params: FinetuneParams) -> torch.optim.AdamW:
    """AdamW with discriminative LRs; biases and norm weights (1-D tensors) get no decay."""
    return torch.optim.AdamW(decay_groups(split.suffix, params.lr_backbone, params.weight_decay)
                             + decay_groups(head, params.lr_head, params.weight_decay))


def evaluate(model: nn.Module, source: Any, name: str,
             batch_size: int) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(loss, accuracy, predictions, labels) of ``model`` on split ``name``, eval mode."""
    import torch.nn.functional as F

    was = [m.training for m in model.modules()]
    model.eval()
    device = module_device(model)
    losses, preds, labels = [], [], []
    with torch.no_grad():
        for x, y in source.eval_batches(name, batch_size):
            logits = model(x.to(device))
            yt = torch.from_numpy(y).to(device)
            losses.append(float(F.cross_entropy(logits, yt, reduction="sum")))
            preds.append(logits.argmax(1).cpu().numpy())
            labels.append(y)
    for m, flag in zip(model.modules(), was):
        m.train(flag)
    if not labels:
        return math.nan, math.nan, np.zeros(0, np.int64), np.zeros(0, np.int64)
    pred, true = np.concatenate(preds), np.concatenate(labels)
    return sum(losses) / len(true), float((pred == true).mean()), pred, true


def train_epoch(model: nn.Module, source: Any, epoch: int, order: torch.Tensor, labels: torch.Tensor,
                optimizer: torch.optim.Optimizer, scheduler: Any, batch_size: int,
                weight: torch.Tensor | None, label_smoothing: float,
                ctx: DistContext | None = None) -> float:
    """One pass over the training split in ``order``; returns the mean training loss.

    Under DistributedDataParallel every rank walks the same global batches and takes its
    contiguous share of each; its loss is scaled so that DDP's gradient average equals the
    single-process gradient of the whole batch (class weights and label smoothing included).
    """
    import torch.nn.functional as F

    batches = [sorted(order[s:s + batch_size].tolist()) for s in range(0, len(order), batch_size)]
    world, rank = (ctx.world_size, ctx.rank) if ctx is not None else (1, 0)
    shards = [np.array_split(np.array(b), world)[rank].tolist() for b in batches]
    device = module_device(model)
    running, seen = 0.0, 0
    for full, indices, x in zip(batches, shards, source.train_batches(epoch, shards)):
        x, y = x.to(device), labels[indices].to(device)
        if world == 1:
            loss = F.cross_entropy(model(x), y, weight=weight, label_smoothing=label_smoothing)
            batch_loss = float(loss.detach())
        else:
            w_all = (weight[labels[full].to(device)] if weight is not None else
                     torch.ones(len(full), device=device))
            local = F.cross_entropy(model(x), y, weight=weight, label_smoothing=label_smoothing,
                                    reduction="sum") / w_all.sum()
            loss = local * world  # DDP averages gradients over the ranks
            batch_loss = _all_sum(float(local.detach()), device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        running += batch_loss * len(full)
        seen += len(full)
    return running / max(1, seen)


def _all_sum(value: float, device: torch.device) -> float:
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64, device=device)  # NCCL: on the GPU
    dist.all_reduce(tensor)
    return float(tensor.item())


@dataclass
class FitResult:
    history: list[dict[str, float]]
    best_epoch: int
    seconds_per_epoch: list[float]
    resumed_from: int


def resume_path_of(model_path: Path) -> Path:
    """Where a run writing ``model_path`` keeps its per-epoch resume state."""
    return model_path.with_name(f".{model_path.name}.resume.pt")


def fit(split: Split, head: Head, source: Any, params: FinetuneParams, num_classes: int,
        resume_path: Path | None = None, resume_key: str = "",
        on_epoch_end: Callable[[int], None] | None = None,
        ctx: DistContext | None = None, warm_start_candidate: bool = True) -> FitResult:
    """Fine-tune suffix + head in place (the best epoch's weights are loaded at the end).

    The warm start (epoch 0) is evaluated and, when ``warm_start_candidate``, kept if no
    fine-tuning epoch beats it on val; the from-scratch baseline turns that off, so that it
    reports the trained network and not the head on random features.

    Under torchrun (``ctx.active``) the trainable part runs in DistributedDataParallel; every
    rank evaluates the whole val split with the same synchronised weights, so all ranks take
    the same best-epoch and early-stopping decisions; only rank 0 writes the resume state.
    """
    ctx = ctx or DistContext()
    device = training_device(params.device)
    torch.manual_seed(params.seed)  # seeds CUDA too
    model = trainable_model(split, head).to(device)
    split.prefix.to(device)  # the classic path runs the frozen prefix every step
    train_model: nn.Module = model
    if ctx.active:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(
            model, device_ids=[ctx.local_rank] if device.type == "cuda" else None)
    labels = torch.from_numpy(source.train_labels)
    weight = loss_weights(source.train_labels, num_classes, params.class_weighting)
    weight = weight.to(device) if weight is not None else None
    optimizer = make_optimizer(split, head, params)
    scheduler = warmup_cosine(optimizer, params.epochs, math.ceil(len(labels) / params.batch_size),
                              params.warmup_epochs, params.schedule)
    generator = torch.Generator().manual_seed(params.seed)
    val_loss, val_acc, _, _ = evaluate(model, source, "val", params.batch_size)
    history = [{"epoch": 0, "train_loss": math.nan, "val_loss": val_loss,
                "val_accuracy": val_acc, "lr": 0.0}]
    best = BestState(model)
    best.keep(0, (val_acc, -val_loss) if warm_start_candidate else (-math.inf, -math.inf))
    # early stopping compares fine-tuning epochs among themselves: the usual first-epoch dip
    # below the warm start must not end the run
    stopper = EarlyStopping(params.patience)
    start, seconds, resumed_from = 1, [], 0
    state = load_resume(resume_path, resume_key)
    if state is not None:
        for part, name in ((model, "model"), (optimizer, "optimizer"),
                           (scheduler, "scheduler"), (best, "best"), (stopper, "stopper")):
            part.load_state_dict(state[name])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        history, seconds = state["history"], state["seconds"]
        start = resumed_from = int(state["epoch"]) + 1
    for epoch in range(start, params.epochs + 1):
        if stopper.stop:
            break
        t0 = time.perf_counter()
        set_bn_modes(split, params.train_bn)
        head.train()
        order = torch.randperm(len(labels), generator=generator)
        train_loss = train_epoch(train_model, source, epoch, order, labels, optimizer,
                                 scheduler, params.batch_size, weight, params.label_smoothing,
                                 ctx)
        val_loss, val_acc, _, _ = evaluate(model, source, "val", params.batch_size)
        seconds.append(time.perf_counter() - t0)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                        "val_accuracy": val_acc, "lr": optimizer.param_groups[0]["lr"]})
        if ctx.is_main:
            print(f"finetune: epoch {epoch}/{params.epochs} train loss {train_loss:.4f} val "
                  f"loss {val_loss:.4f} val accuracy {val_acc:.4f} ({seconds[-1]:.1f} s)",
                  flush=True)
        best.offer(epoch, (val_acc, -val_loss))
        stopper.update(val_loss)
        if resume_path is not None and ctx.is_main:
            save_resume(resume_path, {
                "key": resume_key, "epoch": epoch, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "best": best.state_dict(), "stopper": stopper.state_dict(),
                "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "history": history, "seconds": seconds})
        ctx.barrier()
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    best.restore()
    model.eval()
    best_epoch = best.epoch
    return FitResult(history, best_epoch, seconds, resumed_from)
# --------------------------------------------------------------------------- stage


def headline(metrics: dict[str, Any], val_loss: float) -> dict[str, Any]:
    """The figures ``dvc metrics show`` compares across runs; the rest is in the report."""
    return {"val_acc": metrics["val"]["accuracy"], "test_acc": metrics["test"]["accuracy"],
            "test_f1": metrics["test"]["macro_f1"], "val_loss": val_loss}


def run(backbone_params: BackboneParams, params: FinetuneParams, prepared_dir: str | Path,
        cut_cache_dir: str | Path, head_model: str | Path, head_config: str | Path,
        model_path: str | Path, config_path: str | Path, report_path: str | Path,
        plots_dir: str | Path, timing_path: str | Path | None = None,
        on_epoch_end: Callable[[int], None] | None = None,
        backend: str = "auto", warm_start_candidate: bool = True,
        metrics_path: str | Path | None = None) -> dict[str, Any]:
    """Fine-tune (or, when disabled, pass the head-only model through); write all outputs.

    ``warm_start_candidate=False`` (the sweep's from-scratch baseline) keeps the best
    *trained* epoch even when the warm start scored higher on val.

    Runs as one process or under torchrun (DDP: gloo on CPUs, NCCL on GPUs); rank 0 writes the
    outputs. ``finetune.device: cuda`` trains (and evaluates) on the GPU; weights are saved
    from the CPU.
    """
    device = training_device(params.device)
    ctx = context(params.device, backend)
    threads = resolve_threads(params.threads)
    torch.set_num_threads(threads)
    # CUDA lacks deterministic kernels for a few backward ops: warn there, reruns are checked
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    model_path, plots_dir = Path(model_path), Path(plots_dir)
    summary, classes, rows = read_prepared(prepared_dir)
    head, head_cfg = load_head(head_model, head_config)
    backbone = build_backbone(backbone_params)
    fix = "re-run train_head for this backbone and data (dvc repro does it)"
    check_same_backbone(backbone.describe(), head_cfg["backbone"], str(head_config), fix)
    if head_cfg.get("manifest_sha256") != summary["manifest_sha256"]:
        raise PipelineError(f"{head_config}: the head was trained on other data (manifest hash "
                            f"differs from {prepared_dir}); {fix}")
    if head_cfg["classes"] != classes:
        raise PipelineError(f"{head_config}: the head's classes differ from {prepared_dir}; {fix}")
    blocks = params.blocks if params.enabled else 0
    split = split_backbone(backbone, blocks)
    freeze_all_but_suffix(backbone, split)
    cut_used = params.enabled and uses_cache(params, split)
    cache_meta = None
    if cut_used:
        cache = CutCache(cut_cache_dir)
        cache_meta = cache.meta
        cache.check_matches(backbone, split, params, summary["manifest_sha256"])
        source: Any = CutSource(cache)
    else:
        keys, labels = {}, {}
        for name in ("train", "val", "test"):
            keys[name], labels[name] = split_rows(rows, classes, name)
        source = ClassicSource(split, backbone.preprocessing, PreparedImages(prepared_dir), keys,
                               labels, params)
    model = trainable_model(split, head)
    trainable = count_trainable(model)
    started = time.perf_counter()
    if params.enabled:
        resume_key = hashlib.sha256(json.dumps({
            "params": as_dict(params), "threads": threads, "backbone": backbone.describe(),
            "manifest": summary["manifest_sha256"], "head": sha256_file(Path(head_model)),
            "cache": cache_meta, "warm_start_candidate": warm_start_candidate,
            "resume_format": 2,
        }, sort_keys=True, default=str).encode()).hexdigest()
        result = fit(split, head, source, params, len(classes), resume_path_of(model_path),
                     resume_key, on_epoch_end, ctx, warm_start_candidate)
    else:
        result = FitResult([], 0, [], 0)
    model.eval()
    val_loss, _, val_pred, val_true = evaluate(model, source, "val", params.batch_size)
    _, _, test_pred, test_true = evaluate(model, source, "test", params.batch_size)
    backbone.model.cpu()
    head.cpu()
    metrics = {
        "val": classification_report(val_true, val_pred, classes),
        "test": classification_report(test_true, test_pred, classes),
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history) - 1 if result.history else 0,
        "enabled": params.enabled,
        "mode": ("cut" if cut_used else "classic") if params.enabled else "head-only",
        "blocks": split.blocks,
        "num_block_groups": split.num_groups,
        "trainable_parameters": trainable,
        "head_only_val_accuracy": result.history[0]["val_accuracy"] if result.history else None,
    }
    if not ctx.is_main:
        ctx.barrier()
        ctx.close()
        return metrics
    config = {
        "format": MODEL_FORMAT,
        "classes": classes,
        "backbone": backbone.describe(),
        "preprocessing": backbone.preprocessing.to_dict(),
        "head": asdict(head.cfg),
        "cut": split.describe(),
        "manifest_sha256": summary["manifest_sha256"],
        "params": as_dict(params),
        "metrics": {"val_accuracy": metrics["val"]["accuracy"],
                    "test_accuracy": metrics["test"]["accuracy"],
                    "test_macro_f1": metrics["test"]["macro_f1"]},
    }
    save_model(backbone, head, model_path, config_path, config)
    write_history(plots_dir / "training.csv", result.history)
    write_csv(plots_dir / "confusion.csv", ("actual", "predicted"),
              ((classes[a], classes[p]) for a, p in zip(test_true, test_pred)))
    write_json(report_path, metrics)
    if metrics_path is not None:
        write_json(metrics_path, headline(metrics, val_loss))
    if timing_path is not None:
        write_json(timing_path, {
            "mode": metrics["mode"], "threads": threads, "epochs_run": metrics["epochs_run"],
            "resumed_from_epoch": result.resumed_from, "world_size": ctx.world_size,
            "seconds_per_epoch": [round(s, 3) for s in result.seconds_per_epoch],
            "seconds_total": round(time.perf_counter() - started, 3)})
    resume_path_of(model_path).unlink(missing_ok=True)
    ctx.barrier()
    ctx.close()
    where = f" on {ctx.world_size} processes" if ctx.active else ""
    print(f"finetune: {metrics['mode']}{where}, {split.blocks}/{split.num_groups} block groups, "
          f"{trainable:,} trainable parameters; best epoch {result.best_epoch}; val accuracy "
          f"{metrics['val']['accuracy']:.4f}, test accuracy {metrics['test']['accuracy']:.4f}, "
          f"test macro F1 {metrics['test']['macro_f1']:.4f}")
    return metrics
