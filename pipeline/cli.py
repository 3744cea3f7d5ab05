"""Command-line interface: one thin subcommand per DVC stage (``pipeline --help``).

Each command only parses options and params, then calls the stage's ``run`` function. Errors a
user can fix are printed as one line (``Error: ...``), never as a traceback.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable

import click

from . import DISTRIBUTION, __version__
from .core.errors import PipelineError
from .core.paths import PATHS
from .core.stage_table import STAGE

def _path_option(flag: str, dest: str | None, fallback: Path, help: str,
                 **path_kwargs: Any) -> Callable[[str | None], Any]:
    """A path option shared by several commands: a stage's default comes from the stage
    table (what dvc.yaml passes), a tool's from ``PATHS``."""
    def option(stage: str | None = None) -> Any:
        default = STAGE[stage].default(flag) if stage else str(fallback)
        return click.option(flag, *([dest] if dest else []), default=default, show_default=True,
                            type=click.Path(**path_kwargs), help=help)

    return option


def stage_path(stage: str, flag: str, *decls: str, **kwargs: Any) -> Any:
    """A stage command's path option whose default is what dvc.yaml passes (the stage table)."""
    return click.option(flag, *decls, default=STAGE[stage].default(flag), show_default=True,
                        **kwargs)


params_option = _path_option("--params", "params_path", PATHS.params,
                             "params file whose sections configure the stage", dir_okay=False)
prepared_option = _path_option("--prepared", None, PATHS.prepared,
                               "output folder of `pipeline prepare`")
cut_cache_option = _path_option("--cut-cache", "cut_cache_dir", PATHS.cut_cache,
                                "folder written by `pipeline cut-cache`")
head_option = _path_option("--head", "head_model", PATHS.head,
                           "head weights from `pipeline train-head`", dir_okay=False)
head_config_option = _path_option("--head-config", None, PATHS.head_config,
                                  "head config from `pipeline train-head`", dir_okay=False)


def is_main_process() -> bool:
    """False on the ranks > 0 of a torchrun launch (they stay quiet)."""
    import os

    return os.environ.get("RANK", "0") == "0"


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PipelineError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("Interrupted; no partial output was kept.", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pipeline",
                      message=f"%(prog)s (distribution {DISTRIBUTION}) %(version)s")
def main() -> None:
    """Transfer learning for image classification, from a folder of images to one ONNX file.

    Stages (chained by dvc.yaml, run them all with `dvc repro`):
    prepare -> features -> train-head -> cut-cache -> finetune -> export -> interpret,
    machine -> bench -> card.
    """


@main.command()
@params_option("prepare")
@stage_path("prepare", "--out", type=click.Path(),
            help="output folder: manifest.csv, classes.json, rejected.csv, summary.json")
@friendly_errors
def prepare(params_path: str, out: str) -> None:
    """Scan, validate and split the images (params: prepare.*)."""
    from .core.config import load_params
    from .stages.prepare import run

    sections = load_params(params_path, "prepare")
    params = sections["prepare"]
    summary = run(params, out)
    click.echo(f"prepare: {summary['num_images']} images in {summary['num_classes']} classes "
               f"(train/val/test {'/'.join(str(v) for v in summary['split_counts'].values())}), "
               f"{summary['num_rejected']} rejected (see {out}/rejected.csv)")
    if summary["empty_class_folders_ignored"]:
        click.echo(f"warning: empty class folders ignored: "
                   f"{', '.join(summary['empty_class_folders_ignored'])}", err=True)


@main.command()
@params_option("features")
@prepared_option("features")
@stage_path("features", "--out", type=click.Path(), help="feature cache folder to write")
@stage_path("features", "--metrics", type=click.Path(dir_okay=False),
            help="headline figure: backbone img/s (JSON)")
@stage_path("features", "--report", type=click.Path(dir_okay=False),
            help="timings of this run (JSON)")
@stage_path("features", "--reuse", type=click.Path(),
            help="a cache the auto stage kept: copied when made for these params and data")
