"""Classification heads trained on cached features: linear (default) or MLP with dropout.

The feature standardisation (train-split mean/std) is stored inside the head as buffers, so the
head takes raw backbone features and exports to ONNX as is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .atomic import atomic_file, write_json
from .errors import PipelineError


@dataclass(frozen=True)
class HeadConfig:
    kind: Literal["linear", "mlp"]
    in_features: int
    num_classes: int
    hidden_dim: int = 512
    dropout: float = 0.0


class Head(nn.Module):
    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("feature_mean", torch.zeros(cfg.in_features))
        self.register_buffer("feature_std", torch.ones(cfg.in_features))
        if cfg.kind == "linear":
            self.layers = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cfg.in_features,
                                                                           cfg.num_classes))
        else:
            self.layers = nn.Sequential(
                nn.Linear(cfg.in_features, cfg.hidden_dim), nn.GELU(), nn.Dropout(cfg.dropout),
                nn.Linear(cfg.hidden_dim, cfg.num_classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers((features - self.feature_mean) / self.feature_std)


def save_head(head: Head, weights_path: str | Path, config_path: str | Path,
              extra: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
    with atomic_file(weights_path) as tmp:
        save_file(state, str(tmp))
    write_json(config_path, {"head": asdict(head.cfg), **extra})


def load_head(weights_path: str | Path, config_path: str | Path) -> tuple[Head, dict[str, Any]]:
    import json

    from safetensors.torch import load_file

    for p in (weights_path, config_path):
        if not Path(p).is_file():
            raise PipelineError(f"{p} not found; run `pipeline train-head` first")
    config = json.loads(Path(config_path).read_text(encoding="utf-8"))
    head = Head(HeadConfig(**config["head"]))
    head.load_state_dict(load_file(str(weights_path)))
    return head.eval(), config
