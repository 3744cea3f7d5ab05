import csv
import json

import numpy as np
import pytest
from safetensors.torch import load_file

from pipeline.core.atomic import write_json
from pipeline.core.config import TrainHeadParams
from pipeline.core.errors import PipelineError
from pipeline.core.heads import load_head
from pipeline.core.training import class_weights, lr_factor
from pipeline.stages.train_head import fit_head, run


def synthetic_cache(path, n_per_class=(40, 40, 10), dim=16, seed=0, noise=1.0):
    """A feature cache like the features stage writes: 3 Gaussian blobs, imbalanced."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, size=(len(n_per_class), dim))
    feats, labels, splits = [], [], []
    for c, n in enumerate(n_per_class):
        x = centers[c] + noise * rng.normal(size=(n, dim))
        feats.append(x)
        labels += [c] * n
        cut_test, cut_val = max(1, n // 5), max(1, n // 5)
        splits += [2] * cut_test + [1] * cut_val + [0] * (n - cut_test - cut_val)
    path.mkdir(parents=True)
    feats = np.concatenate(feats).astype(np.float32)
    np.save(path / "features.npy", feats)
    np.save(path / "labels.npy", np.array(labels, dtype=np.int64))
    np.save(path / "splits.npy", np.array(splits, dtype=np.int8))
    write_json(path / "meta.json", {
        "format": 1, "feature_shape": list(feats.shape), "classes": ["a", "b", "c"],
        "backbone": {"name": "test"}, "manifest_sha256": "x"})
    return path


def run_to(tmp_path, params, name="out"):
    out = tmp_path / name
    metrics = run(params, tmp_path / "features", out / "head.safetensors", out / "head.json",
                  out / "metrics.json", out / "plots")
    return out, metrics


def test_trains_separable_data_and_writes_everything(tmp_path):
    synthetic_cache(tmp_path / "features")
    out, metrics = run_to(tmp_path, TrainHeadParams(epochs=60, lr=1e-2))
    assert metrics["test"]["accuracy"] >= 0.9 and metrics["val"]["accuracy"] >= 0.9
    assert set(metrics["test"]["per_class"]) == {"a", "b", "c"}
    assert set(metrics["test"]["per_class"]["c"]) == {"precision", "recall", "f1", "support"}
    assert json.loads((out / "metrics.json").read_text()) == metrics
    head, config = load_head(out / "head.safetensors", out / "head.json")
    assert config["classes"] == ["a", "b", "c"] and config["head"]["kind"] == "linear"
    assert set(load_file(str(out / "head.safetensors"))) >= {"feature_mean", "feature_std"}
    with open(out / "plots" / "training.csv") as handle:
        curve = list(csv.DictReader(handle))
    assert len(curve) == metrics["epochs_run"] and float(curve[-1]["val_loss"]) > 0
    with open(out / "plots" / "confusion.csv") as handle:
        assert len(list(csv.DictReader(handle))) == metrics["test"]["num_samples"]


def test_same_seed_same_metrics_and_bytes(tmp_path):
    synthetic_cache(tmp_path / "features", noise=2.5)
    a, ma = run_to(tmp_path, TrainHeadParams(epochs=15, head="mlp", dropout=0.3), "a")
    b, mb = run_to(tmp_path, TrainHeadParams(epochs=15, head="mlp", dropout=0.3), "b")
    assert ma == mb
    assert (a / "head.safetensors").read_bytes() == (b / "head.safetensors").read_bytes()
    c, _ = run_to(tmp_path, TrainHeadParams(epochs=15, head="mlp", dropout=0.3, seed=1), "c")
    assert (a / "head.safetensors").read_bytes() != (c / "head.safetensors").read_bytes()


def test_early_stopping_stops(tmp_path):
    synthetic_cache(tmp_path / "features", noise=4.0)
    _, metrics = run_to(tmp_path, TrainHeadParams(epochs=300, patience=3, lr=0.05))
    assert metrics["epochs_run"] < 300 and metrics["best_epoch"] <= metrics["epochs_run"]


def test_class_weights_balanced():
    w = class_weights(np.array([0, 0, 0, 1]), 3)
    assert w.tolist() == pytest.approx([4 / 6, 2.0, 0.0])


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(99, 100, 10, "cosine") < 0.01
    assert lr_factor(50, 100, 10, "constant") == 1.0


def test_label_smoothing_and_weighting_change_training():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    base = fit_head(x, y, x, y, 2, TrainHeadParams(epochs=5))
    smooth = fit_head(x, y, x, y, 2, TrainHeadParams(epochs=5, label_smoothing=0.2))
    assert base.history[-1]["train_loss"] != smooth.history[-1]["train_loss"]


def test_missing_cache_is_clear(tmp_path):
    with pytest.raises(PipelineError, match="run `pipeline features` first"):
        run_to(tmp_path, TrainHeadParams())


def _blobs(n: int = 400, dim: int = 16, seed: int = 0):
    """Three overlapping Gaussian classes: a linear head can learn them, but not perfectly."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    centres = rng.normal(0, 0.5, (3, dim))
    return (centres[y] + rng.normal(0, 1, (n, dim))).astype(np.float32), y.astype(np.int64)


def test_lr_range_test_grows_the_lr_stops_on_divergence_and_suggests_inside_the_range():
    from pipeline.tools.lr_find import range_test, suggestions

    x, y = _blobs()
    params = TrainHeadParams(batch_size=32, threads=1)
    curve = range_test(x, y, 3, params, 1e-5, 1e4, 150)
    lrs, smoothed = np.array(curve["lr"]), np.array(curve["smoothed_loss"])
    assert lrs[0] == pytest.approx(1e-5) and np.allclose(lrs[1:] / lrs[:-1], 1e9 ** (1 / 149))
    assert smoothed[0] == pytest.approx(curve["loss"][0])  # bias-corrected moving average
    # the loss falls, then blows up before 1e4: the test stops once it is 4x its minimum
    lowest = int(np.argmin(smoothed))
    assert 0 < lowest < len(lrs) - 1 and smoothed[lowest] < 0.7 * smoothed[0]
    assert len(lrs) < 150 and smoothed[-1] > 4 * smoothed[lowest] >= smoothed[-2]
    found = suggestions(curve)
    assert found["minimum_over_10"] == pytest.approx(lrs[lowest] / 10)
    assert lrs[0] <= found["steepest"] <= lrs[lowest]  # the steepest fall is before the minimum
    assert range_test(x, y, 3, params, 1e-5, 1e4, 150) == curve  # seeded: the same curve


def test_a_diverging_head_lr_is_a_one_line_error():
    x, y = _blobs()
    with pytest.raises(PipelineError, match="lower train_head.lr"):
        fit_head(x, y, x, y, 3, TrainHeadParams(lr=1e30, epochs=2, warmup_epochs=0, threads=1))
