"""The trained classifier as a PyTorch module, and its safetensors + JSON files.

``finetune`` writes ``models/model.safetensors`` (``backbone.*`` and ``head.*`` tensors) and
``models/model.json`` (format, classes, backbone, preprocessing, head shape, cut); ``export``,
``bench`` and the tools rebuild the model from them with :func:`load_model`: no download, no
pickle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_file, write_json
from .backbones import Backbone, build_backbone
from .config import BackboneParams
from .errors import PipelineError
from .heads import Head, HeadConfig

MODEL_FORMAT = 1


class Classifier(nn.Module):
    """Backbone + head: NCHW normalised pixels -> logits. What the export stage exports."""

    def __init__(self, backbone: nn.Module, head: Head) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(pixels))


def module_device(module: nn.Module) -> torch.device:
    """Where ``module``'s parameters live (CPU for a module without any)."""
    return next(module.parameters(), torch.empty(0)).device


def save_model(backbone: Backbone, head: Head, weights_path: str | Path,
               config_path: str | Path, config: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    state = {f"backbone.{k}": v.detach().contiguous()
             for k, v in backbone.model.state_dict().items()}
    state |= {f"head.{k}": v.detach().contiguous() for k, v in head.state_dict().items()}
    with atomic_file(weights_path) as tmp:
        save_file(state, str(tmp), metadata={"format": str(MODEL_FORMAT)})
    write_json(config_path, config)


def load_model(weights_path: str | Path, config_path: str | Path) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the classifier written by this stage: no download, no pickle."""
    from safetensors.torch import load_file

    for p in (weights_path, config_path):
        if not Path(p).is_file():
            raise PipelineError(f"{p} not found; run `pipeline finetune` (or dvc repro) first")
    config = json.loads(Path(config_path).read_text(encoding="utf-8"))
    if config.get("format") != MODEL_FORMAT:
        raise PipelineError(f"{config_path}: not a model config written by `pipeline finetune`")
    backbone = build_backbone(BackboneParams(name=config["backbone"]["name"], weights="none",
                                             layer=config["backbone"].get("layer", "last")))
    state = load_file(str(weights_path))
    backbone.model.load_state_dict(
        {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")})
    head = Head(HeadConfig(**config["head"]))
    head.load_state_dict({k.removeprefix("head."): v for k, v in state.items()
                          if k.startswith("head.")})
    model = Classifier(backbone.model, head).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, config
