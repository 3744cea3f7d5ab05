"""The stage table: every DVC stage once, with its command, params, deps, outs and metrics.

One entry per stage renders both ``dvc.yaml`` files: this repository's (each stage depends on
the package files it runs, found by :func:`pipeline.core.fingerprint.import_closure`) and the
one ``pipeline init`` writes into a user's project (each stage depends on a fingerprint of the
installed tool's code instead, written by the ``code`` stage). The CLI takes its path defaults
from the same entries, and the code fingerprints cover exactly the stages that have a module.

Adding a stage is one :class:`Stage` entry in :data:`STAGES` (plus its module in
``pipeline/stages/`` and its CLI command); a test fails until ``dvc.yaml`` is rendered again
(``python -m pipeline.core.stage_table > dvc.yaml``).
"""

from __future__ import annotations

import shlex
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .config import CUT_CACHE_KEYS
from .fingerprint import PACKAGE_ROOT, import_closure
from .paths import PATHS

Role = Literal["dep", "out", "uncached", "metric", "pass"]


@dataclass(frozen=True)
class Arg:
    """A path option of the stage's command and what it is to DVC: a ``dep``, an ``out``
    (cached), an ``uncached`` out (small JSON committed to git), the ``metric`` file, or
    ``pass`` (given to the command only; the stage lists what it writes there)."""

    flag: str
    path: Path
    role: Role
    note: str = ""


@dataclass(frozen=True)
class Extra:
    """A dep or out that is not an option of the command (a file inside an option's folder)."""

    path: str
    cached: bool = True
    note: str = ""


@dataclass(frozen=True)
class Stage:
    name: str
    params: tuple[str, ...]
    args: tuple[Arg, ...]
    deps: tuple[Extra, ...] = ()
    outs: tuple[Extra, ...] = ()
    params_note: str = ""
    always_changed: bool = False
    has_module: bool = True  # fingerprinted, deps from its module's imports
    # the module the command runs, under pipeline/: a stage's own, or a tool that chains stages
    module: str = ""

    @property
    def module_path(self) -> str:
        return self.module or f"stages/{self.name}.py"

    @property
    def command(self) -> str:
        """The CLI subcommand (``train_head`` -> ``train-head``)."""
        return self.name.replace("_", "-")

    def default(self, flag: str) -> str:
        """The CLI default of the path option ``flag``."""
        for arg in self.args:
            if arg.flag == flag:
                return str(arg.path)
        raise KeyError(f"stage {self.name} has no option {flag}")

    def cmd(self) -> str:
        return " ".join(["pipeline", self.command] + [
            f"{a.flag} {shlex.quote(str(a.path))}" for a in self.args])

    def out_items(self) -> list[tuple[str, bool, str]]:
        return ([(str(a.path), a.role == "out", a.note) for a in self.args
                 if a.role in ("out", "uncached")]
                + [(o.path, o.cached, o.note) for o in self.outs])

    def metric(self) -> str | None:
        found = [str(a.path) for a in self.args if a.role == "metric"]
        return found[0] if found else None


def _p(flag: str, path: Path, role: Role, note: str = "") -> Arg:
    return Arg(flag, path, role, note)


PARAMS = _p("--params", PATHS.params, "pass")