@friendly_errors
def features(params_path: str, prepared: str, out: str, metrics: str, report: str,
             reuse: str) -> None:
    """Run the frozen backbone once and cache features (params: backbone.*, features.*)."""
    from .core.config import load_params
    from .core.distributed import relaunch
    from .stages.features import run

    sections = load_params(params_path, "backbone", "features", "launcher")
    backbone = sections["backbone"]
    params = sections["features"]
    launcher = sections["launcher"]
    code = relaunch(launcher)  # the same command under torchrun
    if code is not None:
        raise SystemExit(code)
    result = run(backbone, params, prepared, out, report, backend=launcher.backend,
                 metrics_path=metrics, reuse_dir=reuse)
    if is_main_process() and not result.get("reused"):
        click.echo(f"features: {result['images']} images, {result['images_per_second_backbone']}"
                   f" img/s on {result['provider']} ({result['threads']} threads, "
                   f"{result['world_size']} process(es)) -> {out}")


@main.command("train-head")
@params_option("train_head")
@stage_path("train_head", "--features", "features_dir", type=click.Path(),
            help="feature cache written by `pipeline features`")
@stage_path("train_head", "--model", type=click.Path(dir_okay=False),
            help="head weights to write (safetensors)")
@stage_path("train_head", "--config", type=click.Path(dir_okay=False),
            help="head config to write (JSON)")
@stage_path("train_head", "--metrics", type=click.Path(dir_okay=False),
            help="headline val/test figures (JSON)")
@stage_path("train_head", "--report", type=click.Path(dir_okay=False),
            help="val/test figures with per-class scores (JSON)")
@stage_path("train_head", "--plots", type=click.Path(),
            help="folder for training.csv and confusion.csv")
@friendly_errors
def train_head(params_path: str, features_dir: str, model: str, config: str, metrics: str,
               report: str, plots: str) -> None:
    """Train a classification head on cached features (params: train_head.*)."""
    from .core.config import load_params
    from .stages.train_head import run

    sections = load_params(params_path, "train_head")
    run(sections["train_head"], features_dir, model, config, report, plots,
        metrics_path=metrics)


@main.command("cut-cache")
@params_option("cut_cache")
@prepared_option("cut_cache")
@stage_path("cut_cache", "--out", type=click.Path(), help="cut cache folder to write")
@stage_path("cut_cache", "--reuse", type=click.Path(),
            help="a cache the auto stage kept: copied when made for this cut, params and data")
@friendly_errors
def cut_cache(params_path: str, prepared: str, out: str, reuse: str) -> None:
    """Cache the frozen prefix's activations at the fine-tuning cut (params: finetune.*)."""
    from .core.config import load_params
    from .stages.cut_cache import run

    sections = load_params(params_path, "backbone", "finetune")
    meta = run(sections["backbone"], sections["finetune"], prepared, out, reuse)
    if meta.get("cached"):
        click.echo(f"cut-cache: {meta['split_counts']} images x views {meta['views']}, "
                   f"activations {meta['activation_shape']} ({meta['dtype']}) before "
                   f"{meta['cut']['cut_before']} in {meta['seconds']:.1f} s -> {out}")
    else:
        click.echo(f"cut-cache: nothing to cache (finetune disabled, classic mode or all "
                   f"blocks trained) -> {out}/meta.json")


@main.command()
@params_option("finetune")
@prepared_option("finetune")
@cut_cache_option("finetune")
@head_option("finetune")
@head_config_option("finetune")
@stage_path("finetune", "--model", type=click.Path(dir_okay=False),
            help="backbone + head weights to write")
@stage_path("finetune", "--config", type=click.Path(dir_okay=False),
            help="model config to write (JSON)")
@stage_path("finetune", "--metrics", type=click.Path(dir_okay=False),
            help="headline figures that DVC compares (JSON)")
@stage_path("finetune", "--report", type=click.Path(dir_okay=False),
            help="val/test figures with per-class scores (JSON)")
@stage_path("finetune", "--timing", type=click.Path(dir_okay=False),
            help="seconds per epoch (varies between runs)")
