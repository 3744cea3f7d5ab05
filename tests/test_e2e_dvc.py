"""End to end: the real `dvc repro` chain on a tiny params set (real embedded backbone)."""

import json
import re

import pytest

from .conftest import copy_project, sh

TINY_PARAMS = """\
prepare:
  source: sklearn-digits
  path: data/images  # dvc.yaml tracks this folder as a dependency
  max_images_per_class: 20
  val_fraction: 0.2
  test_fraction: 0.2
backbone:
  name: efficientnet_lite0
  weights: default
launcher:
  nproc_per_node: 1
features:
  batch_size: 16
  threads: 2
train_head:
  epochs: 20
  lr: 3.0e-3
  threads: 2
finetune:  # dvc.yaml tracks the cut_cache keys one by one: they must all be present
  enabled: true
  blocks: 1
  mode: cut
  views: 2
  augment: light
  cache_dtype: float32
  seed: 0
  epochs: 2
  warmup_epochs: 1
  batch_size: 16
  threads: 2
export:
  variants: [int8]
  calibration_images: 16
  # a 2-epoch model on 120 images has small margins: INT8 flips more of its 40 test images
  # than the 1-point limit that the full default data meets (metrics/export.json)
  int8_max_accuracy_drop: 0.3
  threads: 2
interpret:
  splits: [test, train]
  top_losses: 4
  threads: 2
advise:  # the auto stage's params (nothing is auto here: it only says so)
  verify: 0
bench:
  providers: [cpu, cuda]
  variants: [fp32, int8]
  batch_sizes: [1, 4]
  iterations: 5
  time_budget_s: 0.5
  warmup: 1
  paired_rounds: 2
  paired_block_s: 0.1
  threads: 2
"""


def dvc_project(root, params: str, env) -> None:
    """This project's dvc.yaml and package in ``root`` with ``params``, as a git + DVC repo."""
    copy_project(root)
    (root / "params.yaml").write_text(params)
    sh(["git", "init", "-q"], root, env)
    sh(["dvc", "init", "-q"], root, env)
    sh(["dvc", "config", "core.analytics", "false"], root, env)


def finetuned_test_accuracy(root):
    return json.loads((root / "reports" / "finetune.json").read_text())["test"]["accuracy"]



