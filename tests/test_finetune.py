"""Fine-tuning: block split, BN modes, warm start, cut cache, cut == classic, resume, errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline import cut_cache
from pipeline.augment import augment, view_rng
from pipeline.backbones import BackboneParams, build_backbone
from pipeline.blocks import set_bn_modes, split_backbone
from pipeline.errors import ParamsError, PipelineError
from pipeline.features import FeaturesParams
from pipeline.features import run as extract_features
from pipeline.finetune import count_trainable, freeze_all_but_suffix, load_model, run
from pipeline.finetune_data import CUT_CACHE_KEYS, FinetuneParams, view_pixels
from pipeline.heads import load_head
from pipeline.params import parse_section
from pipeline.prepare import PrepareParams, image_root, read_prepared
from pipeline.prepare import run as prepare
from pipeline.train_head import TrainHeadParams
from pipeline.train_head import run as train_head

from .conftest import REPO, TINY_BACKBONE

TINY = BackboneParams(**TINY_BACKBONE)
FAST = FinetuneParams(blocks=2, epochs=3, batch_size=8, views=2, warmup_epochs=1, threads=2,
                      lr_backbone=1e-3, lr_head=1e-3)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """prepared digits (6 per class), features and a trained head for the tiny backbone."""
    root = tmp_path_factory.mktemp("ft")
    prepare(PrepareParams(source="sklearn-digits", max_images_per_class=6, val_fraction=0.2,
                          test_fraction=0.2), root / "prepared")
    extract_features(TINY, FeaturesParams(batch_size=16, threads=2), root / "prepared",
                     root / "features")
    train_head(TrainHeadParams(epochs=10, threads=2), root / "features",
               root / "head.safetensors", root / "head.json", root / "head_metrics.json",
               root / "head_plots")
    return root


def build_cache(project: Path, params: FinetuneParams, name: str) -> Path:
    out = project / name
    if not out.exists():
        cut_cache.run(TINY, params, project / "prepared", out)
    return out


def finetune(project: Path, params: FinetuneParams, out: Path, cache: Path | None = None,
             **kwargs):
    cache = cache or build_cache(project, params, f"cache_{abs(hash(params))}")
    return run(TINY, params, project / "prepared", cache, project / "head.safetensors",
               project / "head.json", out / "model.safetensors", out / "model.json",
               out / "metrics.json", out / "plots", out / "timing.json", **kwargs)


# --------------------------------------------------------------------------- block split


@pytest.mark.parametrize("blocks", [0, 1, 2, 5, 6, "all"])
def test_trainable_parameters_are_the_last_block_groups(blocks):
    backbone = build_backbone(TINY)
    groups = backbone.block_groups
    split = split_backbone(backbone, blocks)  # also checks suffix(prefix(x)) == backbone(x)
    n = len(groups) if blocks == "all" else blocks
    expected = {name for group in groups[len(groups) - n:] for name in group}
    freeze_all_but_suffix(backbone, split)
    trainable = {name for name, p in backbone.model.named_parameters() if p.requires_grad}
    assert trainable == expected
    assert count_trainable(split.suffix) == sum(
        p.numel() for name, p in backbone.model.named_parameters() if name in expected)
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert torch.allclose(split.suffix(split.prefix(x)), backbone.model(x), atol=1e-5)


def test_too_many_blocks_is_a_clear_error():
    backbone = build_backbone(TINY)
    with pytest.raises(ParamsError, match=r"finetune.blocks is 7 but timm:test_efficientnet has 6"):
        split_backbone(backbone, 7)


def test_blocks_param_accepts_int_or_all_only():
    assert parse_section(FinetuneParams, {"blocks": "all"}, "finetune").blocks == "all"
    with pytest.raises(ParamsError, match="finetune.blocks"):
        parse_section(FinetuneParams, {"blocks": "last"}, "finetune")
    with pytest.raises(ParamsError, match="unknown key finetune.unfreeze"):
        parse_section(FinetuneParams, {"unfreeze": 2}, "finetune")


@pytest.mark.parametrize("train_bn", [False, True])
def test_batchnorm_modes(train_bn):
    backbone = build_backbone(TINY)
    split = split_backbone(backbone, 2)
    freeze_all_but_suffix(backbone, split)
    bns = lambda chain: [m for m in chain.modules()  # noqa: E731
                         if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    before_prefix = [m.running_mean.clone() for m in bns(split.prefix)]
    before_suffix = [m.running_mean.clone() for m in bns(split.suffix)]
    set_bn_modes(split, train_bn)
    assert all(not m.training for m in bns(split.prefix))
    assert all(m.training == train_bn for m in bns(split.suffix))
    split.suffix(split.prefix(torch.randn(4, 3, 160, 160) * 3 + 1)).sum().backward()
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before_prefix, bns(split.prefix)))
    changed = [not torch.equal(a, m.running_mean) for a, m in zip(before_suffix, bns(split.suffix))]
    assert all(changed) if train_bn else not any(changed)


# --------------------------------------------------------------------------- augmentation


def test_augmented_views_are_seeded_per_image_and_view():
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    a = augment(pixels, "light", view_rng(0, 3, 1))
    assert a.shape == pixels.shape and a.dtype == np.uint8
    assert np.array_equal(a, augment(pixels, "light", view_rng(0, 3, 1)))
    assert not np.array_equal(a, augment(pixels, "light", view_rng(0, 3, 2)))
    assert not np.array_equal(a, pixels)
    assert augment(pixels, "none", view_rng(0, 3, 1)) is pixels


# --------------------------------------------------------------------------- cut cache


def test_cut_cache_equals_frozen_prefix_output(project):
    params = dataclasses.replace(FAST, augment="none")
    folder = build_cache(project, params, "cache_plain")
    cache = cut_cache.CutCache(folder)
    assert cache.meta["cached"] and cache.meta["views"] == 1
    backbone = build_backbone(TINY)
    split = split_backbone(backbone, 2)
    summary, classes, rows = read_prepared(project / "prepared")
    root = image_root(project / "prepared", summary)
    for name in ("train", "val", "test"):
        chosen = [r for r in rows if r["split"] == name]
        x = np.stack([view_pixels(root / r["path"], backbone.preprocessing, "none", 0, i, 0)
                      for i, r in enumerate(chosen)])
        with torch.no_grad():
            expected = split.prefix.eval()(torch.from_numpy(x)).numpy()
        stored = cache.array(name)
        stored = stored[:, 0] if name == "train" else stored
        assert stored.shape == expected.shape
        assert np.abs(stored - expected).max() <= 1e-4
        assert cache.labels(name).tolist() == [classes.index(r["label"]) for r in chosen]


def test_cut_cache_keys_match_dvc_yaml():
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["cut_cache"]
    declared = {p.removeprefix("finetune.") for p in stage["params"] if p.startswith("finetune.")}
    assert declared == set(CUT_CACHE_KEYS)
    assert "backbone" in stage["params"]
    assert set(CUT_CACHE_KEYS) <= {f.name for f in dataclasses.fields(FinetuneParams)}


def test_nothing_cached_when_disabled_or_classic(project, tmp_path):
    for params in (dataclasses.replace(FAST, enabled=False),
                   dataclasses.replace(FAST, mode="classic"),
                   dataclasses.replace(FAST, blocks="all")):
        meta = cut_cache.run(TINY, params, project / "prepared", tmp_path / "c")
        assert meta["cached"] is False
        assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["meta.json"]


def test_stale_cache_is_refused(project, tmp_path):
    cache = build_cache(project, FAST, "cache_fast")
    with pytest.raises(PipelineError, match="re-run `pipeline cut-cache`"):
        finetune(project, dataclasses.replace(FAST, blocks=1), tmp_path, cache=cache)
    with pytest.raises(PipelineError, match="finetune.views"):
        finetune(project, dataclasses.replace(FAST, views=3), tmp_path, cache=cache)


# --------------------------------------------------------------------------- training


def test_warm_start_is_the_head_and_outputs_are_complete(project, tmp_path):
    metrics = finetune(project, FAST, tmp_path)
    head_metrics = json.loads((project / "head_metrics.json").read_text())
    # epoch 0 evaluates the train_head head unchanged, on the same val split
    assert metrics["head_only_val_accuracy"] == pytest.approx(head_metrics["val"]["accuracy"])
    assert metrics["val"]["accuracy"] >= metrics["head_only_val_accuracy"]
    assert set(metrics) >= {"val", "test", "best_epoch", "epochs_run"}
    assert set(metrics["test"]) == set(head_metrics["test"])
    assert metrics["mode"] == "cut" and metrics["epochs_run"] == 3
    curve = (tmp_path / "plots" / "training.csv").read_text().splitlines()
    assert curve[0] == "epoch,train_loss,val_loss,val_accuracy,lr" and len(curve) == 5
    model, config = load_model(tmp_path / "model.safetensors", tmp_path / "model.json")
    assert config["classes"] == [str(d) for d in range(10)]
    assert config["cut"]["blocks"] == 2
    assert not (tmp_path / ".model.safetensors.resume.pt").exists()
    # the saved model reproduces the reported test accuracy through the full forward pass
    summary, classes, rows = read_prepared(project / "prepared")
    root = image_root(project / "prepared", summary)
    test = [r for r in rows if r["split"] == "test"]
    pp = build_backbone(TINY).preprocessing
    x = torch.from_numpy(np.stack([view_pixels(root / r["path"], pp, "none", 0, 0, 0)
                                   for r in test]))
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    accuracy = float((pred == np.array([classes.index(r["label"]) for r in test])).mean())
    assert accuracy == pytest.approx(metrics["test"]["accuracy"])


def test_warm_start_is_kept_only_as_a_candidate_when_asked(project, tmp_path):
    # a destructive LR: every trained epoch is worse than the warm start on val
    wreck = dataclasses.replace(FAST, lr_backbone=50.0, lr_head=50.0, warmup_epochs=0,
                                epochs=2, patience=0)
    kept = finetune(project, wreck, tmp_path / "kept")
    assert kept["best_epoch"] == 0
    assert kept["val"]["accuracy"] == pytest.approx(kept["head_only_val_accuracy"])
    # the from-scratch baseline reports the trained network, never the untrained start
    trained = finetune(project, wreck, tmp_path / "trained", warm_start_candidate=False)
    assert trained["best_epoch"] in (1, 2)
    assert trained["head_only_val_accuracy"] == kept["head_only_val_accuracy"]
    assert trained["val"]["accuracy"] < kept["val"]["accuracy"]


def test_disabled_writes_the_head_only_model(project, tmp_path):
    params = dataclasses.replace(FAST, enabled=False)
    metrics = finetune(project, params, tmp_path, cache=tmp_path / "unused")
    head_metrics = json.loads((project / "head_metrics.json").read_text())
    assert metrics["mode"] == "head-only" and metrics["epochs_run"] == 0
    assert metrics["test"]["accuracy"] == pytest.approx(head_metrics["test"]["accuracy"])
    model, _ = load_model(tmp_path / "model.safetensors", tmp_path / "model.json")
    head, _ = load_head(project / "head.safetensors", project / "head.json")
    assert all(torch.equal(a, b) for a, b in zip(model.head.state_dict().values(),
                                                  head.state_dict().values()))


def test_cut_and_classic_paths_train_the_same_model(project, tmp_path):
    params = dataclasses.replace(FAST, augment="none", epochs=2, patience=0)
    cache = build_cache(project, params, "cache_plain")
    cut = finetune(project, params, tmp_path / "cut", cache=cache)
    classic = finetune(project, dataclasses.replace(params, mode="classic"),
                       tmp_path / "classic", cache=tmp_path / "unused")
    assert cut["mode"] == "cut" and classic["mode"] == "classic"
    a, _ = load_model(tmp_path / "cut" / "model.safetensors", tmp_path / "cut" / "model.json")
    b, _ = load_model(tmp_path / "classic" / "model.safetensors",
                      tmp_path / "classic" / "model.json")
    diffs = [float((x - y).abs().max()) for x, y in zip(a.state_dict().values(),
                                                         b.state_dict().values())
             if x.is_floating_point()]
    assert max(diffs) <= 1e-5


def test_interrupted_run_resumes_to_the_same_bytes(project, tmp_path):
    params = dataclasses.replace(FAST, epochs=4, patience=0)
    cache = build_cache(project, params, "cache_fast4")
    whole = finetune(project, params, tmp_path / "whole", cache=cache)

    def stop_after_2(epoch):
        if epoch == 2:
            raise KeyboardInterrupt

    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        finetune(project, params, out, cache=cache, on_epoch_end=stop_after_2)
    assert not (out / "model.safetensors").exists()  # no accepted partial output
    assert (out / ".model.safetensors.resume.pt").exists()
    resumed = finetune(project, params, out, cache=cache)
    assert json.loads((out / "timing.json").read_text())["resumed_from_epoch"] == 3
    assert resumed == whole
    assert (out / "model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "model.safetensors").read_bytes()


def test_head_from_another_backbone_is_refused(project, tmp_path):
    other = json.loads((project / "head.json").read_text())
    other["backbone"]["weights"] = "file:other.safetensors"
    (tmp_path / "head.json").write_text(json.dumps(other))
    with pytest.raises(PipelineError, match=r"head.json was made for backbone weights"):
        run(TINY, FAST, project / "prepared", tmp_path / "c", project / "head.safetensors",
            tmp_path / "head.json", tmp_path / "m.safetensors", tmp_path / "m.json",
            tmp_path / "metrics.json", tmp_path / "plots")
    other = json.loads((project / "head.json").read_text())
    other["backbone"]["preprocessing"]["resize_size"] = 999
    (tmp_path / "head.json").write_text(json.dumps(other))
    with pytest.raises(PipelineError, match=r"backbone preprocessing"):
        run(TINY, FAST, project / "prepared", tmp_path / "c", project / "head.safetensors",
            tmp_path / "head.json", tmp_path / "m.safetensors", tmp_path / "m.json",
            tmp_path / "metrics.json", tmp_path / "plots")
    assert not (tmp_path / "m.safetensors").exists()


# --------------------------------------------------------------------------- sweep and bench


@pytest.mark.slow
def test_sweep_and_bench_write_their_reports(project, tmp_path):
    from pipeline import bench_finetune, sweep
    from pipeline.features import FeaturesParams as FP

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
    from pipeline import noise_check, sweep
    from pipeline.features import FeaturesParams as FP

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
    from click.testing import CliRunner

    from pipeline.cli import main
    from pipeline.features import load_cache
    from pipeline.train_head import fit_head

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
    from pipeline.noise_check import ranking_figures

    table = tmp_path / "train_losses.csv"
    table.write_text("path,label,predicted,p_label,p_predicted,loss\n" +
                     "".join(f"{i}.png,0,0,0.5,0.5,{10 - i}\n" for i in range(10)))
    figures = ranking_figures(table, {"0.png": ("0", "1"), "3.png": ("0", "2")})
    assert figures["ranks"] == [1, 4] and figures["median_rank"] == 2.5
    assert (figures["recall_at_2"], figures["recall_at_4"]) == (0.5, 1.0)
    assert (figures["random_recall_at_2"], figures["random_recall_at_4"]) == (0.2, 0.4)


def test_sweep_recommends_best_val_then_fewest_parameters_then_first_lr():
    from pipeline.sweep import recommend

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
    from pipeline import bench_finetune

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1),
                                torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),
                                torch.nn.Flatten(), torch.nn.Linear(200, 4))
    # 200 outputs x 27, 200 outputs x 9 (one input channel per group), 4 outputs x 200
    assert bench_finetune.forward_macs(model, torch.zeros(1, 3, 5, 5)) == 5400 + 1800 + 800
    assert bench_finetune.forward_macs(model, torch.zeros(2, 3, 5, 5)) == 2 * 8000


def test_sweep_recommends_by_val_then_fewer_parameters():
    from pipeline.sweep import recommend

    rows = [{"blocks": 0, "val_accuracy": 0.90, "test_accuracy": 0.99, "trainable_parameters": 10},
            {"blocks": 1, "val_accuracy": 0.95, "test_accuracy": 0.90, "trainable_parameters": 20},
            {"blocks": 2, "val_accuracy": 0.95, "test_accuracy": 0.97, "trainable_parameters": 30}]
    assert recommend(rows)["blocks"] == 1  # test accuracy never chooses; ties: fewer parameters
    rows[2]["val_accuracy"] = 0.96
    assert recommend(rows)["blocks"] == 2



# --------------------------------------------------------------------------- GPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_cuda_without_a_gpu_is_a_clear_error_before_any_work(project, tmp_path):
    params = dataclasses.replace(FAST, device="cuda")
    with pytest.raises(PipelineError, match="finetune.device is cuda but torch sees no CUDA"):
        finetune(project, params, tmp_path / "out", cache=tmp_path / "missing")
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
def test_gpu_training_matches_cpu_and_reruns_and_resumes_to_the_same_bytes(project, tmp_path):
    params = dataclasses.replace(FAST, augment="none", epochs=3, patience=0)
    cache = build_cache(project, params, "cache_plain")
    cpu = finetune(project, params, tmp_path / "cpu", cache=cache)
    gpu_params = dataclasses.replace(params, device="cuda")
    gpu = finetune(project, gpu_params, tmp_path / "gpu", cache=cache)
    classic = finetune(project, dataclasses.replace(gpu_params, mode="classic"),
                       tmp_path / "classic", cache=tmp_path / "unused")
    models = [load_model(tmp_path / name / "model.safetensors", tmp_path / name / "model.json")[0]
              for name in ("cpu", "gpu", "classic")]
    for other in models[1:]:  # strict FP32 on the GPU: the CPU's model, to float rounding
        diffs = [float((x - y).abs().max()) for x, y in zip(models[0].state_dict().values(),
                                                             other.state_dict().values())
                 if x.is_floating_point()]
        assert max(diffs) <= 1e-4
    assert gpu["test"]["accuracy"] == cpu["test"]["accuracy"] == classic["test"]["accuracy"]
    again = finetune(project, gpu_params, tmp_path / "again", cache=cache)
    assert again == gpu
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == \
        (tmp_path / "gpu" / "model.safetensors").read_bytes()

    def stop_after_1(epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(project, gpu_params, tmp_path / "killed", cache=cache, on_epoch_end=stop_after_1)
    assert finetune(project, gpu_params, tmp_path / "killed", cache=cache) == gpu
    assert (tmp_path / "killed" / "model.safetensors").read_bytes() == \
        (tmp_path / "gpu" / "model.safetensors").read_bytes()
