"""The tools built on the stages: sweep, bench-finetune, noise-check, lr-find."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.core.config import TrainHeadParams
from pipeline.core.dataset import read_prepared
from pipeline.core.errors import PipelineError

from ..conftest import FAST, TINY, build_cache, finetune  # noqa: F401


@pytest.mark.slow
def test_sweep_and_bench_write_their_reports(project, tmp_path):
    from pipeline.core.config import FeaturesParams as FP
    from pipeline.tools import bench_finetune, sweep

    cfg = sweep.SweepConfig(TINY, FP(batch_size=16, threads=2),
                            TrainHeadParams(epochs=5, threads=2),
                            dataclasses.replace(FAST, epochs=1, warmup_epochs=0))
    report = sweep.run(cfg, project / "prepared", project / "features",
                       project / "head.safetensors", project / "head.json", tmp_path / "sweep",
                       blocks=[0, 1], fractions=[0.5, 1.0], scratch_fractions=[0.5],
                       lr_backbones=[1e-4, 3e-2])
    # blocks 0 trains no backbone weight, so it runs once; blocks 1 once per LR
    assert [(r["blocks"], r["lr_backbone"]) for r in report["blocks"]] == \
        [(0, 1e-4), (1, 1e-4), (1, 3e-2)]
    assert report["blocks"][0]["trainable_parameters"] < report["blocks"][1]["trainable_parameters"]
    low, high = report["blocks"][1:]
    assert low["cut_cache_seconds"] == high["cut_cache_seconds"] > 0  # one cache for both LRs
    # both LRs start from the same warm-started head (epoch 0), then each LR trains its own way
    assert len(low["val_loss_per_epoch"]) == len(high["val_loss_per_epoch"]) == 2
    assert low["val_loss_per_epoch"][0] == high["val_loss_per_epoch"][0]
    assert low["val_loss_per_epoch"][1] != pytest.approx(high["val_loss_per_epoch"][1], rel=1e-3)
    half, full = report["curve"]
    assert half["train_images"] == 20 and full["train_images"] == 40  # 4 per class x 10
    assert {"head_only", "finetuned", "scratch"} <= set(half) and "scratch" not in full
    assert half["scratch_best_epoch"] >= 1 and report["scratch_lr"] == sweep.SCRATCH_LR
    assert 0 <= half["random_features_head"] <= 1
    assert (tmp_path / "sweep" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 1" in (tmp_path / "sweep" / "sweep.md").read_text()
    assert "| 0.03 |" in (tmp_path / "sweep" / "sweep.md").read_text()
    best = sweep.recommend(report["blocks"])
    assert (report["recommended_blocks"], report["recommended_lr_backbone"]) == \
        (best["blocks"], best["lr_backbone"])

    bench = bench_finetune.run(TINY, FAST, project / "prepared", tmp_path / "bench.json",
                               images=16, epochs=1)
    assert bench["classic"]["epoch_s"] > 0 and bench["cut"]["epoch_s"] > 0
    assert json.loads((tmp_path / "bench.json").read_text())["speedup_epoch"] == \
        bench["speedup_epoch"]
    work = bench["compute"]
    assert work["trainable_forward_gmac_per_image"] > 0 and work["cpu_fp32_matmul_gflops"] > 0
    # the report rounds seconds to 1 ms and GFLOP/s to 0.01: allow exactly that much
    gflop, pass_s = work["trainable_train_gflop_per_epoch"], bench["cut"]["train_pass_s"]
    assert gflop / (pass_s + 5e-4) - 0.01 <= work["cut_train_pass_gflops"] \
        <= gflop / max(pass_s - 5e-4, 1e-9) + 0.01


@pytest.mark.slow
def test_noise_check_flips_train_labels_and_ranks_them(project, tmp_path):
    from pipeline.core.config import FeaturesParams as FP
    from pipeline.tools import noise_check, sweep

    _, classes, rows = read_prepared(project / "prepared")
    noisy, flipped = noise_check.flip_labels(rows, classes, 4, seed=3)
    assert len(flipped) == 4 and noise_check.flip_labels(rows, classes, 4, seed=3)[1] == flipped
    by_path = {r["path"]: r for r in rows}
    for path, (true, new) in flipped.items():
        assert by_path[path]["split"] == "train" and by_path[path]["label"] == true != new
    assert sum(a != b for a, b in zip(rows, noisy)) == 4  # nothing else changes
    with pytest.raises(PipelineError, match="--flips must be between 1 and"):
        noise_check.flip_labels(rows, classes, 10_000, seed=0)

    cfg = sweep.SweepConfig(TINY, FP(batch_size=16, threads=2),
                            TrainHeadParams(epochs=5, threads=2),
                            dataclasses.replace(FAST, epochs=1, warmup_epochs=0))
    report = noise_check.run(cfg, project / "prepared", tmp_path / "noise.json", flips=4,
                             seed=3, threads=2)
    assert json.loads((tmp_path / "noise.json").read_text()) == report
    train = sum(r["split"] == "train" for r in rows)
    for name in ("head_only", "finetuned"):
        m = report["models"][name]
        assert m["train_images"] == train and m["flipped"] == 4
        assert len(m["ranks"]) == 4 and all(1 <= r <= train for r in m["ranks"])
        assert m["recall_at_4"] == sum(r <= 4 for r in m["ranks"]) / 4
        assert m["random_recall_at_8"] == 8 / train and 0 <= m["test_accuracy"] <= 1


def test_lr_find_cli_checks_each_suggestion_by_training(project, tmp_path):

    from pipeline.core.caches import load_cache
    from pipeline.stages.train_head import fit_head

    params = tmp_path / "params.yaml"
    params.write_text("train_head:\n  epochs: 5\n  threads: 2\n")
    result = CliRunner().invoke(main, ["lr-find", "--params", str(params), "--features",
                                       str(project / "features"), "--steps", "30",
                                       "--out", str(tmp_path / "lr")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "lr" / "lr_find.json").read_text())
    assert (tmp_path / "lr" / "lr_find.png").read_bytes()[:4] == b"\x89PNG"
    assert [c["lr_from"] for c in report["checked_by_training"]] == \
        ["train_head.lr", "minimum_over_10", "steepest"]
    # each check is the real head training at that LR (deterministic: same figures again)
    cache = load_cache(project / "features")
    for check in report["checked_by_training"]:
        trained = fit_head(*cache.split("train"), *cache.split("val"), 10,
                           TrainHeadParams(epochs=5, threads=2, lr=check["lr"]))
        assert check["best_epoch"] == trained.best_epoch
        assert check["val_loss"] == trained.history[trained.best_epoch - 1]["val_loss"]
    assert "lr-find: train_head.lr" in result.output
    bad = CliRunner().invoke(main, ["lr-find", "--params", str(params), "--features",
                                    str(project / "features"), "--lr-min", "1", "--lr-max",
                                    "0.1", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 1 and "--lr-min must be > 0 and below --lr-max" in bad.output
    assert not (tmp_path / "bad").exists()


def test_noise_check_ranking_figures(tmp_path):
    from pipeline.tools.noise_check import ranking_figures

    table = tmp_path / "train_losses.csv"
    table.write_text("path,label,predicted,p_label,p_predicted,loss\n" +
                     "".join(f"{i}.png,0,0,0.5,0.5,{10 - i}\n" for i in range(10)))
    figures = ranking_figures(table, {"0.png": ("0", "1"), "3.png": ("0", "2")})
    assert figures["ranks"] == [1, 4] and figures["median_rank"] == 2.5
    assert (figures["recall_at_2"], figures["recall_at_4"]) == (0.5, 1.0)
    assert (figures["random_recall_at_2"], figures["random_recall_at_4"]) == (0.2, 0.4)


def test_sweep_recommends_best_val_then_fewest_parameters_then_first_lr():
    from pipeline.tools.sweep import recommend

    def row(blocks, lr, val, params):
        return {"blocks": blocks, "lr_backbone": lr, "val_accuracy": val,
                "trainable_parameters": params}

    rows = [row(0, 3e-4, 0.90, 10), row(1, 3e-4, 0.95, 100), row(1, 1e-3, 0.97, 100),
            row(2, 3e-4, 0.97, 200), row(2, 1e-3, 0.96, 200)]
    assert recommend(rows) == rows[2]  # ties with blocks 2 on val; fewer parameters win
    rows.append(row(1, 3e-3, 0.97, 100))
    assert recommend(rows) == rows[2]  # full tie: the LR listed first
    rows.append(row(3, 1e-3, 0.98, 300))
    assert recommend(rows) == rows[-1]


def test_forward_macs_counts_dense_depthwise_and_linear_layers():
    from pipeline.tools import bench_finetune

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1),
                                torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),
                                torch.nn.Flatten(), torch.nn.Linear(200, 4))
    # 200 outputs x 27, 200 outputs x 9 (one input channel per group), 4 outputs x 200
    assert bench_finetune.forward_macs(model, torch.zeros(1, 3, 5, 5)) == 5400 + 1800 + 800
    assert bench_finetune.forward_macs(model, torch.zeros(2, 3, 5, 5)) == 2 * 8000


def test_sweep_recommends_by_val_then_fewer_parameters():
    from pipeline.tools.sweep import recommend

    rows = [{"blocks": 0, "val_accuracy": 0.90, "test_accuracy": 0.99, "trainable_parameters": 10},
            {"blocks": 1, "val_accuracy": 0.95, "test_accuracy": 0.90, "trainable_parameters": 20},
            {"blocks": 2, "val_accuracy": 0.95, "test_accuracy": 0.97, "trainable_parameters": 30}]
    assert recommend(rows)["blocks"] == 1  # test accuracy never chooses; ties: fewer parameters
    rows[2]["val_accuracy"] = 0.96
    assert recommend(rows)["blocks"] == 2


# --------------------------------------------------------------------------- GPU


