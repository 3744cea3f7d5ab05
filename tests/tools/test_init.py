"""`pipeline init`: a user project that runs the chain through the installed tool."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.core.config import SECTIONS, load_params
from pipeline.core.fingerprint import PACKAGE_ROOT, stage_fingerprint, write_fingerprints
from pipeline.core.stage_table import MODULE_STAGES as STAGES
from pipeline.core.stage_table import render_dvc_yaml

from ..conftest import TINY_BACKBONE, make_image, sh

REPO = Path(__file__).resolve().parents[2]


def image_classes(root: Path, classes: int = 3, per_class: int = 8) -> Path:
    for c in range(classes):
        for i in range(per_class):
            make_image(root / f"class{c}" / f"{i}.png", seed=100 * c + i)
    return root


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_template_runs_the_same_stages_as_this_repository():
    """The user-project dvc.yaml differs from this repo's only in how code is depended on."""
    repo = yaml.safe_load((REPO / "dvc.yaml").read_text())
    template = yaml.safe_load(render_dvc_yaml(project=True))
    assert set(template["stages"]) == set(repo["stages"]) | {"code"}
    for name, stage in repo["stages"].items():
        mine = template["stages"][name]
        assert sorted(mine["deps"]) == sorted([f".pipeline/code/{name}.sha256"] + [
            d for d in stage["deps"] if not str(d).startswith("pipeline/")])
        assert {k: v for k, v in mine.items() if k != "deps"} == \
            {k: v for k, v in stage.items() if k != "deps"}
    assert template["plots"] == repo["plots"]


def test_init_writes_a_project_whose_params_are_the_defaults(tmp_path):
    images = image_classes(tmp_path / "photos")
    result = invoke("init", str(tmp_path / "proj"), "--images", str(images), "--backbone",
                    "timm:test_efficientnet")
    assert result.exit_code == 0, result.output
    proj = tmp_path / "proj"
    for name in ("dvc.yaml", "params.yaml", "data/images/README.md", ".gitignore",
                 ".dvcignore", ".git", ".dvc", ".pipeline/code/card.sha256"):
        assert (proj / name).exists(), name
    assert "ran git init" in result.output and "ran dvc init" in result.output
    parsed = load_params(proj / "params.yaml")
    for name, cls in SECTIONS.items():
        expected = cls()
        if name == "prepare":
            expected = dataclasses.replace(expected, source="folder", path=str(images.resolve()))
        if name == "backbone":
            expected = dataclasses.replace(expected, name="timm:test_efficientnet")
        assert parsed[name] == expected, name


def test_init_refuses_to_overwrite_and_force_does(tmp_path):
    (tmp_path / "params.yaml").write_text("mine: 1\n")
    (tmp_path / ".gitignore").write_text("my-secret\n")
    result = invoke("init", str(tmp_path))
    assert result.exit_code == 1 and "params.yaml already exist" in result.output
    assert "--force" in result.output and not (tmp_path / "dvc.yaml").exists()
    assert (tmp_path / "params.yaml").read_text() == "mine: 1\n"
    result = invoke("init", str(tmp_path), "--force")
    assert result.exit_code == 0, result.output
    assert "prepare:" in (tmp_path / "params.yaml").read_text()
    assert (tmp_path / ".gitignore").read_text().startswith("my-secret\n")  # kept, appended


def test_init_inside_an_existing_git_and_dvc_repository(tmp_path, cli_env):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, check=True, env=cli_env)
    result = invoke("init", str(tmp_path / "sub"))
    assert result.exit_code == 0, result.output
    assert "kept the existing git repository" in result.output
    assert "kept the existing dvc repository" in result.output
    assert not (tmp_path / "sub" / ".git").exists() and not (tmp_path / "sub" / ".dvc").exists()


@pytest.mark.parametrize("layout, message", [
    ("missing", "--images: folder not found"),
    ("flat", "has no class subfolders with images"),
    ("one", "has one class (only); a classifier needs at least two"),
])
def test_init_rejects_bad_image_folders_before_writing(tmp_path, layout, message):
    images = tmp_path / "photos"
    if layout == "flat":
        make_image(images / "a.png", seed=1)
    if layout == "one":
        make_image(images / "only" / "a.png", seed=1)
    result = invoke("init", str(tmp_path / "proj"), "--images", str(images))
    assert result.exit_code == 1 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "proj").exists()