@stage_path("finetune", "--plots", type=click.Path())
@friendly_errors
def finetune(params_path: str, prepared: str, cut_cache_dir: str, head_model: str,
             head_config: str, model: str, config: str, metrics: str, report: str, timing: str,
             plots: str) -> None:
    """Fine-tune the last block group(s) with the head (params: backbone.*, finetune.*)."""
    from .core.config import load_params
    from .core.distributed import relaunch
    from .stages.finetune import run

    sections = load_params(params_path, "backbone", "finetune", "launcher")
    backbone = sections["backbone"]
    params = sections["finetune"]
    launcher = sections["launcher"]
    code = relaunch(launcher)  # the same command under torchrun
    if code is not None:
        raise SystemExit(code)
    run(backbone, params, prepared, cut_cache_dir, head_model, head_config, model, config,
        report, plots, timing, backend=launcher.backend, metrics_path=metrics)


@main.command()
@params_option("export")
@stage_path("export", "--model", type=click.Path(dir_okay=False),
            help="weights from `pipeline finetune`")
@stage_path("export", "--config", type=click.Path(dir_okay=False))
@stage_path("export", "--prepared", type=click.Path(),
            help="test images for the checks, training images for INT8 calibration")
@stage_path("export", "--out", type=click.Path(dir_okay=False),
            help="the FP32 ONNX model to write")
@stage_path("export", "--variants-dir", type=click.Path(file_okay=False),
            help="folder for the FP16/INT8 variants")
@stage_path("export", "--metrics", type=click.Path(dir_okay=False),
            help="headline figures that DVC compares (JSON)")
@stage_path("export", "--report", type=click.Path(dir_okay=False),
            help="every check, variant and calibration figure (JSON)")
@stage_path("export", "--plots", type=click.Path(file_okay=False),
            help="reliability tables (test split) before and after calibration")
@friendly_errors
def export(params_path: str, model: str, config: str, prepared: str, out: str,
           variants_dir: str, metrics: str, report: str, plots: str) -> None:
    """Export one self-describing ONNX file (+ FP16/INT8 variants), checked (params: export.*)."""
    from .core.config import load_params
    from .stages.export import run

    sections = load_params(params_path, "export")
    run(sections["export"], model, config, prepared, out, variants_dir, report, plots,
        metrics_path=metrics)


@main.command()
@params_option("interpret")
@stage_path("interpret", "--model", type=click.Path(dir_okay=False),
            help="ONNX model written by `pipeline export`")
@prepared_option("interpret")
@stage_path("interpret", "--out", type=click.Path(file_okay=False),
            help="folder for the loss tables and sheets")
@stage_path("interpret", "--metrics", type=click.Path(dir_okay=False),
            help="headline figures that DVC compares (JSON)")
@stage_path("interpret", "--report", type=click.Path(dir_okay=False),
            help="per-split accuracy, errors and most confused pairs (JSON)")
@friendly_errors
def interpret(params_path: str, model: str, prepared: str, out: str, metrics: str,
              report: str) -> None:
    """Top losses and most confused classes of the exported model (params: interpret.*)."""
    from .core.config import load_params
    from .stages.interpret import run

    sections = load_params(params_path, "interpret")
    run(sections["interpret"], model, prepared, out, report, metrics_path=metrics)


@main.command()
@click.option("--model", default=str(PATHS.onnx), show_default=True,
              type=click.Path(dir_okay=False), help="ONNX model written by `pipeline export`")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table")
@click.option("--providers", default="auto", show_default=True,
              help="auto (the fastest engine for this file in --bench, else cuda, openvino, "
                   "cpu), or comma-separated in order of preference: cpu, cuda, tensorrt, "
                   "openvino")
@click.option("--bench", "bench_report", default=str(PATHS.report_file("bench")),
              show_default=True, type=click.Path(dir_okay=False),
              help="`pipeline bench` report that --providers auto chooses from (if present)")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0),
              help="CPU threads (0: one per CPU this process may use)")
@click.option("--min-confidence", default=0.0, show_default=True,
              type=click.FloatRange(0.0, 1.0),
              help="mark predictions whose top probability is below this as uncertain")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help=".jsonl or .csv file written as results come (one flushed line each)")
@click.option("--resume", is_flag=True, help="skip the paths already in --out, append the rest")
@click.option("--force", is_flag=True, help="replace an existing --out file")
@click.option("--workers", type=click.IntRange(0), default=None,
              help="decoding threads ahead of the network [default: one per CPU]")
