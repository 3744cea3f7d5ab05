import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from pipeline.cli import main

from .conftest import TINY_BACKBONE


@pytest.mark.parametrize("command", [[]] + [[name] for name in sorted(main.commands)])
def test_help(command):
    """Every command the CLI has (taken from the group itself) prints its help."""
    result = CliRunner().invoke(main, command + ["--help"])
    assert result.exit_code == 0 and "Usage:" in result.output
    assert f"Usage: main {' '.join(command)}".rstrip() in result.output


def test_python_dash_m(cli_env):
    result = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True,
                            text=True, env=cli_env, check=True)
    assert "train-head" in result.stdout


def test_backbones_describe_and_unknown():
    runner = CliRunner()
    result = runner.invoke(main, ["backbones", "timm:test_efficientnet", "--weights", "none"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["feature_dim"] == 256 and info["preprocessing"]["input_size"] == 160
    result = runner.invoke(main, ["backbones", "nonsense"])
    assert result.exit_code == 1 and "unknown backbone 'nonsense'" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("value, message", [("3e-4,0", "--lr-backbone values must be > 0"),
                                            ("3e-4,fast", "'fast' is not a valid float")])
def test_sweep_rejects_bad_lr_backbone_before_any_work(tmp_path, value, message):
    result = CliRunner().invoke(main, ["sweep", "--lr-backbone", value, "--out",
                                       str(tmp_path / "sweep")])
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output and not (tmp_path / "sweep").exists()


def test_cli_chain_and_bench(image_folder, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(
        f"prepare:\n  source: folder\n  path: {image_folder}\n"
        f"backbone:\n  name: {TINY_BACKBONE['name']}\n  weights: none\n"
        "features:\n  batch_size: 4\n"
        "train_head:\n  epochs: 5\n")
    runner = CliRunner()
    p = ["--params", str(params)]
    prepared, feats = str(tmp_path / "prepared"), str(tmp_path / "features")
    for args in (["prepare", *p, "--out", prepared],
                 ["features", *p, "--prepared", prepared, "--out", feats,
                  "--metrics", str(tmp_path / "fm.json"), "--report", str(tmp_path / "fr.json")],
                 ["train-head", *p, "--features", feats, "--model", str(tmp_path / "h.safetensors"),
                  "--config", str(tmp_path / "h.json"), "--metrics", str(tmp_path / "hm.json"),
                  "--report", str(tmp_path / "hr.json"), "--plots", str(tmp_path / "plots")],
                 ["bench-features", *p, "--prepared", prepared, "--images", "8", "--repeats", "1",
                  "--out", str(tmp_path / "bench.json")]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, (args[0], result.output)
    report = json.loads((tmp_path / "hr.json").read_text())
    headline = json.loads((tmp_path / "hm.json").read_text())
    # the DVC metrics file holds only the headline figures, taken from the full report
    assert set(headline) == {"val_acc", "test_acc", "test_f1", "val_loss"}
    assert headline["test_acc"] == report["test"]["accuracy"]
    assert headline["test_f1"] == report["test"]["macro_f1"]
    assert headline["val_acc"] == report["val"]["accuracy"] and headline["val_loss"] > 0
    assert json.loads((tmp_path / "fm.json").read_text()) == {
        "img_s": json.loads((tmp_path / "fr.json").read_text())["images_per_second_backbone"]}
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["images"] == 8 and bench["batch_size"] == 4
    fe = bench["feature_extraction"]
    assert fe["torch_eager_images_per_s"] > 0 and fe["onnxruntime_images_per_s"] > 0
    assert fe["max_abs_diff"] <= 1e-4
    assert bench["head_epoch"]["cached_features_ms"] > 0
