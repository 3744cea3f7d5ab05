"""The training-loop toolkit shared by head training and fine-tuning."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pipeline.core.training import (
    BestState,
    EarlyStopping,
    decay_groups,
    lr_factor,
    warmup_cosine,
)

from ..conftest import PicklePayload


def test_no_weight_decay_on_one_dimensional_tensors():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 5, 5))
    groups = decay_groups(model, 0.1, 0.01)
    decayed = {id(p) for p in groups[0]["params"]}
    plain = {id(p) for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.01 and groups[1]["weight_decay"] == 0.0
    for p in model.parameters():
        assert (id(p) in decayed) == (p.ndim > 1) and (id(p) in plain) == (p.ndim <= 1)
    model[0].weight.requires_grad_(False)  # frozen tensors are left out
    assert id(model[0].weight) not in {id(p) for g in decay_groups(model, 0.1, 0.01)
                                       for p in g["params"]}


def test_discriminative_learning_rates_reach_the_optimizer():
    from pipeline.core.config import FinetuneParams
    from pipeline.stages.finetune import make_optimizer

    suffix, head = nn.Linear(3, 3), nn.Linear(3, 2)
    params = FinetuneParams(lr_backbone=1e-4, lr_head=3e-3, weight_decay=0.05)
    optimizer = make_optimizer(SimpleNamespace(suffix=suffix), head, params)
    by_param = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups
                for p in g["params"]}
    assert by_param[id(suffix.weight)] == (1e-4, 0.05) and by_param[id(suffix.bias)] == (1e-4, 0)
    assert by_param[id(head.weight)] == (3e-3, 0.05) and by_param[id(head.bias)] == (3e-3, 0)


def test_schedule_warms_up_linearly_then_decays_to_zero():
    assert [lr_factor(s, 10, 2, "cosine") for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, 10, 2, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 10, 2, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(9, 10, 2, "constant") == 1.0
    layer = nn.Linear(1, 1)
    opt = torch.optim.SGD(layer.parameters(), lr=2.0)
    sched = warmup_cosine(opt, epochs=2, steps_per_epoch=5, warmup_epochs=1, schedule="cosine")
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:5] == pytest.approx([0.4, 0.8, 1.2, 1.6, 2.0]) and seen[5] == pytest.approx(2.0)
    assert seen[9] < seen[6] < seen[5]


def test_early_stopping_counts_epochs_without_a_real_gain():
    stop = EarlyStopping(patience=2, min_delta=1e-3)
    assert stop.update(1.0) and not stop.stop
    assert not stop.update(0.9995)  # within min_delta: no gain
    assert not stop.stop
    assert not stop.update(1.2) and stop.stop
    assert EarlyStopping(patience=0).stop is False  # 0 disables
    again = EarlyStopping(2)
    again.load_state_dict(stop.state_dict())
    assert again.stop and again.best == 1.0


def test_best_state_keeps_a_copy_not_a_view():
    layer = nn.Linear(1, 1, bias=False)
    best = BestState(layer)
    assert best.offer(1, (0.5, -1.0))
    with torch.no_grad():
        layer.weight.fill_(7.0)
    assert not best.offer(2, (0.5, -2.0)) and best.epoch == 1  # tuples compare in order
    best.restore()
    assert float(layer.weight) != 7.0
    assert best.offer(3, (0.6, -math.inf)) and best.epoch == 3


def test_a_tampered_resume_file_runs_nothing(tmp_path):
    """The resume state is loaded with weights_only=True: a pickled object in it is refused,
    its code never runs; a state written by save_resume loads back for its own key only."""
    from pipeline.core.training import load_resume, save_resume

    marker = tmp_path / "payload_ran"
    torch.save({"key": "k", "x": PicklePayload(str(marker))}, str(tmp_path / "resume.pt"))
    with pytest.raises(Exception, match="Weights only load failed"):
        load_resume(tmp_path / "resume.pt", "k")
    assert not marker.exists()
    save_resume(tmp_path / "good.pt", {"key": "k", "epoch": 3, "w": torch.ones(2)})
    assert load_resume(tmp_path / "good.pt", "k")["epoch"] == 3
    assert load_resume(tmp_path / "good.pt", "other") is None
    assert load_resume(tmp_path / "missing.pt", "k") is None and load_resume(None, "k") is None