@pytest.mark.slow
def test_dvc_repro_chain_is_reproducible(tmp_path, cli_env):
    dvc_project(tmp_path, TINY_PARAMS, cli_env)
    sh(["dvc", "repro"], tmp_path, cli_env)

    metrics = json.loads((tmp_path / "reports" / "head.json").read_text())
    assert metrics["test"]["num_samples"] == 40  # 10 digits x 4 test images
    assert metrics["test"]["accuracy"] > 0.5  # 12 training images per class; chance is 0.1
    features = (tmp_path / "data" / "features" / "features.npy").read_bytes()
    assert (tmp_path / "models" / "head.safetensors").is_file()
    finetuned = json.loads((tmp_path / "reports" / "finetune.json").read_text())
    assert finetuned["mode"] == "cut" and finetuned["blocks"] == 1
    assert finetuned["val"]["accuracy"] >= finetuned["head_only_val_accuracy"]
    model_bytes = (tmp_path / "models" / "model.safetensors").read_bytes()
    exported = json.loads((tmp_path / "reports" / "export.json").read_text())
    assert exported["variants"]["fp32"]["passed"] and exported["variants"]["int8"]["passed"]
    assert (tmp_path / "models" / "model.onnx").is_file()
    calibration = exported["calibration"]
    applied = calibration["fit"]["applied"]
    assert calibration["method"] == ("temperature" if applied else "none")
    assert (calibration["temperature"] == 1.0) != applied
    # held out: calibration never makes the test split worse (the export's own guard uses val)
    assert calibration["test"]["after"]["nll"] <= calibration["test"]["before"]["nll"]
    assert calibration["test"]["after"]["ece"] <= calibration["test"]["before"]["ece"]
    assert (tmp_path / "models" / "model.onnx.json").is_file()
    assert (tmp_path / "plots" / "calibration" / "calibrated.csv").is_file()
    interpreted = json.loads((tmp_path / "reports" / "interpret.json").read_text())
    assert interpreted["splits"]["test"]["accuracy"] == exported["variants"]["fp32"]["test_accuracy"]
    assert interpreted["splits"]["train"]["images"] == 120  # 10 digits x 12 training images
    assert (tmp_path / "reports" / "interpret" / "train_top_losses.png").is_file()
    card = (tmp_path / "reports" / "model_card.md").read_text()
    assert f"Test: {finetuned_test_accuracy(tmp_path):.4f} (" in card and "## Speed" in card
    assert (tmp_path / "models" / "variants" / "model.int8.onnx").is_file()
    bench = json.loads((tmp_path / "reports" / "bench.json").read_text())
    by_status = {(r["engine"], r["provider"], r["variant"], r["batch_size"]): r["status"]
                 for r in bench["rows"]}
    assert by_status[("onnxruntime", "cpu", "fp32", 4)] == "ok"
    assert by_status[("onnxruntime", "cpu", "int8", 1)] == "ok"
    assert by_status[("pytorch", "cpu", "fp32 eager", 1)] == "ok"
    assert (tmp_path / "reports" / "bench.png").is_file()
    assert "| onnxruntime | cpu | fp32 | 4 | ok |" in (tmp_path / "reports" / "bench.md").read_text()
    assert "Test confusion matrix" in (tmp_path / "dvc.yaml").read_text()
    plots = json.loads(sh(["dvc", "plots", "show", "--json"], tmp_path, cli_env))
    (reliability,) = [v for k, v in plots["data"].items() if k.startswith("Reliability on test")]
    rendered = json.dumps(reliability)  # the vega spec carries the points of both CSVs
    assert "calibrated.csv" in rendered and '"confidence"' in rendered

    # the DVC metrics are the headline figures of the full reports
    headline = {s: json.loads((tmp_path / "metrics" / f"{s}.json").read_text())
                for s in ("features", "head", "finetune", "export", "interpret", "bench")}
    assert headline["head"]["test_acc"] == metrics["test"]["accuracy"]
    assert headline["finetune"]["test_f1"] == finetuned["test"]["macro_f1"]
    assert headline["export"]["int8_drop"] == pytest.approx(
        exported["variants"]["fp32"]["test_accuracy"] - exported["variants"]["int8"]["test_accuracy"])
    assert headline["interpret"]["errors"] == interpreted["splits"]["test"]["errors"]
    fp32 = max(r["accuracy"] for r in bench["rows"] if r["status"] == "ok"
               and (r["provider"], r["variant"]) == ("cpu", "fp32"))
    assert headline["bench"]["img_s"] == max(
        r["throughput_ips"] for r in bench["rows"] if r["status"] == "ok"
        and r["engine"] == "onnxruntime" and r["accuracy"] >= fp32 - 0.01)
    table = sh(["dvc", "metrics", "show"], tmp_path, cli_env)
    assert max(len(line) for line in table.splitlines()) <= 120, table
    assert "metrics/finetune.json" in table and "test_acc" in table

    second = sh(["dvc", "repro"], tmp_path, cli_env)
    # nothing changed: only the always-checked machine fingerprint runs, and it finds this
    # machine, so bench (which depends on it) does not re-run
    assert re.findall(r"Running stage '(\w+)'", second) == ["machine"], second
    assert "Stage 'bench' didn't change" in second

    onnx_bytes = (tmp_path / "models" / "model.onnx").read_bytes()
    head_bytes = (tmp_path / "models" / "head.safetensors").read_bytes()
    # every ONNX export done again (no export cache): "the same bytes wherever it is built"
    sh(["dvc", "repro", "--force"], tmp_path, dict(cli_env, PIPELINE_EXPORT_CACHE="off"))
    assert (tmp_path / "data" / "features" / "features.npy").read_bytes() == features
    assert json.loads((tmp_path / "reports" / "head.json").read_text()) == metrics
    assert (tmp_path / "models" / "head.safetensors").read_bytes() == head_bytes
    assert (tmp_path / "models" / "model.safetensors").read_bytes() == model_bytes
    assert (tmp_path / "models" / "model.onnx").read_bytes() == onnx_bytes
    assert json.loads((tmp_path / "reports" / "finetune.json").read_text()) == finetuned
    assert json.loads((tmp_path / "reports" / "export.json").read_text())["calibration"] == \
        calibration

    # a change to a stage's own code re-runs that stage (and only what follows it)
    card_module = tmp_path / "pipeline" / "stages" / "card.py"
    card_module.write_text(card_module.read_text() + "\n# changed\n")
    changed = sh(["dvc", "repro"], tmp_path, cli_env)
    assert "Running stage 'card'" in changed and "Running stage 'bench'" not in changed

    # a params change re-runs only what depends on it
    (tmp_path / "params.yaml").write_text(TINY_PARAMS.replace("epochs: 20", "epochs: 10"))
    third = sh(["dvc", "repro"], tmp_path, cli_env)
    assert "Running stage 'train_head'" in third and "Running stage 'features'" not in third
    assert "Running stage 'cut_cache'" not in third and "Running stage 'finetune'" in third

    # fine-tuning epochs re-run only finetune; the cut point rebuilds the cut cache
    params = TINY_PARAMS.replace("epochs: 20", "epochs: 10")
    (tmp_path / "params.yaml").write_text(params.replace("epochs: 2\n", "epochs: 1\n"))
    fourth = sh(["dvc", "repro"], tmp_path, cli_env)
    assert "Running stage 'finetune'" in fourth and "Running stage 'cut_cache'" not in fourth
    assert "Running stage 'train_head'" not in fourth
    (tmp_path / "params.yaml").write_text(params.replace("blocks: 1", "blocks: 2"))
    fifth = sh(["dvc", "repro"], tmp_path, cli_env)
    assert "Running stage 'cut_cache'" in fifth and "Running stage 'finetune'" in fifth
    assert json.loads((tmp_path / "reports" / "finetune.json").read_text())["blocks"] == 2


