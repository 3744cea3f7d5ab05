"""Fine-tuning: block split, BN modes, warm start, cut cache, cut == classic, resume, errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import yaml


from pipeline.core.augment import augment, view_rng
from pipeline.core.backbones import build_backbone
from pipeline.core.blocks import set_bn_modes, split_backbone
from pipeline.core.caches import CutCache
from pipeline.core.config import (
    CUT_CACHE_KEYS,
    FinetuneParams,
)
from pipeline.core.dataset import image_root, read_prepared
from pipeline.core.errors import ParamsError, PipelineError
from pipeline.core.heads import load_head
from pipeline.core.model import load_model
from pipeline.core.params import parse_section
from pipeline.stages import cut_cache
from pipeline.stages.finetune import count_trainable, freeze_all_but_suffix, run

from ..conftest import (FAST, REPO, TINY, TINY_BACKBONE, build_cache, finetune,  # noqa: F401
                        original_pixels)

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
    cache = CutCache(folder)
    assert cache.meta["cached"] and cache.meta["views"] == 1
    backbone = build_backbone(TINY)
    split = split_backbone(backbone, 2)
    summary, classes, rows = read_prepared(project / "prepared")
    root = image_root(project / "prepared", summary)
    for name in ("train", "val", "test"):
        chosen = [r for r in rows if r["split"] == name]
        x = np.stack([original_pixels(root / r["path"], backbone.preprocessing)
                      for r in chosen])
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
    x = torch.from_numpy(np.stack([original_pixels(root / r["path"], pp) for r in test]))
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


@pytest.mark.parametrize("augment, views", [("none", 1), ("light", 2)])
def test_cut_and_classic_paths_train_the_same_model(project, tmp_path, augment, views):
    """With augmentation and 2 views, epoch e must use view (e - 1) % K on both paths: a
    classic path that picked another view trains another model."""
    params = dataclasses.replace(FAST, augment=augment, views=views, epochs=2, patience=0,
                                 lr_backbone=3e-3, lr_head=3e-3)
    cache = build_cache(project, params, f"cache_{augment}_{views}")
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
    assert max(diffs) <= 1e-4  # float rounding of two orders of the same arithmetic


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


KILL_MID_EPOCH = """
import dataclasses, json, os, signal, sys
from pipeline.core.config import FinetuneParams
from pipeline.stages import finetune as stage
from tests.conftest import finetune

project, out, cache, params, kill_epoch = sys.argv[1:6]
train_epoch = stage.train_epoch

def train_epoch_then_die(model, source, epoch, order, labels, optimizer, *args, **kwargs):
    if epoch == int(kill_epoch):  # one optimiser step into this epoch, then SIGKILL
        step = optimizer.step

        def step_then_die(*a, **k):
            step(*a, **k)
            os.kill(os.getpid(), signal.SIGKILL)
        optimizer.step = step_then_die
    return train_epoch(model, source, epoch, order, labels, optimizer, *args, **kwargs)

stage.train_epoch = train_epoch_then_die
from pathlib import Path
finetune(Path(project), FinetuneParams(**json.loads(params)), Path(out), cache=Path(cache))
"""


def test_sigkill_mid_epoch_leaves_no_output_and_resumes_to_the_same_bytes(project, tmp_path):
    """A real SIGKILL in the middle of epoch 3 (a separate process, killed after one optimiser
    step): no model is written, the resume state is epoch 2's, and the resumed run gives the
    bytes of an uninterrupted one."""
    import subprocess
    import sys

    params = dataclasses.replace(FAST, epochs=4, patience=0)
    cache = build_cache(project, params, "cache_fast4")
    whole = finetune(project, params, tmp_path / "whole", cache=cache)
    out = tmp_path / "killed"
    child = subprocess.run([sys.executable, "-c", KILL_MID_EPOCH, str(project), str(out),
                            str(cache), json.dumps(dataclasses.asdict(params)), "3"],
                           cwd=REPO, capture_output=True, text=True)
    assert child.returncode == -9, child.stderr[-2000:]
    assert "epoch 2/4" in child.stdout and "epoch 3/4" not in child.stdout
    assert not (out / "model.safetensors").exists() and not (out / "model.json").exists()
    state = torch.load(out / ".model.safetensors.resume.pt", weights_only=True)
    assert state["epoch"] == 2
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


def test_each_epoch_trains_on_its_own_cached_view():
    """Epoch 1 uses view 0, epoch 2 view 1, ... and after the last view the first again: the
    schedule both paths share, pinned here (comparing the paths cannot see a shift in both)."""
    from pipeline.core.augment import view_of_epoch
    from pipeline.stages.finetune import CutSource

    assert [view_of_epoch(e, 3) for e in range(1, 8)] == [0, 1, 2, 0, 1, 2, 0]
    assert [view_of_epoch(e, 1) for e in (1, 2, 3)] == [0, 0, 0]

    class Cache:  # two images x three views, each view filled with its own number
        def array(self, name):
            return np.stack([np.full((2, 1, 1), v, np.float32) for v in range(3)], axis=1)

        def labels(self, name):
            return np.array([0, 1])

    source = CutSource(Cache())
    for epoch, view in ((1, 0), (2, 1), (3, 2), (4, 0)):
        (batch,) = source.train_batches(epoch, [[0, 1]])
        assert torch.all(batch == view), (epoch, view)


def test_the_cut_cache_records_the_keys_that_decide_its_bytes(project, tmp_path):
    """batch_size is part of the key (onnxruntime's sums depend on it), threads are recorded
    as the count used; another thread count still reads the cache (rounding only)."""
    from pipeline.core.caches import cache_params
    from pipeline.core.runtime import available_cpus

    cache = build_cache(project, FAST, "cache_fast")
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["params"]["batch_size"] == FAST.batch_size and meta["params"]["threads"] == 2
    assert cache_params(dataclasses.replace(FAST, threads=0))["threads"] == available_cpus()
    with pytest.raises(PipelineError, match="finetune.batch_size = 8, but params say 4"):
        finetune(project, dataclasses.replace(FAST, batch_size=4), tmp_path, cache=cache)
    CutCache(cache).check_matches(*_split_for(FAST), dataclasses.replace(FAST, threads=1),
                                  meta["manifest_sha256"])


def _split_for(params):
    backbone = build_backbone(TINY)
    return backbone, split_backbone(backbone, params.blocks)