def copy_package(dest: Path) -> Path:
    shutil.copytree(PACKAGE_ROOT, dest / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return dest / "pipeline"


def test_fingerprints_change_exactly_for_the_stages_whose_code_changed(tmp_path):
    """A simulated upgrade: editing a file changes the fingerprint of the stages that run it,
    and only those."""
    root = copy_package(tmp_path)
    before = {s: stage_fingerprint(s, root) for s in STAGES}
    assert before == {s: stage_fingerprint(s, PACKAGE_ROOT) for s in STAGES}
    card = root / "stages" / "card.py"
    card.write_text(card.read_text() + "\n# upgraded\n")
    after = {s: stage_fingerprint(s, root) for s in STAGES}
    assert {s for s in STAGES if after[s] != before[s]} == {"card"}
    heads = root / "core" / "heads.py"
    heads.write_text(heads.read_text() + "\n# upgraded\n")
    again = {s: stage_fingerprint(s, root) for s in STAGES}
    changed = {s for s in STAGES if again[s] != after[s]}
    assert {"train_head", "finetune", "export", "bench"} <= changed
    assert "prepare" not in changed and "interpret" not in changed


def test_unchanged_fingerprint_files_keep_their_bytes_and_mtime(tmp_path):
    write_fingerprints(tmp_path)
    stamp = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    write_fingerprints(tmp_path)
    assert stamp == {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}


def test_fingerprint_names_keys_an_older_project_lacks(tmp_path):
    assert invoke("init", str(tmp_path)).exit_code == 0
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    del params["finetune"]["views"]
    del params["export"]["reliability_bins"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = invoke("fingerprint", "--params", str(tmp_path / "params.yaml"), "--out",
                    str(tmp_path / "code"))
    assert result.exit_code == 1, result.output
    assert "finetune.views (default 4)" in result.output
    assert "export.reliability_bins (default 15)" in result.output
    assert not (tmp_path / "code").exists()


TINY = {
    "prepare": {"val_fraction": 0.25, "test_fraction": 0.25},
    "backbone": TINY_BACKBONE,
    "features": {"batch_size": 8, "threads": 2},
    "train_head": {"epochs": 5, "threads": 2},
    "finetune": {"blocks": 1, "views": 1, "epochs": 1, "warmup_epochs": 0, "batch_size": 8,
                 "threads": 2},
    "export": {"variants": [], "threads": 2},
    "interpret": {"splits": ["test"], "top_losses": 4, "threads": 2},
    "bench": {"providers": ["cpu"], "variants": ["fp32"], "batch_sizes": [1], "iterations": 2,
              "time_budget_s": 0.2, "warmup": 0, "threads": 2, "pytorch": False},
}



@pytest.mark.slow
def test_init_then_dvc_repro_then_predict(tmp_path, cli_env):
    images = image_classes(tmp_path / "photos", classes=3, per_class=8)
    sh(["pipeline", "init", "proj", "--images", str(images)], tmp_path, cli_env)
    proj = tmp_path / "proj"
    params = yaml.safe_load((proj / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    sh(["dvc", "repro"], proj, cli_env)
    assert (proj / "models" / "model.onnx").is_file() and (proj / "reports" / "model_card.md").is_file()
    second = sh(["dvc", "repro"], proj, cli_env)
    ran = set(__import__("re").findall(r"Running stage '(\w+)'", second))
    # only the always-checked fingerprints of the code and the machine; nothing else re-runs
    assert ran == {"code", "machine"}, second

    # the installed tool is upgraded (simulated: a changed copy first on the path)
    upgraded = copy_package(tmp_path / "upgraded")
    card = upgraded / "stages" / "card.py"
    card.write_text(card.read_text() + "\n# upgraded\n")
    env = dict(cli_env, PYTHONPATH=str(upgraded.parent))
    third = sh(["dvc", "repro"], proj, env)
    ran = set(__import__("re").findall(r"Running stage '(\w+)'", third))
    assert ran == {"code", "machine", "card"}, third

    out = sh(["pipeline", "predict", "--model", "models/model.onnx", "--json",
              str(images / "class1" / "0.png")], proj, cli_env)
    row = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert "predict: 1 images" in out  # the summary line (stderr)
    assert row["predictions"][0]["label"] in {"class0", "class1", "class2"}
