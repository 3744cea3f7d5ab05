"""Which backbone, which layer, how much fine-tuning: measured on the user's data.

The seed articles place a data set in a 2x2 table (small or large; similar to or different from
ImageNet) and give each cell a strategy: features from the top, features from earlier layers,
fine-tune the last blocks, fine-tune most of the network. This tool measures where the user's
data sits and checks the advice by training:

1. **Scores.** One forward pass per candidate backbone over a seeded sample of the train and
   val images gives pooled features at every block-group boundary at once
   (:class:`~pipeline.core.blocks.GroupFeatures`). Per (backbone, layer): LogME, a
   cross-validated logistic-probe accuracy and a leave-one-out k-NN accuracy, each accuracy
   with a bootstrap interval, the feature size and the seconds spent.
2. **Regime.** Size from the train images per class (``advise.large_per_class``); similarity
   from the best backbone's probe curve: where it peaks and how much it loses from the peak to
   the last layer (the "specificity" drop of Yosinski et al. 2014; more than
   ``advise.specificity_drop`` counts as different). The cell gives the params to paste.
3. **Verify** (``--verify K``): the real chain, on the real splits. The top K (backbone, layer)
   pairs by probe accuracy get a head trained on their cached features (``features`` then
   ``train_head``); two fine-tunes (today's params and a deeper, faster-learning one: half the
   block groups, LR 1e-3) race by successive halving: each runs its first
   ``advise.rung_epochs`` epochs of the full schedule, and the better on val resumes where it
   stopped and runs to the end (``finetune.epochs``, early stopping as configured). The verified choice is the best val
   accuracy; Kendall's tau says how well each score ranked the heads. Test accuracy is
   reported, never used to choose.

Writes ``reports/advise.json``, ``advise.md`` and ``advise.png`` (atomically); ``--apply``
writes the verified choice into ``params.yaml`` (comments kept), so ``dvc repro`` re-runs
exactly the stages it changes.

Run: ``pipeline advise`` or ``pipeline advise --verify 4 --apply``
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..core import transfer_scores as scores
from ..core.atomic import atomic_file, write_json, write_text
from ..core.config import (
    AdviseParams,
    BackboneParams,
    FeaturesParams,
    FinetuneParams,
    PrepareParams,
    TrainHeadParams,
)
from ..core.copies import PreparedImages
from ..core.dataset import read_prepared
from ..core.errors import PipelineError
from ..core.paths import ProjectPaths
from ..core.runtime import machine_fingerprint, resolve_threads

DEEP_LR = 1e-3  # the deeper fine-tune's LR for backbone and head: far data must move further


@dataclasses.dataclass(frozen=True)
class AdviseConfig:
    """The params sections advise reads (the configured chain is today's default)."""

    advise: AdviseParams
    prepare: PrepareParams
    backbone: BackboneParams
    features: FeaturesParams
    head: TrainHeadParams
    finetune: FinetuneParams


# --------------------------------------------------------------------------- candidates


class Copies:
    """The prepared folder, or a re-prepared copy in ``work`` when a candidate resizes to more
    than its copies' short side (Lite1 and Lite2 need 272 and 292 px; the default is 256)."""

    def __init__(self, prepare: PrepareParams, prepared_dir: Path, work: Path) -> None:
        self.prepare, self.prepared_dir, self.work = prepare, prepared_dir, work
        self.short_side = PreparedImages(prepared_dir).short_side

    def folder_for(self, resize: int) -> Path:
        if self.short_side is None or resize <= self.short_side:
            return self.prepared_dir
        out = self.work / f"prepared_{resize}"
        if not out.is_dir():
            from ..stages.prepare import run as prepare

            print(f"advise: re-preparing copies at short side {resize} (have "
                  f"{self.short_side})", flush=True)
            prepare(dataclasses.replace(self.prepare, short_side=resize), out)
        return out

    def needs(self, resize: int) -> list[str]:
        """The params line a candidate needs in the user's project."""
        return ([f"prepare.short_side={resize}"] if self.short_side is not None
                and resize > self.short_side else [])


def candidate_names(params: AdviseParams, configured: str) -> list[str]:
    """``advise.backbones``, or the configured backbone followed by the installed offline
    ones."""
    from ..core.backbones import offline_backbones

    names = list(params.backbones) or [configured, *offline_backbones()]
    return list(dict.fromkeys(name.strip() for name in names))


def sample_rows(rows: list[dict[str, str]], per_class: int, seed: int) -> list[dict[str, str]]:
    """A seeded sample of at most ``per_class`` train+val images per class, manifest order."""
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        if row["split"] in ("train", "val"):
            by_class[row["label"]].append(i)
    rng = random.Random(seed)
    keep = sorted(i for label in sorted(by_class) for i in
                  (by_class[label] if len(by_class[label]) <= per_class
                   else rng.sample(by_class[label], per_class)))
    return [rows[i] for i in keep]


def layer_features(backbone: Any, images: PreparedImages, keys: list[str], batch_size: int,
                   workers: int | None) -> list[np.ndarray]:
    """Pooled features at every block-group boundary for ``keys``, one forward pass."""
    import torch

    from ..core.batches import image_batches, sequential_batches
    from ..core.blocks import GroupFeatures

    net = GroupFeatures(backbone).eval()
    parts: list[list[np.ndarray]] = []
    stream = image_batches(images, keys, backbone.preprocessing,
                           sequential_batches(len(keys), batch_size), workers)
    with torch.inference_mode():
        for batch in stream:
            outputs = net(torch.from_numpy(batch))
            if not parts:
                parts = [[] for _ in outputs]
            for part, out in zip(parts, outputs):
                part.append(out.numpy().astype(np.float32))
    return [np.concatenate(part) for part in parts]


def score_layers(features: list[np.ndarray], labels: np.ndarray,
                 params: AdviseParams) -> list[dict[str, Any]]:
    """LogME, probe and k-NN accuracy (with intervals) per layer; the last is ``"last"``."""
    rows = []
    for k, f in enumerate(features):
        t0 = time.perf_counter()
        probe = scores.probe_predictions(f, labels, params.folds, params.seed)
        knn = scores.knn_predictions(f, labels, params.knn_k)
        rows.append({
            "layer": "last" if k == len(features) - 1 else k,
            "dim": int(f.shape[1]),
            "logme": round(scores.logme(f, labels), 4),
            "probe": scores.accuracy_with_interval(probe, labels, params.bootstrap, params.seed),
            "knn": scores.accuracy_with_interval(knn, labels, params.bootstrap, params.seed),
            "seconds": round(time.perf_counter() - t0, 2),
        })
    return rows


# --------------------------------------------------------------------------- the regime


def place(train_per_class: float, layers: list[dict[str, Any]], num_groups: int,
          params: AdviseParams, finetune: FinetuneParams) -> dict[str, Any]:
    """The seeds' 2x2 cell from the size and the best backbone's probe curve, and the
    params that cell recommends."""
    curve = [row["probe"]["accuracy"] for row in layers]
    best = max(curve)
    peak = max(i for i, value in enumerate(curve) if value == best)  # ties: the later layer
    drop = round(best - curve[-1], 4)
    size = "large" if train_per_class >= params.large_per_class else "small"
    similarity = "different" if drop > params.specificity_drop else "similar"
    layer: int | str = "last" if similarity == "similar" else layers[peak]["layer"]
    if size == "small":
        finetune_rec: dict[str, Any] = {"enabled": False}
        why = ("few images per class: train only a head" +
               (" on the last layer's features" if similarity == "similar" else
                f" on layer {layer}'s features, which beat the last layer by "
                f"{drop * 100:.1f} points"))
    elif similarity == "similar":
        finetune_rec = {"enabled": True, "blocks": finetune.blocks,
                        "lr_backbone": finetune.lr_backbone, "lr_head": finetune.lr_head}
        why = "many images, features that suit them: fine-tune the last block groups"
    else:
        finetune_rec = {"enabled": True, "blocks": deep_blocks(num_groups),
                        "lr_backbone": DEEP_LR, "lr_head": DEEP_LR}
        layer = "last"
        why = ("many images, far from ImageNet: fine-tune most of the network at a higher "
               "learning rate")
    return {"size": size, "similarity": similarity, "train_images_per_class": train_per_class,
            "peak_layer": layers[peak]["layer"], "peak_probe": best,
            "last_probe": curve[-1], "specificity_drop": drop, "layer": layer,
            "finetune": finetune_rec, "why": why}


def deep_blocks(num_groups: int) -> int:
    """"Most of the network" on a CPU budget: half the block groups, rounded up."""
    return max(1, math.ceil(num_groups / 2))


def params_lines(backbone: str, layer: int | str, finetune: dict[str, Any]) -> list[str]:
    """``-S`` overrides (for ``dvc exp run``) that apply a recommendation."""
    lines = [f"backbone.name={backbone}", f"backbone.layer={layer}",
             f"finetune.enabled={str(finetune['enabled']).lower()}"]
    lines += [f"finetune.{key}={finetune[key]}" for key in ("blocks", "lr_backbone", "lr_head")
              if key in finetune]
    return lines


# --------------------------------------------------------------------------- verification


def _head_chain(cfg: AdviseConfig, backbone: BackboneParams, prepared: Path,
                work: Path) -> dict[str, Any]:
    from ..stages.features import run as extract_features
    from ..stages.train_head import run as train_head

    paths = ProjectPaths(work)
    t0 = time.perf_counter()
    extract_features(backbone, cfg.features, prepared, paths.features)
    metrics = train_head(cfg.head, paths.features, paths.head, paths.head_config,
                         paths.report_file("head"), paths.plots_dir("head"))
    return {"val_accuracy": metrics["val"]["accuracy"],
            "test_accuracy": metrics["test"]["accuracy"],
            "seconds": round(time.perf_counter() - t0, 1)}


class RungEnd(Exception):
    """Raised after the rung's last epoch: the run's resume state is on disk."""


def _finetune_chain(cfg: AdviseConfig, backbone: BackboneParams, ft: FinetuneParams,
                    prepared: Path, work: Path, head_work: Path,
                    stop_after: int | None = None) -> dict[str, Any]:
    """Cut cache (once) and fine-tune with the full schedule; with ``stop_after``, stop
    after that epoch (a halving rung); a later call with the same arguments resumes there."""
    import torch

    from ..stages.cut_cache import run as build_cut_cache
    from ..stages.finetune import resume_path_of
    from ..stages.finetune import run as finetune

    heads, paths, run = ProjectPaths(head_work), ProjectPaths(work), ProjectPaths(work / "run")
    t0 = time.perf_counter()
    if not (paths.cut_cache / "meta.json").is_file():
        build_cut_cache(backbone, ft, prepared, paths.cut_cache)

    def end_of_rung(epoch: int) -> None:
        if stop_after is not None and epoch >= stop_after:
            raise RungEnd

    try:
        metrics = finetune(backbone, ft, prepared, paths.cut_cache, heads.head,
                           heads.head_config, run.model, run.model_config,
                           run.report_file("finetune"), run.plots_dir("finetune"),
                           run.finetune_timing, on_epoch_end=end_of_rung)
    except RungEnd:
        state = torch.load(resume_path_of(run.model), map_location="cpu", weights_only=True)
        tuned = [h for h in state["history"] if h["epoch"] >= 1]
        return {"val_accuracy": round(max(h["val_accuracy"] for h in tuned), 4),
                "test_accuracy": None, "epochs": len(tuned),
                "seconds": round(time.perf_counter() - t0, 1)}
    return {"val_accuracy": metrics["val"]["accuracy"],
            "test_accuracy": metrics["test"]["accuracy"],
            "best_epoch": metrics["best_epoch"], "epochs": metrics["epochs_run"],
            "resumed_after_epoch": max(0, json.loads(run.finetune_timing.read_text())
                                       ["resumed_from_epoch"] - 1),
            "seconds": round(time.perf_counter() - t0, 1)}


def verify(cfg: AdviseConfig, ranked: list[dict[str, Any]], num_groups: dict[str, int],
           copies: Copies, resize: dict[str, int], work: Path,
           race_layer: int | str = "last") -> dict[str, Any]:
    """Train the top ``advise.verify`` heads and race two fine-tunes (of the network cut at
    ``race_layer``); see the module doc."""
    heads = []
    for i, row in enumerate(ranked[:cfg.advise.verify]):
        bb = _backbone(cfg, row["backbone"], row["layer"])
        print(f"advise: verifying head {row['backbone']} layer {row['layer']}", flush=True)
        prepared = copies.folder_for(resize[row["backbone"]])
        heads.append({"backbone": row["backbone"], "layer": row["layer"], "work": f"head_{i}",
                      "finetune": {"enabled": False},
                      **_head_chain(cfg, bb, prepared, work / f"head_{i}")})
    taus = {name: scores.kendall_tau([_score(r, name) for r in ranked[:len(heads)]],
                                     [h["val_accuracy"] for h in heads])
            for name in ("logme", "probe", "knn")}
    # fine-tune the best verified backbone cut at race_layer: today's params and a deeper one
    best_head = max(heads, key=lambda h: h["val_accuracy"])
    name = best_head["backbone"]
    head_work = next((work / h["work"] for h in heads
                      if h["backbone"] == name and h["layer"] == race_layer), None)
    bb = _backbone(cfg, name, race_layer)
    prepared = copies.folder_for(resize[name])
    if head_work is None:
        head_work = work / "head_last"
        _head_chain(cfg, bb, prepared, head_work)
    if race_layer == "last":
        groups = num_groups[name]
    else:  # the network cut at race_layer has fewer block groups
        from ..core.backbones import build_backbone

        groups = len(build_backbone(bb).block_groups)
    base = dataclasses.replace(cfg.finetune, enabled=True)
    racers = {
        "params": base,
        "deep": dataclasses.replace(base, blocks=deep_blocks(groups),
                                    lr_backbone=DEEP_LR, lr_head=DEEP_LR),
    }
    rung1 = {}
    for label, ft in racers.items():
        print(f"advise: fine-tune {label} (blocks {ft.blocks}), rung 1: epochs 1.."
              f"{cfg.advise.rung_epochs} of {ft.epochs}", flush=True)
        rung1[label] = _finetune_chain(cfg, bb, ft, prepared, work / f"ft_{label}", head_work,
                                       stop_after=cfg.advise.rung_epochs)
    winner = max(rung1, key=lambda label: (rung1[label]["val_accuracy"], label == "params"))
    if rung1[winner]["test_accuracy"] is not None:  # early stopping ended it within the rung
        final = rung1[winner]
    else:
        print(f"advise: fine-tune {winner}, rung 2: on to epoch {racers[winner].epochs}",
              flush=True)
        final = _finetune_chain(cfg, bb, racers[winner], prepared, work / f"ft_{winner}",
                                head_work)
    finetunes = [{"racer": label, "rung": 1, **_ft_fields(racers[label]), **rung1[label]}
                 for label in racers]
    finetunes.append({"racer": winner, "rung": 2, **_ft_fields(racers[winner]), **final})
    finals = [h for h in heads] + [{"backbone": name, "layer": race_layer, **f}
                                   for f in finetunes if f["rung"] == 2]
    # best val; ties go to the cheaper: a head before a fine-tune, an earlier candidate first
    chosen = max(finals, key=lambda r: (r["val_accuracy"], -finals.index(r)))
    if chosen["finetune"]["enabled"]:  # the chain runs train_head at the last layer first
        caches = {"folder": prepared, "features": ProjectPaths(head_work).features,
                  "cut_cache": ProjectPaths(work / f"ft_{winner}").cut_cache}
    else:
        caches = {"folder": prepared, "features": ProjectPaths(work / chosen["work"]).features}
    return {"heads": [{k: v for k, v in h.items() if k != "work"} for h in heads],
            "finetunes": finetunes, "kendall_tau_vs_val": taus,
            "chosen": {k: v for k, v in chosen.items() if k != "work"}, "caches": caches}


def apply_to_params(params_path: Path, lines: list[str]) -> None:
    """Write ``section.key=value`` lines into the params file, keeping its comments and
    order (atomically: a temp file, then a rename)."""
    from ruamel.yaml import YAML

    from ..core.atomic import atomic_file

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.representer.add_representer(  # keep "null" as the file writes it, not an empty value
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    data = yaml.load(params_path.read_text(encoding="utf-8"))
    for line in lines:
        key, _, raw = line.partition("=")
        section, _, name = key.partition(".")
        value: Any = yaml.load(raw)
        if section not in data or data[section] is None:
            data[section] = {}
        data[section][name] = value
    with atomic_file(params_path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        yaml.dump(data, handle)


def _backbone(cfg: AdviseConfig, name: str, layer: int | str) -> BackboneParams:
    """A candidate's params: the configured weights for the configured backbone, its default
    (offline or downloaded ImageNet) weights for any other."""
    weights = cfg.backbone.weights if name == cfg.backbone.name else "default"
    return dataclasses.replace(cfg.backbone, name=name, weights=weights, layer=layer)


def _score(row: dict[str, Any], name: str) -> float:
    return row["logme"] if name == "logme" else row[name]["accuracy"]


def _ft_fields(ft: FinetuneParams) -> dict[str, Any]:
    return {"finetune": {"enabled": True, "blocks": ft.blocks, "lr_backbone": ft.lr_backbone,
                         "lr_head": ft.lr_head}}


# --------------------------------------------------------------------------- the run


def run(cfg: AdviseConfig, prepared_dir: str | Path, out_path: str | Path,
        apply_to: str | Path | None = None) -> dict[str, Any]:
    """Score every candidate's layers, place the regime, verify if asked; write the report;
    with ``apply_to`` (a params file), write the verified choice into it."""
    out_path = Path(out_path)
    report, _ = _advise(concrete(cfg), Path(prepared_dir))
    write_reports(report, out_path)
    if apply_to is not None:
        apply_to_params(Path(apply_to), report["verified"]["params"])
        print(f"applied to {apply_to}: {' '.join(report['verified']['params'])}; run dvc repro")
    return report


def _advise(cfg: AdviseConfig, prepared_dir: Path, only_layer: int | str | None = None,
            keep: Path | None = None) -> tuple[dict[str, Any], list[str]]:
    """Score (and verify) on ``prepared_dir``; the report with its seconds, params and
    machine. With ``keep`` (a folder), the verified winner's feature and cut caches are
    copied there when they were made from ``prepared_dir`` itself; their names are returned."""
    import shutil

    import torch

    torch.set_num_threads(resolve_threads(cfg.advise.threads))
    started = time.perf_counter()
    summary, classes, rows = read_prepared(prepared_dir)
    sample = sample_rows(rows, cfg.advise.max_images_per_class, cfg.advise.seed)
    class_index = {c: i for i, c in enumerate(classes)}
    labels = np.array([class_index[r["label"]] for r in sample], dtype=np.int64)
    kept = []
    with tempfile.TemporaryDirectory() as work:
        copies = Copies(cfg.prepare, prepared_dir, Path(work))
        report = _score_and_verify(cfg, copies, classes, rows, sample, labels, started,
                                   only_layer)
        caches = report.get("verified", {}).pop("caches", None)
        if keep is not None and caches and caches["folder"] == prepared_dir:
            for name in ("features", "cut_cache"):  # caches of re-prepared copies differ
                if name in caches and (caches[name] / "meta.json").is_file():
                    shutil.copytree(caches[name], keep / name)
                    kept.append(name)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["params"] = dataclasses.asdict(cfg.advise)
    report["machine"] = machine_fingerprint()
    report["manifest_sha256"] = summary["manifest_sha256"]
    return report, kept


def write_reports(report: dict[str, Any], out_path: Path) -> None:
    """``out_path`` (JSON) with its ``.md`` and ``.png`` beside it, each atomically."""
    write_json(out_path, report)
    write_text(out_path.with_suffix(".md"), markdown(report))
    plot(report, out_path.with_suffix(".png"))
    print(markdown(report))
    print(f"wrote {out_path}, {out_path.with_suffix('.md')}, {out_path.with_suffix('.png')}")


def concrete(cfg: AdviseConfig) -> AdviseConfig:
    """``cfg`` with ``auto`` params at their defaults: advise measures the choices ``auto``
    stands for, so today's fixed defaults are the baseline it races."""
    from ..core.auto import AUTO

    ft_defaults, ft = FinetuneParams(), cfg.finetune
    changes = {key: getattr(ft_defaults, key) for key in ("blocks", "lr_backbone", "lr_head")
               if getattr(ft, key) == AUTO}
    layer = "last" if cfg.backbone.layer == AUTO else cfg.backbone.layer
    return dataclasses.replace(cfg, finetune=dataclasses.replace(ft, **changes),
                               backbone=dataclasses.replace(cfg.backbone, layer=layer))


def run_auto(cfg: AdviseConfig, prepared_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """The ``auto`` stage: when a param is ``auto``, verify the configured backbone's layers
    and fine-tuning on the real splits and write ``choice.json`` (what :mod:`pipeline.core.auto`
    puts in for each ``auto``), the advise report, and the winner's feature and cut caches
    (``features/``, ``cut_cache/``) for those stages to reuse instead of running the backbone
    again. With nothing ``auto`` it writes only ``{"requested": false}``: seconds, not minutes.
    """
    from ..core import auto
    from ..core.atomic import atomic_dir

    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    wanted = auto.auto_keys({"backbone": cfg.backbone, "finetune": cfg.finetune})
    with atomic_dir(out_dir) as tmp:
        if not wanted:
            write_json(tmp / "choice.json", auto.not_requested())
            print("auto: no param is auto; nothing to choose")
            return auto.not_requested()
        if cfg.advise.verify < 1:
            raise PipelineError(f"{', '.join(wanted)}: auto takes a verified choice; set "
                                "advise.verify to the layers to train (e.g. 3)")
        only_layer = None if cfg.backbone.layer == auto.AUTO else cfg.backbone.layer
        cfg = concrete(dataclasses.replace(
            cfg, advise=dataclasses.replace(cfg.advise, backbones=(cfg.backbone.name,))))
        report, reused = _advise(cfg, prepared_dir, only_layer, keep=tmp)
        chosen = report["verified"]["chosen"]
        report["auto"] = {"keys": wanted, "caches": reused}
        made = auto.choice(chosen["layer"], chosen["finetune"], cfg.backbone.name,
                           report["manifest_sha256"],
                           {"val_accuracy": chosen["val_accuracy"],
                            "heads_verified": len(report["verified"]["heads"]),
                            "recommendation_survived":
                                report["verified"]["recommendation_survived"]})
        write_json(tmp / "choice.json", made)
        write_reports(report, tmp / "report.json")
    chose = ", ".join(f"{key}={made['values'][key]}" if made["values"][key] is not None
                      else f"{key}=default (no fine-tuning chosen)" for key in wanted)
    print(f"auto: {chose} (val accuracy "
          f"{chosen['val_accuracy']:.4f}); caches kept for reuse: {', '.join(reused) or 'none'}")
    return made


def _score_and_verify(cfg: AdviseConfig, copies: Copies, classes: list[str],
                      rows: list[dict[str, str]], sample: list[dict[str, str]],
                      labels: np.ndarray, started: float,
                      only_layer: int | str | None = None) -> dict[str, Any]:
    """Scores, regime and (with ``advise.verify``) the verified choice; with ``only_layer``
    the verified heads are that layer's only. A verified report carries ``caches`` (the
    winner's feature and cut caches in ``copies.work``) for the caller to keep or drop."""
    from ..core.backbones import build_backbone

    params = cfg.advise
    train_counts = [sum(1 for r in rows if r["split"] == "train" and r["label"] == c)
                    for c in classes]
    candidates, skipped, num_groups, resize = [], [], {}, {}
    for name in candidate_names(params, cfg.backbone.name):
        try:
            backbone = build_backbone(_backbone(cfg, name, "last"))
            t0 = time.perf_counter()
            images = PreparedImages(copies.folder_for(backbone.preprocessing.resize_size))
            print(f"advise: {name}: features at every block group of {len(sample)} images",
                  flush=True)
            features = layer_features(backbone, images, [r["path"] for r in sample],
                                      params.batch_size, params.workers)
        except PipelineError as exc:
            skipped.append({"backbone": name, "reason": str(exc)})
            print(f"advise: {name} skipped: {exc}", flush=True)
            continue
        forward_s = round(time.perf_counter() - t0, 1)
        num_groups[name] = len(backbone.block_groups)
        resize[name] = backbone.preprocessing.resize_size
        candidates.append({"backbone": name, "weights": backbone.weights,
                           "input_size": backbone.preprocessing.input_size,
                           "resize_size": resize[name], "forward_seconds": forward_s,
                           "layers": score_layers(features, labels, params)})
    if not candidates:
        raise PipelineError("advise: no candidate backbone could be scored ("
                            + "; ".join(f"{s['backbone']}: {s['reason']}" for s in skipped) + ")")
    ranked = sorted(({"backbone": c["backbone"], **layer} for c in candidates
                     for layer in c["layers"]),
                    key=lambda r: (-r["probe"]["accuracy"], -r["logme"]))
    if only_layer is not None:
        ranked = [r for r in ranked if r["layer"] == only_layer]
        if not ranked:
            raise PipelineError(f"advise: backbone.layer {only_layer} is not a layer of the "
                                "candidate backbone; use a block-group index, last or auto")
    best = ranked[0]["backbone"]
    best_layers = next(c["layers"] for c in candidates if c["backbone"] == best)
    regime = place(float(np.median(train_counts)), best_layers, num_groups[best], params,
                   cfg.finetune)
    recommendation = {"backbone": best, "layer": regime["layer"], "finetune": regime["finetune"]}
    recommendation["params"] = (params_lines(best, regime["layer"], regime["finetune"])
                                + copies.needs(resize[best]))
    report: dict[str, Any] = {
        "classes": len(classes), "train_images_per_class": train_counts,
        "scored_images": len(sample), "candidates": candidates, "skipped": skipped,
        "ranking": [{k: r[k] for k in ("backbone", "layer")} |
                    {"probe": r["probe"]["accuracy"], "logme": r["logme"],
                     "knn": r["knn"]["accuracy"]} for r in ranked],
        "regime": regime, "recommendation": recommendation,
        "score_seconds": round(time.perf_counter() - started, 1),
    }
    if params.verify:
        checked = verify(cfg, ranked, num_groups, copies, resize, copies.work / "verify",
                         "last" if only_layer is None else only_layer)
        chosen = checked["chosen"]
        checked["recommendation_survived"] = (
            (chosen["backbone"], chosen["layer"], chosen["finetune"]["enabled"]) ==
            (best, regime["layer"], regime["finetune"]["enabled"]))
        checked["params"] = (params_lines(chosen["backbone"], chosen["layer"],
                                          chosen["finetune"])
                             + copies.needs(resize[chosen["backbone"]]))
        report["verified"] = checked
    return report


# --------------------------------------------------------------------------- the report


def _interval(entry: dict[str, Any]) -> str:
    return f"{entry['accuracy']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


def markdown(report: dict[str, Any]) -> str:
    regime, rec = report["regime"], report["recommendation"]
    cells = {("small", "similar"): "features from the top: head only",
             ("small", "different"): "features from an earlier layer: head only",
             ("large", "similar"): "fine-tune the last block groups",
             ("large", "different"): "fine-tune most of the network"}
    here = (regime["size"], regime["similarity"])
    mine = (f"**here: {regime['train_images_per_class']:g} train images per class; probe "
            f"{regime['peak_probe']:.3f} at layer {regime['peak_layer']}, "
            f"{regime['last_probe']:.3f} at the last (drop {regime['specificity_drop']:.3f})**")
    lines = [f"# Advice: {rec['backbone']}, layer {rec['layer']}, "
             f"{'fine-tune' if rec['finetune']['enabled'] else 'head only'}", "",
             f"Machine: {report['machine']['cpu']} ({report['machine']['available_cpus']} CPUs); "
             f"{report['scored_images']} train+val images scored in "
             f"{report['score_seconds']} s.", "",
             "| | similar to ImageNet | different from ImageNet |", "|---|---|---|"]
    for size in ("small", "large"):
        row = [cells[(size, sim)] + (f"<br>{mine}" if (size, sim) == here else "")
               for sim in ("similar", "different")]
        lines.append(f"| **{size}** | " + " | ".join(row) + " |")
    lines += ["", f"Why: {regime['why']}.", "", "Apply it:", "", "```"]
    lines += [f"dvc exp run " + " ".join(f"-S {p}" for p in rec["params"]), "```", ""]
    lines += ["| backbone | layer | dim | LogME | probe (CV, 95 % interval) | k-NN | s |",
              "|---|---|---|---|---|---|---|"]
    for c in report["candidates"]:
        for layer in c["layers"]:
            lines.append(f"| {c['backbone']} | {layer['layer']} | {layer['dim']} | "
                         f"{layer['logme']:.3f} | {_interval(layer['probe'])} | "
                         f"{_interval(layer['knn'])} | {layer['seconds']} |")
    for s in report["skipped"]:
        lines.append(f"\nSkipped {s['backbone']}: {s['reason']}")
    checked = report.get("verified")
    if checked:
        lines += ["", "## Verified by training (val chooses; test is reported only)", "",
                  "| candidate | val | test | s |", "|---|---|---|---|"]
        for h in checked["heads"]:
            lines.append(f"| head: {h['backbone']} layer {h['layer']} | {h['val_accuracy']:.4f}"
                         f" | {h['test_accuracy']:.4f} | {h['seconds']} |")
        for f in checked["finetunes"]:
            ft = f["finetune"]
            test = "—" if f["test_accuracy"] is None else f"{f['test_accuracy']:.4f}"
            lines.append(f"| fine-tune {f['racer']} (blocks {ft['blocks']}, LR "
                         f"{ft['lr_backbone']:g}), rung {f['rung']}, {f['epochs']} epochs | "
                         f"{f['val_accuracy']:.4f} | {test} | {f['seconds']} |")
        taus = ", ".join(f"{k} {v}" for k, v in checked["kendall_tau_vs_val"].items())
        chosen = checked["chosen"]
        lines += ["", f"Kendall tau of each score against the heads' val accuracy: {taus}.",
                  "", f"Chosen: {chosen['backbone']} layer {chosen['layer']}, "
                  f"{'fine-tuned' if chosen['finetune']['enabled'] else 'head only'}: val "
                  f"{chosen['val_accuracy']:.4f}, test {chosen['test_accuracy']:.4f}. The "
                  f"unverified advice {'survived' if checked['recommendation_survived'] else 'did not survive'}.",
                  "", "```", "dvc exp run " + " ".join(f"-S {p}" for p in checked["params"]),
                  "```"]
    lines.append(f"\nTotal {report['seconds']} s.")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Probe accuracy (with its interval) and LogME per layer, one line per backbone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for c in report["candidates"]:
        xs = list(range(len(c["layers"])))
        acc = [layer["probe"]["accuracy"] for layer in c["layers"]]
        low = [layer["probe"]["low"] for layer in c["layers"]]
        high = [layer["probe"]["high"] for layer in c["layers"]]
        left.plot(xs, acc, marker="o", label=c["backbone"])
        left.fill_between(xs, low, high, alpha=0.2)
        right.plot(xs, [layer["logme"] for layer in c["layers"]], marker="o",
                   label=c["backbone"])
    for ax, title in ((left, "linear probe accuracy (CV, 95 % interval)"), (right, "LogME")):
        ax.set_xlabel("block group (last = whole network)")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
