"""Every ``params.yaml`` section as a typed frozen dataclass: the one place defaults live.

``params.yaml`` shows the same values (a test fails when a default and the file differ), and
``pipeline init``-style tools write their params from :data:`SECTIONS`. Parsing and validation
(unknown keys, types, bounds) are in :mod:`pipeline.core.params`; :func:`load_params` reads the
file once and returns the requested sections.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from .augment import Augment
from .errors import ParamsError
from .imageio import DEFAULT_MAX_PIXELS
from .params import load_params_file, param, parse_section
from .paths import PATHS

EMBEDDED_DEFAULT = "efficientnet_lite0"
SplitName = Literal["train", "val", "test"]
Provider = Literal["cpu", "openvino", "cuda", "tensorrt"]
Variant = Literal["fp16", "int8", "int8_openvino"]
# the finetune keys that decide the cut cache's bytes (batch size and threads change how
# onnxruntime splits its sums); the cut_cache stage's DVC params are exactly these, so changing
# epochs or LRs keeps the cache
CUT_CACHE_KEYS = ("enabled", "blocks", "mode", "views", "augment", "cache_dtype", "seed",
                  "batch_size", "threads")


# max |onnxruntime - PyTorch| on the first batch of cached features or activations, as a
# fraction of max(1, max |PyTorch|) (features.verify_tolerance; the cut cache uses the default)
VERIFY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class PrepareParams:
    """``prepare`` section of params.yaml."""

    source: Literal["sklearn-digits", "folder", "csv"] = "sklearn-digits"
    path: str = param(str(PATHS.images), help="image folder (folder) or manifest file (csv)")
    val_fraction: float = param(0.15, gt=0.0, lt=1.0)
    test_fraction: float = param(0.15, gt=0.0, lt=1.0)
    seed: int = param(42, ge=0)
    min_images_per_class: int = param(3, ge=3, help="fewer usable images than this fails")
    max_images_per_class: int | None = param(None, ge=3, help="seeded subsample per class")
    max_image_pixels: int = param(DEFAULT_MAX_PIXELS, ge=1)
    duplicates: Literal["drop", "keep"] = "drop"
    short_side: int = param(256, ge=8, help="shorter side of the decoded copies that later "
                            "stages read (the backbone's resize size gives exact crops)")
    workers: int | None = param(None, ge=0, help="decoding processes (null: one per CPU; "
                                "0 or 1: in-process)")

    def validate(self, section: str) -> None:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ParamsError(f"{section}.val_fraction + {section}.test_fraction must be < 0.9 "
                              f"(got {self.val_fraction + self.test_fraction:g})")
        if (self.max_images_per_class is not None
                and self.max_images_per_class < self.min_images_per_class):
            raise ParamsError(f"{section}.max_images_per_class must be >= "
                              f"{section}.min_images_per_class")


@dataclass(frozen=True)
class BackboneParams:
    """``backbone`` section of params.yaml."""

    name: str = param(EMBEDDED_DEFAULT, help="registry name: efficientnet_lite0, "
                      "torchvision:<model>, timm:<model>")
    weights: str = param("default", help="default | none | torchvision enum name | local file")
    layer: Union[int, Literal["last", "auto"]] = param(
        "last", ge=0, help="features from the end of this block group (0 = stem), the last "
        "layer, or auto (the auto stage's verified choice)")

    def validate(self, section: str) -> None:
        if not self.name.strip():
            raise ParamsError(f"{section}.name must not be empty")


@dataclass(frozen=True)
class LauncherParams:
    """``launcher`` section of params.yaml."""

    nproc_per_node: int = param(1, ge=1, help="processes per machine (GPUs per node)")
    nnodes: int = param(1, ge=1)
    rdzv_backend: Literal["c10d", "static"] = "c10d"
    rdzv_endpoint: str = param("", help="host:port of the rendezvous (multi-node)")
    rdzv_id: str = "pipeline"
    node_rank: int = param(0, ge=0, help="this machine's rank (rdzv_backend: static)")
    backend: Literal["auto", "gloo", "nccl"] = "auto"

    def validate(self, section: str) -> None:
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ParamsError(f"{section}.rdzv_endpoint must be host:port when "
                              f"{section}.nnodes > 1")

    @property
    def distributed(self) -> bool:
        return self.nproc_per_node * self.nnodes > 1


@dataclass(frozen=True)
class FeaturesParams:
    """``features`` section of params.yaml."""

    engine: Literal["onnxruntime", "torch"] = "onnxruntime"
    device: Literal["cpu", "cuda"] = "cpu"
    batch_size: int = param(32, ge=1, le=4096)
    threads: int = param(0, ge=0, help="0: one per CPU this process may use")
    workers: int | None = param(None, ge=0, help="image-loading worker processes (0: "
                                "in-process; null: one per 2 CPUs, at most 4)")
    verify_tolerance: float = param(VERIFY_TOLERANCE, gt=0.0, help="first batch: max |onnxruntime "
                                    "- PyTorch| / max(1, max |PyTorch|)")


@dataclass(frozen=True)
class TrainHeadParams:
    """``train_head`` section of params.yaml."""

    head: Literal["linear", "mlp"] = "linear"
    hidden_dim: int = param(512, ge=1)
    dropout: float = param(0.0, ge=0.0, lt=1.0)
    epochs: int = param(200, ge=1)
    batch_size: int = param(64, ge=1)
    lr: float = param(3e-3, gt=0.0, le=10.0)
    weight_decay: float = param(1.0, ge=0.0, help="AdamW (decoupled) decay")
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: int = param(2, ge=0)
    patience: int = param(30, ge=0, help="epochs without val-loss improvement; 0 disables")
    class_weighting: Literal["balanced", "none"] = "balanced"
    label_smoothing: float = param(0.0, ge=0.0, lt=1.0)
    std_floor: float = param(1.0, gt=0.0, help="feature std floor, as a multiple of the mean "
                             "std over channels")
    seed: int = param(0, ge=0)
    threads: int = param(0, ge=0)


@dataclass(frozen=True)
class FinetuneParams:
    """``finetune`` section of params.yaml."""

    enabled: bool = True
    blocks: Union[int, Literal["all", "auto"]] = param(
        2, ge=0, help="trailing block groups to train; auto: the auto stage's verified choice "
        "(a head-only choice turns fine-tuning off)")
    mode: Literal["cut", "classic"] = "cut"
    views: int = param(4, ge=1, le=64, help="cached augmented views per training image")
    augment: Augment = "light"
    cache_dtype: Literal["float32", "float16"] = "float32"
    epochs: int = param(20, ge=1)
    batch_size: int = param(32, ge=1)
    lr_backbone: Union[float, Literal["auto"]] = param(3e-4, gt=0.0, le=1.0)
    lr_head: Union[float, Literal["auto"]] = param(3e-4, gt=0.0, le=1.0)
    weight_decay: float = param(0.01, ge=0.0)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: int = param(2, ge=0)
    patience: int = param(6, ge=0, help="fine-tuning epochs without val-loss gain; 0 disables")
    train_bn: bool = False
    class_weighting: Literal["balanced", "none"] = "balanced"
    label_smoothing: float = param(0.1, ge=0.0, lt=1.0)
    seed: int = param(0, ge=0)
    threads: int = param(0, ge=0, help="0: one per CPU this process may use")
    workers: int | None = param(None, ge=0, help="image-loading worker processes (0: "
                                "in-process; null: one per 2 CPUs, at most 4)")
    device: Literal["cpu", "cuda"] = "cpu"

    def validate(self, section: str) -> None:
        if self.warmup_epochs > self.epochs:
            raise ParamsError(f"{section}.warmup_epochs ({self.warmup_epochs}) must be <= "
                              f"{section}.epochs ({self.epochs})")

    @property
    def cached_views(self) -> int:
        """Distinct views worth caching: one when there is no augmentation."""
        return 1 if self.augment == "none" else self.views


@dataclass(frozen=True)
class ExportParams:
    """``export`` section of params.yaml."""

    opset: int = param(18, ge=18, le=23)
    input: Literal["uint8_nhwc", "float32_nchw"] = "uint8_nhwc"
    logits_output: bool = False
    variants: tuple[Variant, ...] = ("fp16", "int8", "int8_openvino")
    calibration_images: int = param(2000, ge=1, help="training images for INT8 calibration "
                                    "(spread over the split; all of them when fewer)")
    int8_calibration: Literal["minmax", "percentile", "entropy"] = "minmax"
    int8_openvino_calibration_images: int = param(300, ge=1, help="of the calibration "
                                                  "images, how many NNCF's quantiser reads "
                                                  "(int8_openvino)")
    int8_reduce_range: bool = param(True, help="7-bit INT8 weights: onnxruntime's U8S8 kernels "
                                    "saturate 16-bit sums on CPUs without VNNI")
    check_images: int = param(64, ge=1, help="test images for the max |diff| check")
    tolerance: float = param(1e-4, gt=0.0, help="max |onnxruntime - PyTorch|, FP32")
    fp16_min_agreement: float = param(0.995, ge=0.0, le=1.0)
    int8_max_accuracy_drop: float = param(0.01, ge=0.0, le=1.0)
    probability_calibration: Literal["temperature", "none"] = "temperature"
    reliability_bins: int = param(15, ge=2, le=100, help="confidence bins for ECE and the "
                                  "reliability plot")
    ood: Literal["mahalanobis+msp", "mahalanobis", "knn", "energy", "msp", "none"] = param(
        "mahalanobis+msp", help="the in_distribution output's score (fitted on train, "
        "threshold on val); none: no such output")
    ood_max_pass_change: float = param(0.05, ge=0.0, le=1.0, help="FP16/INT8: the share of "
                                       "test images passing the detector, at most this far "
                                       "from FP32's (and no more probe images of no class)")
    threads: int = param(0, ge=0)


@dataclass(frozen=True)
class InterpretParams:
    """``interpret`` section of params.yaml."""

    splits: tuple[SplitName, ...] = ("test", "train")
    top_losses: int = param(16, ge=1, le=400, help="images on each split's contact sheet")
    most_confused: int = param(10, ge=1, help="(actual, predicted) pairs listed per split")
    batch_size: int = param(32, ge=1)
    threads: int = param(0, ge=0)


@dataclass(frozen=True)
class BenchParams:
    """``bench`` section of params.yaml."""

    providers: tuple[Provider, ...] = ("cpu", "openvino", "cuda", "tensorrt")
    variants: tuple[Literal["fp32", "fp16", "int8", "int8_openvino"], ...] = (
        "fp32", "fp16", "int8", "int8_openvino")
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    pytorch: bool = True
    iterations: int = param(100, ge=1, help="timed runs per configuration (at most)")
    time_budget_s: float = param(5.0, gt=0.0, help="timed seconds per configuration (at most)")
    warmup: int = param(3, ge=0)
    paired_rounds: int = param(10, ge=0, help="interleaved rounds timing the best accurate "
                               "CPU path against onnxruntime CPU FP32; 0 = off")
    paired_block_s: float = param(0.5, gt=0.0, help="seconds each side runs per round")
    accuracy_images: int = param(0, ge=0, help="test images for accuracy; 0 = whole split")
    threads: int = param(0, ge=0, help="0: one per CPU this process may use")
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = "EXHAUSTIVE"
    io_binding: bool = True
    cuda_tf32: bool = True
    trt_fp16: bool = True
    trt_cache_dir: str = str(PATHS.trt_cache)

    def validate(self, section: str) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ParamsError(f"{section}.batch_sizes must be a non-empty list of integers >= 1")
        if not self.providers and not self.pytorch:
            raise ParamsError(f"{section}: nothing to measure (empty providers, pytorch false)")


@dataclass(frozen=True)
class AdviseParams:
    """``advise`` section of params.yaml (``pipeline advise``: which backbone, layer and
    fine-tuning depth this data set needs)."""

    backbones: tuple[str, ...] = param((), help="candidates; empty: backbone.name plus the "
                                       "installed offline backbones")
    max_images_per_class: int = param(100, ge=2, help="train+val images per class scored "
                                      "(seeded sample)")
    batch_size: int = param(32, ge=1, le=4096)
    folds: int = param(5, ge=2, help="cross-validation folds of the linear probe")
    knn_k: int = param(10, ge=1)
    bootstrap: int = param(1000, ge=10, help="resamples for the accuracy intervals")
    large_per_class: int = param(500, ge=1, help="train images per class from which a data "
                                 "set counts as large (fine-tuning pays)")
    specificity_drop: float = param(0.02, ge=0.0, le=1.0, help="probe accuracy lost from the "
                                    "best layer to the last one beyond which the data counts "
                                    "as different from ImageNet")
    verify: int = param(0, ge=0, help="train this many top (backbone, layer) heads for real, "
                        "plus two fine-tunes by successive halving; 0: scores only")
    rung_epochs: int = param(4, ge=1, help="fine-tuning epochs of the first halving rung")
    seed: int = param(0, ge=0)
    threads: int = param(0, ge=0, help="0: one per CPU this process may use")
    workers: int | None = param(None, ge=0, help="image-loading processes (null: one per 2 "
                                "CPUs, at most 4)")


SECTIONS: dict[str, type] = {
    "prepare": PrepareParams,
    "backbone": BackboneParams,
    "launcher": LauncherParams,
    "features": FeaturesParams,
    "train_head": TrainHeadParams,
    "finetune": FinetuneParams,
    "export": ExportParams,
    "interpret": InterpretParams,
    "bench": BenchParams,
    "advise": AdviseParams,
}


def load_params(path: str | Path, *sections: str,
                overrides: dict[str, dict[str, Any]] | None = None,
                resolve_auto: bool = True) -> dict[str, Any]:
    """Read the params file once and parse ``sections`` (all of them when none are named);
    a missing section gets its defaults; ``overrides`` (section -> keys) are applied before
    validation (command-line options). Errors name the file and the key. ``auto`` values are
    replaced by the auto stage's choice (its ``choice.json`` beside the params file), unless
    ``resolve_auto`` is false (the auto stage itself)."""
    data = load_params_file(path)
    parsed = {}
    for name in sections or tuple(SECTIONS):
        section = data.get(name)
        if overrides and name in overrides:
            section = {**(section or {}), **overrides[name]}
        try:
            parsed[name] = parse_section(SECTIONS[name], section, name)
        except ParamsError as exc:
            raise ParamsError(f"{path}: {exc}") from None
    if resolve_auto:
        from .auto import resolve

        parsed = resolve(parsed, Path(path).parent / PATHS.auto_choice)
    return parsed
