"""Which strategy should I use? Measure it: blocks sweep, from-scratch baseline, learning curve.

The seed articles give rules of thumb (small/large data x similar/different to ImageNet -> how
many layers to freeze). This command measures them on *your* data with the real stage functions
(features -> train_head -> cut_cache -> finetune), each run in its own temporary folder:

1. **blocks**: for each number of unfrozen block groups (and each ``--lr-backbone``, which
   share one cut cache), test/val accuracy, trainable parameters, training time and
   cut-cache time; the pair with the best val accuracy is recommended.
2. **from scratch**: the same architecture with random weights, every block trained (BatchNorm
   in training mode, classic path, one LR for all, ``--scratch-lr``), the same epochs,
   schedule, early stopping and augmentation: what transfer buys you. It reports the best
   *trained* epoch on val (never the untrained warm start); the linear head on the random
   network's features is reported beside it as ``random_features_head``.
3. **learning curve**: head only, fine-tuned (``finetune.blocks`` from params) and from scratch
   on seeded, stratified fractions of the training split (val and test unchanged).

Writes ``sweep.json``, ``sweep.md`` (tables) and ``sweep.png`` (plots) into ``--out``.

Run: ``pipeline sweep --blocks 0,1,2,3 --fractions 0.1,0.25,0.5,1 --scratch-fractions 0.1,0.25,0.5,1``
"""

from __future__ import annotations

import csv
import dataclasses
import json
import random
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from ..core.atomic import atomic_file, write_csv, write_json, write_text
from ..core.runtime import machine_fingerprint
from ..core.config import (
    BackboneParams,
    FeaturesParams,
    FinetuneParams,
    TrainHeadParams,
)
from ..core.copies import COPIES_FILE, INDEX_FILE
from ..core.dataset import MANIFEST_HEADER, image_root, read_prepared, sha256_file
from ..core.paths import ProjectPaths
from ..stages.cut_cache import run as build_cut_cache
from ..stages.features import run as extract_features
from ..stages.finetune import run as finetune
from ..stages.train_head import run as train_head


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    backbone: BackboneParams
    features: FeaturesParams
    head: TrainHeadParams
    finetune: FinetuneParams


def subset_prepared(prepared_dir: Path, fraction: float, seed: int, out: Path) -> Path:
    """A prepared folder whose train split keeps ``fraction`` of each class (val/test whole)."""
    summary, classes, rows = read_prepared(prepared_dir)
    rng = random.Random(seed)
    by_class: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        if row["split"] == "train":
            by_class[row["label"]].append(row)
    keep = set()
    for label in classes:
        items = by_class[label]
        n = max(1, round(len(items) * fraction))
        keep.update(r["path"] for r in rng.sample(items, n))
    chosen = [r for r in rows if r["split"] != "train" or r["path"] in keep]
    return derived_prepared(prepared_dir, chosen, out)


def derived_prepared(prepared_dir: Path, rows: list[dict[str, str]], out: Path) -> Path:
    """A prepared folder with these manifest rows, reading the images of ``prepared_dir``."""
    summary, classes, _ = read_prepared(prepared_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "manifest.csv", MANIFEST_HEADER, ([r[k] for k in MANIFEST_HEADER]
                                                     for r in rows))
    write_json(out / "classes.json", classes)
    sub = dict(summary)
    sub["root"] = str(image_root(prepared_dir, summary).resolve())
    sub["manifest_sha256"] = sha256_file(out / "manifest.csv")
    sub["num_images"] = len(rows)
    sub["split_counts"] = {s: sum(r["split"] == s for r in rows) for s in ("train", "val",
                                                                           "test")}
    write_json(out / "summary.json", sub)
    for name in (COPIES_FILE, INDEX_FILE):  # the decoded copies are shared, not duplicated
        link = out / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to((Path(prepared_dir) / name).resolve())
    return out


def run_dir_of(work: Path, lr_backbone: float) -> Path:
    """Where :func:`run_chain` writes the model, metrics and plots of one fine-tuning LR."""
    return work / f"lr_{lr_backbone:g}"


