"""Every artefact path of a project, derived from one root (the folder with ``dvc.yaml``).

The stage table (:mod:`pipeline.core.stage_table`, which renders ``dvc.yaml`` and feeds the
CLI's option defaults), the tools (sweep, benchmarks, noise check) and the tests take their
paths from :class:`ProjectPaths`.
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
    def auto(self) -> Path:
        """The auto stage's folder: ``choice.json``, its advise report and reusable caches."""
        return self._p("data/auto")

    @property
    def auto_choice(self) -> Path:
        return self.auto / "choice.json"

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
    def onnx_sidecar(self) -> Path:
        """The contract as JSON beside the model (``<model>.onnx.json``)."""
        return self._p("models/model.onnx.json")

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
    def machine(self) -> Path:
        """The fingerprint of the machine that ran ``bench`` (its dependency)."""
        return self.reports / "machine.json"

    @property
    def code_fingerprints(self) -> Path:
        """Per-stage fingerprints of the installed tool's code (projects of ``pipeline init``)."""
        return self._p(".pipeline/code")

    @property
    def lr_find(self) -> Path:
        return self.reports / "lr_find"

    @property
    def sweep(self) -> Path:
        return self.reports / "sweep"

    @property
    def advise(self) -> Path:
        """``reports/advise.json`` (``.md`` and ``.png`` beside it)."""
        return self.reports / "advise.json"

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
    def bench_data(self) -> Path:
        return self.reports / "bench_data.json"

    @property
    def bench_predict(self) -> Path:
        return self.reports / "bench_predict.json"

    @property
    def bench_data_work(self) -> Path:
        """Generated photos and runs of ``pipeline bench-data`` (kept, not in git)."""
        return self._p("data/bench_data")

    @property
    def trt_cache(self) -> Path:
        """TensorRT engines and timing cache of ``pipeline bench``."""
        return self.reports / "trt_cache"

    @property
    def bench_scaling(self) -> Path:
        return self.reports / "bench_scaling.json"


PATHS = ProjectPaths()
