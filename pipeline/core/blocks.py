"""Split a backbone at a block-group boundary into a frozen prefix and a trainable suffix.

Fine-tuning unfreezes the last N block groups of the backbone registry entry (timm's coarse
``group_matcher``: stem first, last block last). This module rewrites the backbone as its
top-level modules in forward order (expanding ``blocks``/``layers``/``features``/``stages``),
maps each module to its block group, and cuts the list so that ``suffix(prefix(x)) ==
backbone(x)``. Every split is checked numerically; an architecture whose forward is not such a
chain (e.g. one with a class token) gets a clear error instead of a silently wrong model.

Used by ``cut_cache`` (runs the prefix once) and ``finetune`` (trains the suffix and the head),
and by :func:`truncate_backbone`: features from an earlier block group (``backbone.layer``),
the network ending there, globally pooled.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Union

import torch
from torch import nn

from .backbones import Backbone
from .errors import ParamsError, PipelineError

EXPANDED = ("blocks", "layers", "features", "stages")
Blocks = Union[int, str]  # 0..G or "all"


class Flatten4D(nn.Module):
    """Flattens (N, C, 1, 1) pooled maps to (N, C), as the models' own forward does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(x, 1) if x.ndim == 4 else x


class Chain(nn.Module):
    """Applies its modules in order. Holds the backbone's own module objects (no copies)."""

    def __init__(self, modules: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        self.names = [name for name, _ in modules]
        self.steps = nn.ModuleList(module for _, module in modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            x = step(x)
        return x


@dataclass
class Split:
    """A backbone cut into ``prefix`` (frozen) and ``suffix`` (trainable)."""

    prefix: Chain
    suffix: Chain
    blocks: int  # trainable block groups (0..num_groups)
    num_groups: int
    cut_module: str  # name of the first module of the suffix ("" when the suffix is empty)
    trainable_names: list[str]  # backbone parameter names in the suffix

    def describe(self) -> dict[str, Any]:
        return {"blocks": self.blocks, "num_block_groups": self.num_groups,
                "cut_before": self.cut_module or "(after the backbone)",
                "trainable_backbone_tensors": len(self.trainable_names)}


def ordered_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Top-level modules in registration order, block containers expanded, pools flattened."""
    out: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if name in EXPANDED and isinstance(child, nn.Sequential) and len(child) > 1:
                visit(full + ".", child)
                continue
            out.append((full, child))
            if isinstance(child, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
                out.append((f"{full}:flatten", Flatten4D()))

    visit("", model)
    return out


def _group_of_modules(modules: list[tuple[str, nn.Module]],
                      groups: list[list[str]], arch: str) -> list[int]:
    group_of = {name: i for i, names in enumerate(groups) for name in names}
    result: list[int] = []
    current = 0
    for name, module in modules:
        found = {group_of.get(f"{name}.{p}") for p, _ in module.named_parameters()}
        if None in found:
            raise PipelineError(f"{arch}: module {name} has parameters outside the registry's "
                                "block groups; partial fine-tuning is not supported for it "
                                "(use finetune.blocks: 0 or all)")
        if len(found) > 1:
            raise PipelineError(f"{arch}: module {name} spans block groups {sorted(found)}; "
                                "partial fine-tuning is not supported for it (use "
                                "finetune.blocks: 0 or all)")
        if found:
            group = found.pop()
            if group < current:
                raise PipelineError(f"{arch}: block groups are not in forward order at {name}; "
                                    "partial fine-tuning is not supported for it")
            current = group
        result.append(current)
    return result


def resolve_blocks(blocks: Blocks, num_groups: int, backbone_name: str) -> int:
    """``finetune.blocks`` (0..G or 'all') -> number of trainable groups, with a clear error."""
    if blocks == "all":
        return num_groups
    if not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 0:
        raise ParamsError(f"finetune.blocks must be 0..{num_groups} or 'all' (got {blocks!r})")
    if blocks > num_groups:
        raise ParamsError(f"finetune.blocks is {blocks} but {backbone_name} has {num_groups} "
                          f"block groups; use 0..{num_groups} or 'all'")
    return blocks


def split_backbone(backbone: Backbone, blocks: Blocks, check: bool = True) -> Split:
    """Cut ``backbone`` so that its last ``blocks`` groups form the suffix."""
    model = backbone.model
    num_groups = len(backbone.block_groups)
    n = resolve_blocks(blocks, num_groups, backbone.name)
    modules = ordered_modules(model)
    if n == 0:
        cut = len(modules)
    else:
        first_trainable = num_groups - n
        module_groups = _group_of_modules(modules, backbone.block_groups, backbone.architecture)
        cut = next((i for i, g in enumerate(module_groups) if g >= first_trainable),
                   len(modules))
        # parameter-free modules just before the cut (activations) stay in the prefix
    prefix, suffix = Chain(modules[:cut]), Chain(modules[cut:])
    trainable = [f"{name}.{p}" for name, module in modules[cut:]
                 for p, _ in module.named_parameters()]
    split = Split(prefix, suffix, n, num_groups, modules[cut][0] if cut < len(modules) else "",
                  trainable)
    if check:
        check_split(backbone, split)
    return split


def check_split(backbone: Backbone, split: Split, tolerance: float = 1e-4) -> None:
    """``suffix(prefix(x))`` must equal ``backbone(x)``; otherwise the chain is wrong."""
    size = backbone.preprocessing.input_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    was_training = [m.training for m in backbone.model.modules()]
    backbone.model.eval()
    with torch.no_grad():
        expected = backbone.model(x)
        got = split.suffix(split.prefix(x))
    for m, flag in zip(backbone.model.modules(), was_training):
        m.train(flag)
    if got.shape != expected.shape:
        raise PipelineError(f"{backbone.architecture}: its forward is not a chain of its "
                            f"top-level modules (got shape {tuple(got.shape)}, expected "
                            f"{tuple(expected.shape)}); use finetune.blocks: 0 or all")
    diff = float((got - expected).abs().max())
    scale = max(1.0, float(expected.abs().max()))
    if diff > tolerance * scale:
        raise PipelineError(f"{backbone.architecture}: its forward is not a chain of its "
                            f"top-level modules (max diff {diff:.3g}); use finetune.blocks: 0 "
                            "or all")


def set_bn_modes(split: Split, train_bn: bool) -> None:
    """Eval mode everywhere, except BatchNorm of the suffix when ``train_bn``; dropout trains."""
    split.prefix.eval()
    for module in split.suffix.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train(train_bn)
        else:
            module.train(True)


def _is_global_pool(module: nn.Module) -> bool:
    """torch's adaptive pools and timm's ``SelectAdaptivePool2d`` (its models' global pool)."""
    return (isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))
            or type(module).__name__ == "SelectAdaptivePool2d")


def resolve_layer(layer: Blocks, num_groups: int, backbone_name: str) -> int | None:
    """``backbone.layer`` (0..G-1 or 'last') -> the last block group kept, None for the whole
    network, with a clear error."""
    if layer == "last":
        return None
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < num_groups:
        raise ParamsError(f"backbone.layer must be 0..{num_groups - 1} (the block groups of "
                          f"{backbone_name}) or 'last' (got {layer!r})")
    return layer


def truncate_backbone(backbone: Backbone, layer: Blocks) -> Backbone:
    """The backbone ending after block group ``layer``, its output globally pooled: modules
    of later groups become identities (parameter names of the kept ones do not change, so
    weights, the block split and exports work as for the whole network); ``last``: as is."""
    keep = resolve_layer(layer, len(backbone.block_groups), backbone.name)
    if keep is None:
        return backbone
    model = backbone.model
    modules = ordered_modules(model)
    groups = _group_of_modules(modules, backbone.block_groups, backbone.architecture)
    pools = [i for i, (_, m) in enumerate(modules) if _is_global_pool(m)]
    if not pools:
        raise PipelineError(f"{backbone.architecture}: no global pooling layer to pool an "
                            "earlier block group's output; use backbone.layer: last")
    for (name, module), group in zip(modules, groups):
        if group > keep and any(True for _ in module.parameters()):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, nn.Identity())
    kept = {n for n, _ in model.named_parameters()}
    block_groups = [[n for n in g if n in kept] for g in backbone.block_groups[:keep + 1]]
    size = backbone.preprocessing.input_size
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(1, 3, size, size))
    except RuntimeError as exc:  # a forward that is not a chain of its modules
        out, why = None, str(exc).splitlines()[0][:200]
    else:
        why = f"gives shape {tuple(out.shape)}, not pooled features"
    if out is None or out.ndim != 2:
        raise PipelineError(f"{backbone.architecture}: cut after block group {keep}, its "
                            f"forward {why}; use backbone.layer: last")
    return replace(backbone, feature_dim=int(out.shape[1]), block_groups=block_groups,
                   model=model, layer=keep)