def run_chain(cfg: SweepConfig, prepared: Path, work: Path, features_dir: Path | None = None,
              head: tuple[Path, Path] | None = None, warm_start_candidate: bool = True,
              lr_backbones: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """features -> train_head -> cut_cache -> finetune in ``work``; reuse given parts.

    One row per fine-tuning LR in ``lr_backbones`` (default: the params' LR); they share the
    features, the head and the cut cache, which no LR changes."""
    work.mkdir(parents=True, exist_ok=True)
    paths = ProjectPaths(work)
    if head is None:
        if features_dir is None:
            features_dir = paths.features
            extract_features(cfg.backbone, cfg.features, prepared, features_dir)
        head = (paths.head, paths.head_config)
        head_metrics = train_head(cfg.head, features_dir, head[0], head[1],
                                  paths.report_file("head"), paths.plots_dir("head"))
    else:
        head_metrics = None
    t0 = time.perf_counter()
    cache_meta = build_cut_cache(cfg.backbone, cfg.finetune, prepared, paths.cut_cache)
    cache_s = time.perf_counter() - t0
    rows = []
    for lr in lr_backbones or [cfg.finetune.lr_backbone]:
        ft = dataclasses.replace(cfg.finetune, lr_backbone=lr)
        run_dir = ProjectPaths(run_dir_of(work, lr))
        metrics = finetune(cfg.backbone, ft, prepared, paths.cut_cache, head[0], head[1],
                           run_dir.model, run_dir.model_config, run_dir.report_file("finetune"),
                           run_dir.plots_dir("finetune"), run_dir.finetune_timing,
                           warm_start_candidate=warm_start_candidate)
        timing = json.loads(run_dir.finetune_timing.read_text())
        with open(run_dir.plots_dir("finetune") / "training.csv", newline="") as f:
            history = list(csv.DictReader(f))
        rows.append({
            "lr_backbone": lr,
            "test_accuracy": metrics["test"]["accuracy"],
            "val_accuracy": metrics["val"]["accuracy"],
            "head_only_test_accuracy": head_metrics["test"]["accuracy"] if head_metrics else None,
            "trainable_parameters": metrics["trainable_parameters"],
            "best_epoch": metrics["best_epoch"],
            "epochs_run": metrics["epochs_run"],
            # epoch 0 is the warm-started head; a rising or exploding loss shows a too-high LR
            "val_loss_per_epoch": [float(h["val_loss"]) for h in history],
            "train_seconds": timing["seconds_total"],
            "cut_cache_seconds": round(cache_s, 2) if cache_meta.get("cached") else 0.0,
            "mode": metrics["mode"],
        })
    return rows


SCRATCH_LR = 1e-3  # AdamW's usual LR for training a network from random init


def scratch_config(cfg: SweepConfig, lr: float = SCRATCH_LR) -> SweepConfig:
    """Same architecture, random init, every block trained with BN in training mode, one LR.

    Fine-tuning LRs are kept low to protect pretrained weights; random weights have nothing
    to protect, so the baseline gets a from-scratch LR (same epochs and schedule)."""
    return dataclasses.replace(
        cfg, backbone=dataclasses.replace(cfg.backbone, weights="none"),
        finetune=dataclasses.replace(cfg.finetune, blocks="all", mode="classic", train_bn=True,
                                     lr_backbone=lr, lr_head=lr, enabled=True))


def run(cfg: SweepConfig, prepared_dir: str | Path, features_dir: str | Path,
        head_model: str | Path, head_config: str | Path, out_dir: str | Path,
        blocks: Sequence[int | str], fractions: Sequence[float],
        scratch_fractions: Sequence[float], scratch_lr: float = SCRATCH_LR,
        lr_backbones: Sequence[float] | None = None) -> dict[str, Any]:
    """Run the sweep; ``lr_backbones`` (default: the params' LR) tries each fine-tuning LR
    at every block count, since the best LR depends on how much of the backbone trains."""
    prepared_dir = Path(prepared_dir)
    lr_backbones = list(lr_backbones or [cfg.finetune.lr_backbone])
    out_dir = Path(out_dir)
    report: dict[str, Any] = {"backbone": cfg.backbone.name, "finetune_params":
                              dataclasses.asdict(cfg.finetune), "scratch_lr": scratch_lr,
                              "lr_backbones": lr_backbones, "blocks": [], "curve": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for b in blocks:
            c = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, blocks=b))
            print(f"sweep: blocks {b}", flush=True)
            rows = run_chain(c, prepared_dir, work / f"blocks_{b}",
                             head=(Path(head_model), Path(head_config)),
                             # with no backbone block trained, lr_backbone changes nothing
                             lr_backbones=lr_backbones if b != 0 else lr_backbones[:1])
            report["blocks"] += [{"blocks": b, **row} for row in rows]
        if report["blocks"]:
            best = recommend(report["blocks"])
            report["recommended_blocks"] = best["blocks"]
            report["recommended_lr_backbone"] = best["lr_backbone"]
        for f in sorted(set(fractions) | set(scratch_fractions)):
            prepared = (prepared_dir if f >= 1.0 else
                        subset_prepared(prepared_dir, f, cfg.finetune.seed, work / f"prep_{f}"))
            n_train = read_prepared(prepared)[0]["split_counts"]["train"]
            entry: dict[str, Any] = {"fraction": f, "train_images": n_train}
            if f in fractions:
                print(f"sweep: fraction {f} (transfer)", flush=True)
                row, = run_chain(cfg, prepared, work / f"frac_{f}",
                                 features_dir=Path(features_dir) if f >= 1.0 else None)
                entry["head_only"] = row["head_only_test_accuracy"]
                entry["finetuned"] = row["test_accuracy"]
            if f in scratch_fractions:
                print(f"sweep: fraction {f} (from scratch)", flush=True)
                row, = run_chain(scratch_config(cfg, scratch_lr), prepared,
                                 work / f"scratch_{f}", warm_start_candidate=False)
                entry["scratch"] = row["test_accuracy"]
                entry["scratch_val"] = row["val_accuracy"]
                entry["scratch_best_epoch"] = row["best_epoch"]
                entry["random_features_head"] = row["head_only_test_accuracy"]
                entry["scratch_train_seconds"] = row["train_seconds"]
            report["curve"].append(entry)
    out_dir.mkdir(parents=True, exist_ok=True)
    report["machine"] = machine_fingerprint()  # every figure names its machine
    write_json(out_dir / "sweep.json", report)
    write_text(out_dir / "sweep.md", markdown(report))
    plot(report, out_dir / "sweep.png")
    print(markdown(report))
    print(f"wrote {out_dir}/sweep.json, sweep.md, sweep.png")
    return report


