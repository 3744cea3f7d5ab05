"""Does ``interpret``'s train-split loss ranking find mislabeled images? Measure it.

``pipeline interpret`` ranks the training images by the exported model's loss and says the top
of that list is where to look for wrong labels. This command checks that claim on your data:
it flips the labels of ``--flips`` seeded, randomly chosen training images to another class,
trains on the noisy labels with the real stage functions (features -> train_head -> cut_cache
-> finetune -> export -> interpret, in a temporary folder, params from params.yaml), once with
the head alone (``finetune.enabled: false``) and once fine-tuned, and reports where the flipped
images land in the train-loss ranking: recall at K (the share of flipped images among the K
highest losses) for K = the number flipped and twice that, the median rank, and what a random
ranking would give (K / training images). It also gives the clean test accuracy of each model,
so you see what the noise cost.

Prints the figures and writes them as JSON.

Run: ``pipeline noise-check --flips 25 --out reports/noise_check.json``
"""

from __future__ import annotations

import csv
import dataclasses
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from ..core.atomic import write_json
from ..core.runtime import machine_fingerprint
from ..core.config import ExportParams, InterpretParams
from ..core.dataset import read_prepared
from ..core.errors import PipelineError
from ..core.paths import ProjectPaths
from ..stages.export import run as export
from ..stages.interpret import run as interpret
from .sweep import SweepConfig, derived_prepared, run_chain, run_dir_of


def flip_labels(rows: list[dict[str, str]], classes: list[str], flips: int,
                seed: int) -> tuple[list[dict[str, str]], dict[str, tuple[str, str]]]:
    """Copy of ``rows`` with ``flips`` training labels changed to another class, chosen with
    ``seed``; and path -> (true label, noisy label) of the flipped ones."""
    train = [r["path"] for r in rows if r["split"] == "train"]
    if not 0 < flips < len(train):
        raise PipelineError(f"--flips must be between 1 and {len(train) - 1}, the training "
                            f"images less one (got {flips})")
    rng = random.Random(seed)
    chosen = set(rng.sample(sorted(train), flips))
    noisy, flipped = [], {}
    for row in rows:
        row = dict(row)
        if row["path"] in chosen:
            new = rng.choice([c for c in classes if c != row["label"]])
            flipped[row["path"]] = (row["label"], new)
            row["label"] = new
        noisy.append(row)
    return noisy, flipped


def ranking_figures(losses_csv: Path, flipped: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """Where the flipped images rank (1 = highest loss) in an interpret ``*_losses.csv``."""
    with open(losses_csv, newline="", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    rank = {r["path"]: i + 1 for i, r in enumerate(table)}
    ranks = sorted(rank[p] for p in flipped)
    n, total = len(flipped), len(table)
    figures: dict[str, Any] = {"train_images": total, "flipped": n,
                               "median_rank": statistics.median(ranks), "ranks": ranks}
    for k in (n, 2 * n):
        figures[f"recall_at_{k}"] = sum(r <= k for r in ranks) / n
        figures[f"random_recall_at_{k}"] = min(1.0, k / total)
    return figures


def run(cfg: SweepConfig, prepared_dir: str | Path, out_path: str | Path, flips: int = 25,
        seed: int = 0, threads: int = 0) -> dict[str, Any]:
    prepared_dir = Path(prepared_dir)
    summary, classes, rows = read_prepared(prepared_dir)
    noisy_rows, flipped = flip_labels(rows, classes, flips, seed)
    report: dict[str, Any] = {"backbone": cfg.backbone.name, "flips": flips, "seed": seed,
                              "finetune_params": dataclasses.asdict(cfg.finetune),
                              "flipped": {p: {"true": t, "noisy": n}
                                          for p, (t, n) in sorted(flipped.items())},
                              "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        noisy = derived_prepared(prepared_dir, noisy_rows, work / "prepared")
        features_dir = None
        for name, enabled in (("head_only", False), ("finetuned", True)):
            started = time.perf_counter()
            c = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune,
                                                                      enabled=enabled))
            print(f"noise-check: {name}, {flips} of {summary['split_counts']['train']} "
                  "training labels flipped", flush=True)
            run_chain(c, noisy, work / name, features_dir=features_dir)
            features_dir = ProjectPaths(work / name).features  # labels do not change features
            model_dir = ProjectPaths(run_dir_of(work / name, c.finetune.lr_backbone))
            out = ProjectPaths(work / name)
            exported = export(ExportParams(variants=(), threads=threads), model_dir.model,
                              model_dir.model_config, noisy, out.onnx, out.variants,
                              out.report_file("export"))
            interpret(InterpretParams(splits=("train",), threads=threads), out.onnx, noisy,
                      out.interpret, out.report_file("interpret"))
            figures = ranking_figures(out.interpret / "train_losses.csv", flipped)
            figures["test_accuracy"] = exported["variants"]["fp32"]["test_accuracy"]
            figures["seconds"] = round(time.perf_counter() - started, 1)
            report["models"][name] = figures
    report["machine"] = machine_fingerprint()  # every figure names its machine
    write_json(out_path, report)
    for name, f in report["models"].items():
        n = f["flipped"]
        print(f"noise-check {name}: of {n} flipped labels, {f[f'recall_at_{n}']:.0%} are in the "
              f"top {n} train losses and {f[f'recall_at_{2 * n}']:.0%} in the top {2 * n} "
              f"(random ranking: {f[f'random_recall_at_{n}']:.1%} / "
              f"{f[f'random_recall_at_{2 * n}']:.1%}); median rank {f['median_rank']} of "
              f"{f['train_images']}; clean test accuracy {f['test_accuracy']:.4f}")
    print(f"wrote {out_path}")
    return report