STAGES: tuple[Stage, ...] = (
    Stage("prepare", ("prepare",), (PARAMS, _p("--out", PATHS.prepared, "out")),
          deps=(Extra("${prepare.path}"),)),
    Stage("auto", ("backbone", "features", "train_head", "finetune", "advise"), (
        PARAMS, _p("--prepared", PATHS.prepared, "dep"), _p("--out", PATHS.auto, "out")),
        params_note="chooses the `auto` params by training; seconds when none is auto",
        module="tools/advise.py"),
    Stage("features", ("backbone", "features", "launcher"), (
        PARAMS, _p("--prepared", PATHS.prepared, "dep"), _p("--out", PATHS.features, "out"),
        _p("--metrics", PATHS.metrics_file("features"), "metric"),
        _p("--report", PATHS.report_file("features"), "uncached"),
        _p("--reuse", PATHS.auto / "features", "pass")),
        deps=(Extra(str(PATHS.auto), note="auto's choice (backbone.layer: auto) and its cache"),)),
    Stage("train_head", ("train_head",), (
        PARAMS, _p("--features", PATHS.features, "dep"), _p("--model", PATHS.head, "out"),
        _p("--config", PATHS.head_config, "out"),
        _p("--metrics", PATHS.metrics_file("head"), "metric"),
        _p("--report", PATHS.report_file("head"), "uncached"),
        _p("--plots", PATHS.plots_dir("head"), "pass")),
        outs=(Extra(f"{PATHS.plots_dir('head')}/training.csv", False, "shown by the plots below"),
              Extra(f"{PATHS.plots_dir('head')}/confusion.csv", False))),
    Stage("cut_cache", ("backbone",) + tuple(f"finetune.{k}" for k in CUT_CACHE_KEYS), (
        PARAMS, _p("--prepared", PATHS.prepared, "dep"), _p("--out", PATHS.cut_cache, "out"),
        _p("--reuse", PATHS.auto / "cut_cache", "pass")),
        deps=(Extra(str(PATHS.auto), note="auto's choice (finetune.blocks: auto) and its cache"),),
        params_note="exactly the keys that decide the cache's bytes (CUT_CACHE_KEYS)"),
    Stage("finetune", ("backbone", "finetune", "launcher"), (
        PARAMS, _p("--prepared", PATHS.prepared, "dep"),
        _p("--cut-cache", PATHS.cut_cache, "dep"), _p("--head", PATHS.head, "dep"),
        _p("--head-config", PATHS.head_config, "dep"), _p("--model", PATHS.model, "out"),
        _p("--config", PATHS.model_config, "out"),
        _p("--metrics", PATHS.metrics_file("finetune"), "metric"),
        _p("--report", PATHS.report_file("finetune"), "uncached"),
        _p("--timing", PATHS.finetune_timing, "uncached", "seconds per epoch: differ between runs"),
        _p("--plots", PATHS.plots_dir("finetune"), "pass")),
        deps=(Extra(str(PATHS.auto_choice), note="what finetune's auto params become"),),
        outs=(Extra(f"{PATHS.plots_dir('finetune')}/training.csv", False),
              Extra(f"{PATHS.plots_dir('finetune')}/confusion.csv", False))),
    Stage("export", ("export",), (
        PARAMS, _p("--model", PATHS.model, "dep"), _p("--config", PATHS.model_config, "dep"),
        _p("--prepared", PATHS.prepared, "dep"), _p("--out", PATHS.onnx, "out"),
        _p("--variants-dir", PATHS.variants, "pass"),
        _p("--metrics", PATHS.metrics_file("export"), "metric"),
        _p("--report", PATHS.report_file("export"), "uncached"),
        _p("--plots", PATHS.plots_dir("calibration"), "pass")),
        outs=(Extra(str(PATHS.onnx_sidecar), True,
                    "the contract as JSON (apps that cannot read ONNX metadata)"),
              Extra(str(PATHS.variants), True, "model.fixed.onnx, fp16, int8, each with its .json"),
              Extra(f"{PATHS.plots_dir('calibration')}/uncalibrated.csv", False),
              Extra(f"{PATHS.plots_dir('calibration')}/calibrated.csv", False))),
    Stage("interpret", ("interpret",), (
        PARAMS, _p("--model", PATHS.onnx, "dep"), _p("--prepared", PATHS.prepared, "dep"),
        _p("--out", PATHS.interpret, "out"),
        _p("--metrics", PATHS.metrics_file("interpret"), "metric"),
        _p("--report", PATHS.report_file("interpret"), "uncached"))),
    Stage("machine", (), (_p("--out", PATHS.machine, "uncached"),), always_changed=True,
          has_module=True),
    Stage("bench", ("bench",), (
        PARAMS, _p("--model", PATHS.onnx, "dep"), _p("--variants-dir", PATHS.variants, "dep"),
        _p("--weights", PATHS.model, "dep"), _p("--config", PATHS.model_config, "dep"),
        _p("--prepared", PATHS.prepared, "dep"), _p("--out", PATHS.reports, "pass"),
        _p("--metrics", PATHS.metrics_file("bench"), "metric")),
        deps=(Extra(str(PATHS.machine), note="re-run on another machine"),),
        outs=tuple(Extra(f"{PATHS.reports}/bench.{ext}", False) for ext in ("md", "png", "json"))),
    Stage("card", (), (
        _p("--model", PATHS.onnx, "dep"), _p("--config", PATHS.model_config, "dep"),
        _p("--prepared", PATHS.prepared, "pass"),
        _p("--head-metrics", PATHS.report_file("head"), "dep"),
        _p("--finetune-metrics", PATHS.report_file("finetune"), "dep"),
        _p("--export-metrics", PATHS.report_file("export"), "dep"),
        _p("--interpret-metrics", PATHS.report_file("interpret"), "dep"),
        _p("--bench", PATHS.report_file("bench"), "dep"),
        _p("--out", PATHS.card, "uncached")),
        deps=(Extra(f"{PATHS.prepared}/summary.json"), Extra(f"{PATHS.prepared}/classes.json"))),
)
STAGE = {s.name: s for s in STAGES}
MODULE_STAGES = tuple(s.name for s in STAGES if s.has_module)