@click.option("--decode", default="copy", show_default=True,
              type=click.Choice(["copy", "fast", "full"]),
              help="copy: as prepare decodes (what training saw); fast: large JPEGs at a "
                   "smaller DCT scale (12 MP: ~1.5x faster); full: every pixel")
@friendly_errors
def predict(model: str, inputs: tuple[str, ...], top_k: int, as_json: bool, providers: str,
            bench_report: str, batch_size: int, threads: int, min_confidence: float,
            out: Path | None, resume: bool, force: bool, workers: int | None,
            decode: str) -> None:
    """Classify images (files, or folders searched recursively) with an exported model;
    torch is not used.

    Ends with a summary line on stderr (per class, errors, uncertain). Exits with status 1
    when any image could not be read (the others are still classified), 2 when there is no
    image to classify.
    """
    from .onnx.runner import OnnxClassifier, expand_inputs
    from .tools.predict import run

    if resume and out is None:
        raise click.UsageError("--resume needs --out FILE")
    paths = expand_inputs(inputs)
    if not paths:
        raise click.UsageError(f"no image files in {', '.join(inputs)} (looked for "
                               "jpg, png, bmp, gif, tif, webp, ppm, pgm)")
    classifier = OnnxClassifier(model, [p.strip() for p in providers.split(",") if p.strip()],
                                threads, bench_report)
    if providers.strip() == "auto" and not as_json:
        click.echo(f"providers auto: {classifier.requested[0]} ({classifier.chosen_why})",
                   err=True)
    if not as_json:
        meta = classifier.contract.values
        calibrated = (f"probabilities calibrated, temperature {meta['temperature']:.3g}"
                      if meta.get("probability_calibration") == "temperature"
                      else "probabilities not calibrated")
        click.echo(f"model {model} on {classifier.provider} "
                   f"({len(classifier.classes)} classes; {calibrated})", err=True)
    summary = run(classifier, paths, out, top_k=top_k, batch_size=batch_size, workers=workers,
                  decode=decode, min_confidence=min_confidence, resume=resume,
                  force=force, as_json=as_json, progress=sys.stderr.isatty())
    click.echo(summary.line(), err=True)
    if summary.errors:
        raise SystemExit(1)


@main.command()
@stage_path("machine", "--out", type=click.Path(dir_okay=False),
            help="fingerprint of this machine (JSON), a dependency of bench")
@friendly_errors
def machine(out: str) -> None:
    """Fingerprint this machine (CPU, flags, GPUs, engine versions) so bench re-runs elsewhere."""
    from .stages.machine import run

    fingerprint = run(out)
    click.echo(f"machine: {fingerprint['cpu']}, {fingerprint['available_cpus']} CPUs, GPUs "
               f"{fingerprint['gpus'] or 'none'} (id {fingerprint['id']}) -> {out}")


@main.command()
@params_option("bench")
@stage_path("bench", "--model", type=click.Path(dir_okay=False),
            help="FP32 ONNX model from `pipeline export`")
@stage_path("bench", "--variants-dir", type=click.Path(file_okay=False),
            help="folder with model.fp16/int8.onnx")
@stage_path("bench", "--weights", type=click.Path(dir_okay=False),
            help="PyTorch weights for the eager baseline")
@stage_path("bench", "--config", type=click.Path(dir_okay=False))
@stage_path("bench", "--prepared", type=click.Path(), help="test split for the accuracy column")
@stage_path("bench", "--out", type=click.Path(file_okay=False),
            help="folder for bench.json, bench.md and bench.png")
@stage_path("bench", "--metrics", type=click.Path(dir_okay=False),
            help="headline figure: best img/s (JSON)")
@friendly_errors
def bench(params_path: str, model: str, variants_dir: str, weights: str, config: str,
          prepared: str, out: str, metrics: str) -> None:
    """onnxruntime CPU/OpenVINO/CUDA/TensorRT vs PyTorch eager: speed, accuracy, memory."""
    from .core.config import load_params
    from .stages.bench import run

    sections = load_params(params_path, "bench")
    run(sections["bench"], model, variants_dir, weights, config, prepared, out,
        metrics_path=metrics)