def recommend(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The row to use: best val accuracy, then fewest trainable parameters, then the first
    LR listed.

    Chosen on val only; test accuracy is reported, never used to choose."""
    return max(rows, key=lambda r: (r["val_accuracy"], -r["trainable_parameters"]))


def _fmt(value: Any) -> str:
    return "—" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Fine-tuning sweep ({report['backbone']})", "",
             "| block groups trained | lr_backbone | trainable parameters | test accuracy | "
             "val accuracy | best epoch | train s | cut cache s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["blocks"]:
        best = (r["blocks"], r["lr_backbone"]) == (report.get("recommended_blocks"),
                                                  report.get("recommended_lr_backbone"))
        mark = " (best on val)" if best else ""
        lr = "—" if r["blocks"] == 0 else f"{r['lr_backbone']:g}"
        lines.append(f"| {r['blocks']}{mark} | {lr} | {r['trainable_parameters']:,} | "
                     f"{_fmt(r['test_accuracy'])} | {_fmt(r['val_accuracy'])} | "
                     f"{r['best_epoch']} | {r['train_seconds']:.1f} | {r['cut_cache_seconds']:.1f} |")
    if not report["curve"]:
        return "\n".join(lines) + "\n"
    lines += ["", "Learning curve (test accuracy):", "",
              "| train fraction | train images | head only | fine-tuned | from scratch | "
              "random features + head |", "|---|---|---|---|---|---|"]
    for e in report["curve"]:
        lines.append(f"| {e['fraction']:g} | {e['train_images']} | {_fmt(e.get('head_only'))} "
                     f"| {_fmt(e.get('finetuned'))} | {_fmt(e.get('scratch'))} "
                     f"| {_fmt(e.get('random_features_head'))} |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [(label, [(e["train_images"], e[key]) for e in report["curve"]
                       if e.get(key) is not None])
              for key, label in (("head_only", "head only"), ("finetuned", "fine-tuned"),
                                 ("scratch", "from scratch"))]
    curves = [(label, pts) for label, pts in curves if pts]
    fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(11 if curves else 6, 4),
                             squeeze=False)
    left = axes[0][0]
    rows = report["blocks"]
    twin = left.twinx()
    for lr in report["lr_backbones"]:
        # blocks 0 trains no backbone weight, so it starts every LR's line
        pts = [r for r in rows if r["blocks"] == 0 or r["lr_backbone"] == lr]
        label = f" (lr_backbone {lr:g})"
        line, = left.plot([str(r["blocks"]) for r in pts], [r["test_accuracy"] for r in pts],
                          "o-", label="test accuracy" + label)
        twin.plot([str(r["blocks"]) for r in pts], [r["train_seconds"] for r in pts], "s:",
                  color=line.get_color(), alpha=0.5, label="train s" + label)
    left.set_xlabel("block groups trained")
    left.set_ylabel("test accuracy (solid)")
    left.set_title("Accuracy by unfrozen block groups")
    left.legend(fontsize="small")
    twin.set_ylabel("training seconds (dotted)")
    if curves:
        right = axes[0][1]
        for label, pts in curves:
            right.plot(*zip(*pts), "o-", label=label)
        right.set_xscale("log")
        right.set_xlabel("training images")
        right.set_ylabel("test accuracy")
        right.set_title("Learning curve")
        right.legend()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