PLOTS = """\
plots:
  - Loss per epoch (head):
      template: linear
      x: epoch
      y:
        plots/head/training.csv: [train_loss, val_loss]
  - Validation accuracy per epoch (head):
      template: linear
      x: epoch
      y:
        plots/head/training.csv: val_accuracy
  - Test confusion matrix (head):
      template: confusion
      x: actual
      y:
        plots/head/confusion.csv: predicted
  - Loss per epoch (finetune, epoch 0 = warm start):
      template: linear
      x: epoch
      y:
        plots/finetune/training.csv: [train_loss, val_loss]
  - Validation accuracy per epoch (finetune):
      template: linear
      x: epoch
      y:
        plots/finetune/training.csv: val_accuracy
  - Test confusion matrix (finetune):
      template: confusion
      x: actual
      y:
        plots/finetune/confusion.csv: predicted
  - Reliability on test (accuracy vs confidence; calibrated = export's temperature):
      template: scatter
      x: confidence
      y:
        plots/calibration/uncalibrated.csv: accuracy
        plots/calibration/calibrated.csv: accuracy
  - reports/bench.png
"""


def code_deps(stage: str) -> list[str]:
    """This repository's deps on the package: the stage's module, the packages' ``__init__``
    files, the stage and tool modules it chains (each file), and every shared room
    (``pipeline/core``, ``pipeline/onnx``) whose files it imports."""
    repo = PACKAGE_ROOT.parent
    first = ["pipeline/__init__.py", "pipeline/stages/__init__.py"]
    module = PACKAGE_ROOT / STAGE[stage].module_path
    closure = import_closure(module)
    files = sorted({f.relative_to(repo).as_posix() for f in closure | {module}
                    | {module.parent / "__init__.py"}
                    if f.parent.name in ("stages", "tools")} - set(first))
    rooms = sorted({f.parent.relative_to(repo).as_posix() for f in closure
                    if f.parent != PACKAGE_ROOT and f.parent.name not in ("stages", "tools")})
    return first + files + rooms


def _item(path: str, note: str = "", cached: bool = True, indent: str = "      ") -> list[str]:
    comment = f"   # {note}" if note else ""
    if cached:
        return [f"{indent}- {path}{comment}"]
    return [f"{indent}- {path}:{comment}", f"{indent}    cache: false"]


def _cmd_lines(cmd: str) -> list[str]:
    if len(cmd) <= 88:
        return [f"    cmd: {cmd}"]
    return ["    cmd: >-"] + textwrap.wrap(cmd, 92, initial_indent="      ",
                                          subsequent_indent="      ", break_long_words=False,
                                          break_on_hyphens=False)


def _stage_lines(stage: Stage, project: bool) -> list[str]:
    lines = [f"  {stage.name}:", *_cmd_lines(stage.cmd())]
    if stage.always_changed:
        lines.append("    always_changed: true")
    deps = [(str(a.path), a.note) for a in stage.args if a.role == "dep"]
    if project and stage.has_module:
        deps.append((f"{PATHS.code_fingerprints}/{stage.name}.sha256",
                     "changes when the code this stage runs changes"))
    elif stage.has_module:
        deps += [(d, "") for d in code_deps(stage.name)]
    deps += [(d.path, d.note) for d in stage.deps]
    if deps:
        lines.append("    deps:")
        for path, note in deps:
            lines += _item(path, note)
    if stage.params:
        note = f"   # {stage.params_note}" if stage.params_note else ""
        lines.append(f"    params:{note}")
        lines += [f"      - {p}" for p in stage.params]
    outs = stage.out_items()
    if outs:
        lines.append("    outs:")
        for path, cached, note in outs:
            lines += _item(path, note, cached)
    if stage.metric():
        lines += ["    metrics:", *_item(stage.metric() or "", cached=False)]
    return lines


def render_dvc_yaml(project: bool = False) -> str:
    """``dvc.yaml`` text: this repository's (``project=False``) or a ``pipeline init``
    project's, whose stages depend on the installed tool's code fingerprints."""
    lines: list[str] = []
    if project:
        lines += ["# A project made by `pipeline init`: the chain runs through the installed "
                  "tool (onnx-transfer-pipeline).",
                  "# Stages re-run when their params, data or the tool's code they run change "
                  "(.pipeline/code).",
                  "stages:",
                  "  code:   # fingerprints of the installed tool's code, one file per stage "
                  "(always re-checked)",
                  f"    cmd: pipeline fingerprint --out {PATHS.code_fingerprints}",
                  "    always_changed: true",
                  "    outs:"]
        for name in MODULE_STAGES:
            lines += _item(f"{PATHS.code_fingerprints}/{name}.sha256", cached=False)
        lines.append("")
    else:
        lines += ["# Rendered from the stage table, pipeline/core/stage_table.py: edit the table,",
                  "# then run `python -m pipeline.core.stage_table > dvc.yaml`.",
                  "stages:"]
    for stage in STAGES:
        lines += _stage_lines(stage, project) + [""]
    return "\n".join(lines) + PLOTS


if __name__ == "__main__":
    print(render_dvc_yaml(), end="")