@main.command("bench-features")
@params_option()
@prepared_option()
@click.option("--images", default=128, show_default=True, type=click.IntRange(1),
              help="number of prepared images to time")
@click.option("--batch-size", type=click.IntRange(1), default=None,
              help="batch size (default: features.batch_size)")
@click.option("--threads", type=click.IntRange(0), default=None,
              help="threads for both engines (default: features.threads; 0 = all CPUs)")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1))
@click.option("--out", default=str(PATHS.bench_features), show_default=True,
              type=click.Path(dir_okay=False))
@friendly_errors
def bench_features(params_path: str, prepared: str, images: int, batch_size: int | None,
                   threads: int | None, repeats: int, out: str) -> None:
    """Time feature extraction (onnxruntime vs PyTorch eager) and head epochs (cached vs not)."""
    import dataclasses

    from .core.config import load_params
    from .tools.bench_features import run

    sections = load_params(params_path, "features", "backbone", "train_head")
    features_params = sections["features"]
    overrides = {k: v for k, v in (("batch_size", batch_size), ("threads", threads))
                 if v is not None}
    features_params = dataclasses.replace(features_params, **overrides)
    run(sections["backbone"], features_params,
        sections["train_head"], prepared, out,
        images=images, repeats=repeats)


@main.command("bench-finetune")
@params_option()
@prepared_option()
@click.option("--images", default=256, show_default=True, type=click.IntRange(1),
              help="training images to time (the first of the train split)")
@click.option("--val-images", default=10**9, type=click.IntRange(0),
              help="validation images to time (default: the whole val split)")
@click.option("--epochs", default=2, show_default=True, type=click.IntRange(1),
              help="epochs per path (the median is reported)")
@click.option("--blocks", default=None, help="override finetune.blocks")
@click.option("--out", default=str(PATHS.bench_finetune), show_default=True,
              type=click.Path(dir_okay=False))
@friendly_errors
def bench_finetune(params_path: str, prepared: str, images: int, val_images: int, epochs: int,
                   blocks: str | None, out: str) -> None:
    """Time a fine-tuning epoch on the cut cache versus the classic path (same model, images)."""
    from .core.config import load_params
    from .tools.bench_finetune import run

    overrides = ({"finetune": {"blocks": int(blocks) if blocks.isdigit() else blocks}}
                 if blocks is not None else None)
    sections = load_params(params_path, "backbone", "finetune", overrides=overrides)
    params = sections["finetune"]
    run(sections["backbone"], params, prepared, out,
        images=images, val_images=val_images, epochs=epochs)


def _csv_list(kind: type) -> Callable[[Any, Any, str], list[Any]]:
    def parse(ctx: Any, param: Any, value: str) -> list[Any]:
        items = []
        for part in (p.strip() for p in value.split(",") if p.strip()):
            try:
                items.append(part if (kind is int and part == "all") else kind(part))
            except ValueError:
                raise click.BadParameter(f"{part!r} is not a valid {kind.__name__}") from None
        return items

    return parse


@main.command()
@params_option()
@prepared_option()
@click.option("--features", "features_dir", default=str(PATHS.features), show_default=True,
              type=click.Path())
@head_option()
@head_config_option()
@click.option("--blocks", default="0,1,2,3", show_default=True, callback=_csv_list(int),
              help="block groups to unfreeze, comma-separated ('all' allowed)")
@click.option("--fractions", default="0.1,0.25,0.5,1", show_default=True,
              callback=_csv_list(float), help="training-set fractions for the learning curve")
@click.option("--scratch-fractions", default="0.1,0.25,0.5,1", show_default=True,
              callback=_csv_list(float),
              help="fractions for the from-scratch baseline (slow on CPU; '' skips it)")
@click.option("--scratch-lr", default=1e-3, show_default=True, type=click.FloatRange(min=0,
              min_open=True), help="LR of the from-scratch baseline (all layers)")
@click.option("--lr-backbone", "lr_backbones", default="", callback=_csv_list(float),
              help="fine-tuning LRs to try at every block count, comma-separated, e.g. "
                   "3e-4,1e-3  [default: finetune.lr_backbone]")
