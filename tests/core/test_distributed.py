"""torchrun: 2 CPU processes with gloo give the single-process features and fine-tuned model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from pipeline.core.config import LauncherParams
from pipeline.core.distributed import relaunch, torchrun_command
from pipeline.core.errors import ParamsError
from pipeline.core.params import parse_section

from ..conftest import TINY_BACKBONE

# the stated tolerance of 2 processes versus 1 (same machine): fine-tuned weights within 1e-5
# (only the float summation order of the gradient all-reduce differs), metrics equal
WEIGHT_TOLERANCE = 1e-5


def test_launcher_params_and_torchrun_command():
    single = LauncherParams()
    assert not single.distributed and relaunch(single, ["features"]) is None
    cmd = torchrun_command(LauncherParams(nproc_per_node=2), ["features", "--out", "x"])
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--standalone" in cmd
    assert "--nproc-per-node=2" in cmd and cmd[-4:] == ["pipeline", "features", "--out", "x"]
    multi = torchrun_command(LauncherParams(nproc_per_node=8, nnodes=4,
                                            rdzv_endpoint="head:29400"), ["finetune"])
    assert "--nnodes=4" in multi and "--rdzv-endpoint=head:29400" in multi
    assert "--standalone" not in multi
    with pytest.raises(ParamsError, match="launcher.rdzv_endpoint must be host:port"):
        parse_section(LauncherParams, {"nnodes": 2}, "launcher")
    with pytest.raises(ParamsError, match="launcher.backend must be one of"):
        parse_section(LauncherParams, {"backend": "mpi"}, "launcher")


def _pipeline(args, cwd, env):
    result = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path, cli_env):
    params = {
        "prepare": {"source": "sklearn-digits", "max_images_per_class": 7, "val_fraction": 0.2,
                    "test_fraction": 0.2},
        "backbone": TINY_BACKBONE,
        "features": {"batch_size": 8, "threads": 1},
        "train_head": {"epochs": 10, "threads": 1},
        "finetune": {"blocks": 2, "views": 2, "epochs": 3, "warmup_epochs": 1, "batch_size": 8,
                     "threads": 1},
    }
    one, two = dict(params, launcher={"nproc_per_node": 1}), dict(params, launcher={
        "nproc_per_node": 2})
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(one))
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(two))
    _pipeline(["prepare", "--params", "one.yaml"], tmp_path, cli_env)
    for name in ("one", "two"):  # the launcher param decides: `pipeline features` -> torchrun
        out = _pipeline(["features", "--params", f"{name}.yaml", "--out", f"f_{name}",
                         "--metrics", f"fh_{name}.json", "--report", f"f_{name}.json"], tmp_path,
                        cli_env)
        assert f"{1 if name == 'one' else 2} process(es)" in out
    for part in ("features.npy", "labels.npy", "splits.npy", "meta.json"):
        assert (tmp_path / "f_one" / part).read_bytes() == (tmp_path / "f_two" / part).read_bytes()
    assert json.loads((tmp_path / "f_two.json").read_text())["world_size"] == 2
    _pipeline(["train-head", "--params", "one.yaml", "--features", "f_one"], tmp_path, cli_env)
    _pipeline(["cut-cache", "--params", "one.yaml"], tmp_path, cli_env)
    for name in ("one", "two"):
        _pipeline(["finetune", "--params", f"{name}.yaml", "--model", f"m_{name}.safetensors",
                   "--config", f"m_{name}.json", "--metrics", f"fth_{name}.json",
                   "--report", f"ft_{name}.json", "--timing",
                   f"t_{name}.json", "--plots", f"p_{name}"], tmp_path, cli_env)
    assert json.loads((tmp_path / "t_two.json").read_text())["world_size"] == 2
    a = load_file(str(tmp_path / "m_one.safetensors"))
    b = load_file(str(tmp_path / "m_two.safetensors"))
    assert a.keys() == b.keys()
    diff = max(float(np.abs(a[k] - b[k]).max()) for k in a if a[k].dtype.kind == "f")
    assert diff <= WEIGHT_TOLERANCE
    m1 = json.loads((tmp_path / "ft_one.json").read_text())
    m2 = json.loads((tmp_path / "ft_two.json").read_text())
    assert m1 == m2
    assert not list(tmp_path.glob("*.resume.pt")) and not list(tmp_path.glob(".*.tmp"))
    # bench-scaling runs the same two launches on this project and reports what they did
    out = _pipeline(["bench-scaling", "--params", "one.yaml", "--procs", "1,2", "--epochs", "1",
                     "--out", "scaling.json"], tmp_path, cli_env)
    report = json.loads((tmp_path / "scaling.json").read_text())
    rows = report["results"]
    assert [r["processes"] for r in rows] == [1, 2] and "2 process(es)" in out
    assert report["images"] == len((tmp_path / "data" / "prepared" / "manifest.csv")
                                   .read_text().splitlines()) - 1
    assert all(r["features_identical_to_first"] for r in rows)
    assert rows[0]["finetune_max_weight_diff_vs_first"] == 0.0
    assert rows[1]["finetune_max_weight_diff_vs_first"] <= WEIGHT_TOLERANCE
    assert rows[0]["finetune_val_accuracy"] == rows[1]["finetune_val_accuracy"]
    for r in rows:
        speedup = rows[0]["features_seconds"] / r["features_seconds"]
        assert r["features_speedup"] == round(speedup, 3)
        assert r["features_efficiency"] == round(speedup / r["processes"], 3)
        assert r["features_images_per_s"] == round(report["images"] / r["features_seconds"], 2)


def test_torchrun_relaunch_forwards_the_command_line_as_given(monkeypatch):
    """A stage under launcher.nproc_per_node > 1 re-runs exactly its own command line."""
    import subprocess
    import sys

    from pipeline.core import distributed
    from pipeline.core.config import LauncherParams

    seen = []
    monkeypatch.setattr(sys, "argv", ["pipeline", "finetune", "--params", "p.yaml",
                                      "--model", "elsewhere.safetensors"])
    monkeypatch.setattr(distributed, "under_torchrun", lambda: False)
    monkeypatch.setattr(subprocess, "call", lambda cmd: seen.append(cmd) or 0)
    assert distributed.relaunch(LauncherParams(nproc_per_node=2)) == 0
    assert seen[0][-7:] == ["-m", "pipeline", "finetune", "--params", "p.yaml", "--model",
                            "elsewhere.safetensors"] and "--nproc-per-node=2" in seen[0]