AUTO_PARAMS = """\
prepare:
  source: sklearn-digits
  path: data/images
  max_images_per_class: 8
  val_fraction: 0.25
  test_fraction: 0.25
backbone:
  name: timm:test_efficientnet
  weights: none
  layer: auto
launcher:
  nproc_per_node: 1
features:
  batch_size: 16
  threads: 2
train_head:
  epochs: 5
  threads: 2
finetune:
  enabled: true
  blocks: auto
  mode: cut
  views: 1
  augment: light
  cache_dtype: float32
  seed: 0
  epochs: 2
  warmup_epochs: 0
  batch_size: 8
  threads: 2
  lr_backbone: auto
  lr_head: auto
advise:
  verify: 2
  rung_epochs: 1
  bootstrap: 50
  threads: 2
  workers: 0
"""


@pytest.mark.slow
def test_auto_params_take_the_verified_choice_inside_dvc_repro(tmp_path, cli_env):
    dvc_project(tmp_path, AUTO_PARAMS, cli_env)
    first = sh(["dvc", "repro", "finetune"], tmp_path, cli_env)

    choice = json.loads((tmp_path / "data" / "auto" / "choice.json").read_text())
    values = choice["values"]
    assert choice["requested"] and choice["backbone"] == "timm:test_efficientnet"
    report = json.loads((tmp_path / "data" / "auto" / "report.json").read_text())
    assert report["auto"]["keys"] == ["backbone.layer", "finetune.blocks",
                                      "finetune.lr_backbone", "finetune.lr_head"]
    assert [c["backbone"] for c in report["candidates"]] == ["timm:test_efficientnet"]
    assert report["verified"]["chosen"]["layer"] == values["backbone.layer"]
    # the features stage copied the auto stage's cache instead of running the backbone
    assert json.loads((tmp_path / "reports" / "features.json").read_text())["reused"] == \
        "data/auto/features"
    assert "features: reused the auto stage's cache" in first
    model = json.loads((tmp_path / "models" / "model.json").read_text())
    assert model["backbone"].get("layer", "last") == values["backbone.layer"]
    tuned = json.loads((tmp_path / "reports" / "finetune.json").read_text())
    assert tuned["enabled"] is values["finetune.enabled"]
    if values["finetune.enabled"]:
        assert tuned["blocks"] == values["finetune.blocks"]
        assert model["params"]["lr_backbone"] == values["finetune.lr_backbone"]
        assert "cut_cache: reused the auto stage's cache" in first
    else:
        assert tuned["mode"] == "head-only"
    # nothing changed: nothing runs again (the auto stage is not re-run for nothing)
    again = sh(["dvc", "repro", "finetune"], tmp_path, cli_env)
    assert re.findall(r"Running stage '(\w+)'", again) == [], again