@click.option("--out", default=str(PATHS.sweep), show_default=True, type=click.Path())
@friendly_errors
def sweep(params_path: str, prepared: str, features_dir: str, head_model: str, head_config: str,
          blocks: list[Any], fractions: list[float], scratch_fractions: list[float],
          scratch_lr: float, lr_backbones: list[float], out: str) -> None:
    """Measure which strategy to use: blocks sweep, from-scratch baseline, learning curve."""
    from .tools.sweep import run

    for f in fractions + scratch_fractions:
        if not 0 < f <= 1:
            raise click.BadParameter(f"fractions must be in (0, 1] (got {f})")
    if any(lr <= 0 for lr in lr_backbones):
        raise click.BadParameter(f"--lr-backbone values must be > 0 (got {lr_backbones})")
    run(_sweep_config(params_path), prepared, features_dir, head_model, head_config, out,
        blocks, fractions, scratch_fractions, scratch_lr, lr_backbones or None)


def _sweep_config(params_path: str) -> Any:
    """The params sections that a whole training chain reads."""
    from .core.config import load_params
    from .tools.sweep import SweepConfig

    sections = load_params(params_path, "backbone", "features", "train_head", "finetune")
    return SweepConfig(sections["backbone"],
                       sections["features"],
                       sections["train_head"],
                       sections["finetune"])


@main.command()
@stage_path("card", "--model", type=click.Path(dir_okay=False),
            help="ONNX model written by `pipeline export`")
@stage_path("card", "--config", type=click.Path(dir_okay=False))
@prepared_option("card")
@stage_path("card", "--head-metrics", type=click.Path(dir_okay=False))
@stage_path("card", "--finetune-metrics", type=click.Path(dir_okay=False))
@stage_path("card", "--export-metrics", type=click.Path(dir_okay=False))
@stage_path("card", "--interpret-metrics", type=click.Path(dir_okay=False))
@stage_path("card", "--bench", "bench_report", type=click.Path(dir_okay=False))
@stage_path("card", "--out", type=click.Path(dir_okay=False))
@friendly_errors
def card(model: str, config: str, prepared: str, head_metrics: str, finetune_metrics: str,
         export_metrics: str, interpret_metrics: str, bench_report: str, out: str) -> None:
    """Write the model card (Markdown) from the outputs of the other stages."""
    from .stages.card import run

    run(model, config, prepared, out, head_metrics, finetune_metrics, export_metrics,
        interpret_metrics, bench_report)


@main.command()
@params_option()
@prepared_option()
@click.option("--verify", type=click.IntRange(0), default=None,
              help="train the top K (backbone, layer) heads and race two fine-tunes for real "
                   "[default: advise.verify]")
@click.option("--backbones", default="", callback=_csv_list(str),
              help="candidates, comma-separated [default: advise.backbones, or backbone.name "
                   "plus the installed offline backbones]")
@click.option("--out", default=str(PATHS.advise), show_default=True,
              type=click.Path(dir_okay=False), help="report (.md and .png beside it)")
@click.option("--apply", "apply", is_flag=True,
              help="write the verified choice into --params (needs --verify)")
@friendly_errors
def advise(params_path: str, prepared: str, verify: int | None, backbones: list[str],
           out: str, apply: bool) -> None:
    """Which backbone, layer and fine-tuning depth this data set needs: scores, regime, check."""
    from .core.config import load_params
    from .tools.advise import AdviseConfig, run

    overrides: dict[str, dict[str, Any]] = {"advise": {}}
    if verify is not None:
        overrides["advise"]["verify"] = verify
    if backbones:
        overrides["advise"]["backbones"] = backbones
    sections = load_params(params_path, "advise", "prepare", "backbone", "features",
                           "train_head", "finetune", overrides=overrides, resolve_auto=False)
    if apply and not sections["advise"].verify:
        raise click.UsageError("--apply writes only a verified choice: add --verify K")
    run(AdviseConfig(sections["advise"], sections["prepare"], sections["backbone"],
                     sections["features"], sections["train_head"], sections["finetune"]),
        prepared, out, params_path if apply else None)