class GroupFeatures(nn.Module):
    """The backbone's pooled output at the end of every block group, in one forward.

    Output ``k`` is what :func:`truncate_backbone` at layer ``k`` returns: the chain up to the
    group's last module, then the later modules that have no parameters (activations, the
    global pool, flatten); the last output is the whole network's features."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        modules = ordered_modules(backbone.model)
        groups = _group_of_modules(modules, backbone.block_groups, backbone.architecture)
        self.chain = Chain(modules)
        self.ends = [max(i for i, g in enumerate(groups) if g == k)
                     for k in range(len(backbone.block_groups)) if k in groups]
        if len(self.ends) != len(backbone.block_groups):
            raise PipelineError(f"{backbone.architecture}: a block group owns no module; "
                                "layers cannot be compared for it")
        self.free = [not any(True for _ in m.parameters()) for _, m in modules]
        if not any(_is_global_pool(m) for _, m in modules):
            raise PipelineError(f"{backbone.architecture}: no global pooling layer to pool an "
                                "earlier block group's output")
        whole = Split(self.chain, Chain([]), 0, len(backbone.block_groups), "", [])
        try:  # the chain must be the network, or its layers are not the network's
            check_split(backbone, whole)
        except RuntimeError as exc:
            raise PipelineError(f"{backbone.architecture}: its forward is not a chain of its "
                                f"top-level modules ({str(exc).splitlines()[0][:200]})") from None

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        steps = list(self.chain.steps)
        outputs: list[torch.Tensor] = []
        for i, step in enumerate(steps):
            x = step(x)
            if i in self.ends[:-1]:
                y = x
                for j in range(i + 1, len(steps)):
                    if self.free[j]:
                        y = steps[j](y)
                outputs.append(y)
        outputs.append(x)
        return outputs
