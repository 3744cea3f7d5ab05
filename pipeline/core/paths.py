"""Every artefact path of a project, derived from one root (the folder with ``dvc.yaml``).

The CLI's option defaults, the tools (sweep, benchmarks, noise check) and the tests take their
paths from :class:`ProjectPaths`; a test checks that ``dvc.yaml`` names the same files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProjectPaths:
    """Paths of one project, relative to ``root`` (``"."``: the current folder)."""

    root: Path = Path(".")

    def _p(self, rel: str) -> Path:
        return self.root / rel if self.root != Path(".") else Path(rel)

    @property
    def params(self) -> Path:
        return self._p("params.yaml")

    @property
    def images(self) -> Path:
        return self._p("data/images")

    @property
    def prepared(self) -> Path:
        return self._p("data/prepared")

    @property
    def features(self) -> Path:
        return self._p("data/features")

    @property
    def cut_cache(self) -> Path:
        return self._p("data/cut_cache")

    @property
    def head(self) -> Path:
        return self._p("models/head.safetensors")

    @property
    def head_config(self) -> Path:
        return self._p("models/head.json")

    @property
    def model(self) -> Path:
        return self._p("models/model.safetensors")

    @property
    def model_config(self) -> Path:
        return self._p("models/model.json")

    @property
    def onnx(self) -> Path:
        return self._p("models/model.onnx")

    @property
    def variants(self) -> Path:
        return self._p("models/variants")

    @property
    def metrics(self) -> Path:
        return self._p("metrics")

    @property
    def plots(self) -> Path:
        return self._p("plots")

    @property
    def reports(self) -> Path:
        return self._p("reports")

    def metrics_file(self, stage: str) -> Path:
        """``metrics/<stage>.json``: the few headline figures DVC compares across runs."""
        return self.metrics / f"{stage}.json"

    def report_file(self, stage: str) -> Path:
        """``reports/<stage>.json``: the stage's full figures (per class, tables, environment)."""
        return self.reports / f"{stage}.json"

    def plots_dir(self, stage: str) -> Path:
        return self.plots / stage

    @property
    def finetune_timing(self) -> Path:
        return self.reports / "finetune_timing.json"

    @property
    def interpret(self) -> Path:
        return self.reports / "interpret"

    @property
    def card(self) -> Path:
        return self.reports / "model_card.md"

    @property
    def lr_find(self) -> Path:
        return self.reports / "lr_find"

    @property
    def sweep(self) -> Path:
        return self.reports / "sweep"

    @property
    def noise_check(self) -> Path:
        return self.reports / "noise_check.json"

    @property
    def bench_features(self) -> Path:
        return self.reports / "bench_features.json"

    @property
    def bench_finetune(self) -> Path:
        return self.reports / "bench_finetune.json"

    @property
    def bench_scaling(self) -> Path:
        return self.reports / "bench_scaling.json"


PATHS = ProjectPaths()