@main.command()
@params_option("auto")
@prepared_option("auto")
@stage_path("auto", "--out", type=click.Path(file_okay=False),
            help="folder for choice.json, the advise report and the caches kept for reuse")
@friendly_errors
def auto(params_path: str, prepared: str, out: str) -> None:
    """The auto stage: choose each `auto` param (backbone.layer, finetune.blocks/lr_*) by
    training the candidates on this data (advise --verify), for the configured backbone."""
    from .core.config import load_params
    from .tools.advise import AdviseConfig, run_auto

    sections = load_params(params_path, "advise", "prepare", "backbone", "features",
                           "train_head", "finetune", resolve_auto=False)
    run_auto(AdviseConfig(sections["advise"], sections["prepare"], sections["backbone"],
                          sections["features"], sections["train_head"], sections["finetune"]),
             prepared, out)


@main.command("lr-find")
@params_option()
@click.option("--features", "features_dir", default=str(PATHS.features), show_default=True,
              type=click.Path(), help="feature cache written by `pipeline features`")
@click.option("--lr-min", default=1e-6, show_default=True,
              type=click.FloatRange(min=0, min_open=True))
@click.option("--lr-max", default=10.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True))
@click.option("--steps", default=100, show_default=True, type=click.IntRange(3))
@click.option("--out", default=str(PATHS.lr_find), show_default=True,
              type=click.Path(file_okay=False))
@friendly_errors
def lr_find(params_path: str, features_dir: str, lr_min: float, lr_max: float, steps: int,
            out: str) -> None:
    """LR range test for the head on cached features, each suggestion checked by training."""
    from .core.config import load_params
    from .tools.lr_find import run

    sections = load_params(params_path, "train_head")
    run(sections["train_head"], features_dir, out, lr_min,
        lr_max, steps)


@main.command("noise-check")
@params_option()
@prepared_option()
@click.option("--flips", default=25, show_default=True, type=click.IntRange(1),
              help="training labels to flip to another class")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0),
              help="onnxruntime threads for export and interpret (0: all this process may use)")
@click.option("--out", default=str(PATHS.noise_check), show_default=True,
              type=click.Path(dir_okay=False))
@friendly_errors
def noise_check(params_path: str, prepared: str, flips: int, seed: int, threads: int,
                out: str) -> None:
    """Measure whether interpret's train-loss ranking finds flipped (mislabeled) images."""
    from .tools.noise_check import run

    run(_sweep_config(params_path), prepared, out, flips, seed, threads)


@main.command("bench-scaling")
@params_option()
@prepared_option()
@cut_cache_option()
@head_option()
@head_config_option()
@click.option("--procs", default="1,2", show_default=True, callback=_csv_list(int),
              help="process counts to compare (torchrun --nproc-per-node)")
@click.option("--epochs", default=1, show_default=True, type=click.IntRange(1))
@click.option("--out", default=str(PATHS.bench_scaling), show_default=True,
              type=click.Path(dir_okay=False))
@friendly_errors
def bench_scaling(params_path: str, prepared: str, cut_cache_dir: str, head_model: str,
                  head_config: str, procs: list[int], epochs: int, out: str) -> None:
    """Features and fine-tuning throughput at 1, 2, ... processes (torchrun, gloo on CPU)."""
    from .tools.bench_scaling import run

    if not procs or min(procs) < 1:
        raise click.BadParameter("--procs must list process counts >= 1")
    run(params_path, prepared, cut_cache_dir, head_model, head_config, out, procs, epochs)


@main.command("bench-data")
@click.option("--n", "count", default=250, show_default=True, type=click.IntRange(8),
              help="VGA images in the small run (the large one has --scale times more)")
@click.option("--n-phone", default=60, show_default=True, type=click.IntRange(8),
              help="phone-size (4032x3024) images in the small run")
@click.option("--scale", default=4, show_default=True, type=click.IntRange(2))
@click.option("--views", default=4, show_default=True, type=click.IntRange(1),
              help="cut_cache augmented views")
@click.option("--workers", default=None, type=click.IntRange(0),
              help="features/cut_cache loader processes [default: the params default]")
@click.option("--work", default=str(PATHS.bench_data_work), show_default=True,
              type=click.Path(file_okay=False), help="generated images and runs (kept)")
@click.option("--out", default=str(PATHS.bench_data), show_default=True,
              type=click.Path(dir_okay=False))
@click.option("--md", default=str(PATHS.bench_data.with_suffix(".md")), show_default=True,
              type=click.Path(dir_okay=False))
@friendly_errors
def bench_data(count: int, n_phone: int, scale: int, views: int, workers: int | None, work: str,
               out: str, md: str) -> None:
    """Photo data path: per stage img/s end to end vs network-only, N -> scale x N, peak RSS."""
    from .tools.bench_data import run

    run(Path(out), Path(md), Path(work), count, n_phone, scale, views, 1_000_000, workers)


@main.command("bench-predict")
@click.option("--model", default=str(PATHS.onnx), show_default=True,
              type=click.Path(dir_okay=False, exists=True))
@click.option("--vga", default=2000, show_default=True, type=click.IntRange(0),
              help="VGA (640x480) photos")
@click.option("--phone", default=200, show_default=True, type=click.IntRange(0),
              help="phone-size (4032x3024) photos")
@click.option("--phone-many", default=0, show_default=True, type=click.IntRange(0),
              help="a second, large phone library for peak RSS (e.g. 10000; hard links)")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0))
@click.option("--work", default=str(PATHS.bench_data_work), show_default=True,
              type=click.Path(file_okay=False), help="generated photos (kept)")
@click.option("--out", default=str(PATHS.bench_predict), show_default=True,
              type=click.Path(dir_okay=False))
@friendly_errors
def bench_predict(model: str, vga: int, phone: int, phone_many: int, threads: int, work: str,
                  out: str) -> None:
    """Photo library: predict img/s and peak RSS against the network-only rate, same run."""
    from .tools.bench_predict import run

    run(Path(model), Path(work), Path(out), vga, phone, phone_many, threads)


@main.command()
@click.argument("name", required=False)
@click.option("--weights", default="default", show_default=True,
              help="default | none | torchvision enum name | local weights file")
@friendly_errors
def backbones(name: str | None, weights: str) -> None:
    """List the backbone registry, or describe NAME (preprocessing, feature dim, blocks)."""
    import json

    from .core.backbones import build_backbone, registry_help
    from .core.config import BackboneParams

    if name is None:
        click.echo(f"Backbones: {registry_help()}.")
        click.echo("Describe one with `pipeline backbones NAME [--weights none]`.")
        return
    backbone = build_backbone(BackboneParams(name=name, weights=weights))
    info = backbone.describe()
    info["block_groups"] = [f"{g[0]} .. ({len(g)} tensors)" for g in backbone.block_groups]
    click.echo(json.dumps(info, indent=2))


@main.command()
@click.argument("folder", default=".", type=click.Path(file_okay=False))
@click.option("--images", type=click.Path(), default=None,
              help="folder of images as <class>/<image> (prepare.source: folder)")
@click.option("--csv", "csv_path", type=click.Path(), default=None,
              help="CSV manifest with path,label columns (prepare.source: csv)")
@click.option("--backbone", default=None, help="backbone.name, e.g. torchvision:resnet50")
@click.option("--force", is_flag=True, help="overwrite dvc.yaml, params.yaml and the README")
@friendly_errors
def init(folder: str, images: str | None, csv_path: str | None, backbone: str | None,
         force: bool) -> None:
    """Start a project in FOLDER (default: here) that runs the chain with this installed tool."""
    from .tools.init_project import init as scaffold

    for line in scaffold(folder, images, csv_path, backbone, force):
        click.echo(f"init: {line}")
    click.echo(f"init: next: cd {folder} && dvc repro")


@main.command()
@params_option()
@click.option("--out", default=".pipeline/code", show_default=True,
              type=click.Path(file_okay=False), help="folder for <stage>.sha256")
@friendly_errors
def fingerprint(params_path: str, out: str) -> None:
    """Write per-stage fingerprints of this tool's code (the first stage of `pipeline init`)."""
    from .tools.init_project import fingerprint as write

    prints = write(out, params_path)
    click.echo(f"fingerprint: {len(prints)} stages -> {out}")


if __name__ == "__main__":
    main()
