"""pipeline advise: the regime from synthetic layer curves, and the whole command on tiny data."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.core.config import AdviseParams, FinetuneParams
from pipeline.core.dataset import read_prepared
from pipeline.tools import advise

from ..conftest import REPO, TINY_BACKBONE


def layers_carrying_labels(strengths: list[float], per_class: int, seed: int = 0):
    """One feature array per layer: the class signal scaled by ``strengths[k]`` plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(4), per_class)
    signal = np.eye(4)[labels]
    return [s * signal + rng.normal(size=(len(labels), 4)) for s in strengths], labels


def test_two_synthetic_data_sets_sit_in_opposite_cells_and_get_opposite_advice():
    params = AdviseParams(large_per_class=40, bootstrap=50)
    ft = FinetuneParams()
    # features that get better up to the last layer; 10 images per class: small, similar
    layers, labels = layers_carrying_labels([0.5, 1.5, 4.0], per_class=10)
    near = advise.place(10, advise.score_layers(layers, labels, params), 8, params, ft)
    assert (near["size"], near["similarity"]) == ("small", "similar")
    assert near["layer"] == "last" and near["finetune"] == {"enabled": False}
    # the label signal is strongest in layer 1 and gone by the last; 60 per class: large
    layers, labels = layers_carrying_labels([1.0, 4.0, 0.0], per_class=60)
    scored = advise.score_layers(layers, labels, params)
    assert scored[1]["probe"]["accuracy"] > 0.9 > 0.5 > scored[2]["probe"]["accuracy"]
    far = advise.place(60, scored, 8, params, ft)
    assert (far["size"], far["similarity"]) == ("large", "different")
    assert far["peak_layer"] == 1 and far["specificity_drop"] > 0.4
    assert far["finetune"] == {"enabled": True, "blocks": 4, "lr_backbone": 1e-3,
                               "lr_head": 1e-3}
    # the same far curve on few images: head only on the earlier layer's features
    small_far = advise.place(12, scored, 8, params, ft)
    assert (small_far["size"], small_far["layer"]) == ("small", 1)
    assert small_far["finetune"] == {"enabled": False}
    # many images and a curve that peaks at the last layer: today's fine-tuning params
    big_near = advise.place(500, advise.score_layers(*layers_carrying_labels(
        [0.5, 1.5, 4.0], per_class=10), params), 8, params, ft)
    assert big_near["finetune"] == {"enabled": True, "blocks": ft.blocks,
                                    "lr_backbone": ft.lr_backbone, "lr_head": ft.lr_head}


def test_a_drop_within_the_threshold_is_similar_and_ties_go_to_the_later_layer():
    params = AdviseParams(specificity_drop=0.02)
    curve = [{"layer": k, "probe": {"accuracy": a}} for k, a in enumerate([0.90, 0.95, 0.93])]
    curve[-1]["layer"] = "last"
    assert advise.place(5, curve, 3, params, FinetuneParams())["similarity"] == "similar"
    curve[-1]["probe"]["accuracy"] = 0.9299
    assert advise.place(5, curve, 3, params, FinetuneParams())["similarity"] == "different"
    curve[-1]["probe"]["accuracy"] = 0.95
    assert advise.place(5, curve, 3, params, FinetuneParams())["peak_layer"] == "last"
    assert advise.place(500, curve, 3, params, FinetuneParams())["size"] == "large"
    assert advise.place(499, curve, 3, AdviseParams(large_per_class=500),
                        FinetuneParams())["size"] == "small"


def test_candidates_sample_and_params_lines():
    assert advise.candidate_names(AdviseParams(), "timm:x") == [
        "timm:x", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    assert advise.candidate_names(AdviseParams(), "efficientnet_lite1")[:2] == [
        "efficientnet_lite1", "efficientnet_lite0"]
    assert advise.candidate_names(AdviseParams(backbones=("a", " a", "b")), "c") == ["a", "b"]
    rows = [{"path": f"{s}{i}", "label": "xy"[i % 2], "split": s}
            for s in ("train", "val", "test") for i in range(10)]
    sample = advise.sample_rows(rows, 4, seed=0)
    assert len(sample) == 8 and {r["split"] for r in sample} <= {"train", "val"}
    assert sorted(r["label"] for r in sample) == ["x"] * 4 + ["y"] * 4
    assert [rows.index(r) for r in sample] == sorted(rows.index(r) for r in sample)
    assert sample == advise.sample_rows(rows, 4, seed=0) != advise.sample_rows(rows, 4, seed=1)
    assert len(advise.sample_rows(rows, 100, seed=0)) == 20
    assert advise.params_lines("b", 3, {"enabled": False}) == [
        "backbone.name=b", "backbone.layer=3", "finetune.enabled=false"]
    assert advise.params_lines("b", "last", {"enabled": True, "blocks": 4, "lr_backbone": 0.001,
                                             "lr_head": 0.001})[2:] == [
        "finetune.enabled=true", "finetune.blocks=4", "finetune.lr_backbone=0.001",
        "finetune.lr_head=0.001"]
    assert [advise.deep_blocks(g) for g in (1, 5, 8)] == [1, 3, 4]


def test_copies_too_small_for_a_backbone_are_prepared_again_once(project, tmp_path, monkeypatch):
    from pipeline.core.config import PrepareParams

    calls = []
    monkeypatch.setattr("pipeline.stages.prepare.run",
                        lambda params, out: calls.append(params.short_side) or out.mkdir())
    copies = advise.Copies(PrepareParams(), project / "prepared", tmp_path)
    assert copies.short_side == 256
    assert copies.folder_for(256) == project / "prepared" and copies.needs(256) == []
    assert copies.folder_for(292) == tmp_path / "prepared_292" == copies.folder_for(292)
    assert calls == [292] and copies.needs(292) == ["prepare.short_side=292"]


def write_params(path, verify: int) -> None:
    path.write_text(yaml.safe_dump({
        "prepare": {"source": "sklearn-digits", "max_images_per_class": 6,
                    "val_fraction": 0.2, "test_fraction": 0.2},
        "backbone": TINY_BACKBONE,
        "features": {"batch_size": 16, "threads": 2},
        "train_head": {"epochs": 5, "threads": 2},
        "finetune": {"epochs": 2, "batch_size": 8, "views": 1, "warmup_epochs": 0,
                     "threads": 2},
        "advise": {"backbones": [TINY_BACKBONE["name"], "timm:no_such_net"], "verify": verify,
                   "rung_epochs": 1, "bootstrap": 50, "threads": 2, "workers": 0},
    }))


def test_advise_scores_every_layer_skips_what_it_cannot_build_and_is_deterministic(
        project, tmp_path):
    write_params(tmp_path / "params.yaml", verify=0)
    runner = CliRunner()
    outs = []
    for i in range(2):
        out = tmp_path / f"run{i}" / "advise.json"
        result = runner.invoke(main, ["advise", "--params", str(tmp_path / "params.yaml"),
                                      "--prepared", str(project / "prepared"), "--out", str(out)])
        assert result.exit_code == 0, result.output
        outs.append(json.loads(out.read_text()))
    report = outs[0]
    assert out.with_suffix(".md").is_file() and out.with_suffix(".png").stat().st_size > 0
    (cand,) = report["candidates"]
    assert cand["backbone"] == "timm:test_efficientnet"
    assert [layer["layer"] for layer in cand["layers"]][-1] == "last"
    _, _, rows = read_prepared(project / "prepared")
    assert len(cand["layers"]) >= 3
    assert report["scored_images"] == sum(r["split"] != "test" for r in rows)
    assert report["skipped"][0]["backbone"] == "timm:no_such_net"
    assert "unknown timm model" in report["skipped"][0]["reason"]
    strip = ("seconds", "forward_seconds", "score_seconds")

    def figures(r):
        return json.dumps([[{k: v for k, v in layer.items() if k not in strip}
                            for layer in c["layers"]] for c in r["candidates"]])

    assert figures(outs[0]) == figures(outs[1])
    assert report["recommendation"]["params"][0] == "backbone.name=timm:test_efficientnet"
    assert "verified" not in report


def test_advise_verify_trains_heads_and_races_two_fine_tunes(project, tmp_path):
    write_params(tmp_path / "params.yaml", verify=2)
    out = tmp_path / "advise.json"
    result = CliRunner().invoke(main, ["advise", "--params", str(tmp_path / "params.yaml"),
                                       "--prepared", str(project / "prepared"),
                                       "--out", str(out), "--apply"])
    assert result.exit_code == 0, result.output
    checked = json.loads(out.read_text())["verified"]
    applied = yaml.safe_load((tmp_path / "params.yaml").read_text())
    chosen = checked["chosen"]
    assert applied["backbone"]["layer"] == chosen["layer"]
    assert applied["finetune"]["enabled"] is chosen["finetune"]["enabled"]
    if chosen["finetune"]["enabled"]:
        assert applied["finetune"]["blocks"] == chosen["finetune"]["blocks"]
    assert len(checked["heads"]) == 2
    ranking = json.loads(out.read_text())["ranking"]
    assert [(h["backbone"], h["layer"]) for h in checked["heads"]] == [
        (r["backbone"], r["layer"]) for r in ranking[:2]]
    rung1 = [f for f in checked["finetunes"] if f["rung"] == 1]
    rung2 = [f for f in checked["finetunes"] if f["rung"] == 2]
    assert [f["racer"] for f in rung1] == ["params", "deep"] and len(rung2) == 1
    assert all(f["epochs"] == 1 and f["test_accuracy"] is None for f in rung1)
    assert rung2[0]["epochs"] == 2 and rung2[0]["test_accuracy"] is not None
    assert rung2[0]["resumed_after_epoch"] == 1  # the winner goes on, it does not start over
    assert rung2[0]["racer"] == max(rung1, key=lambda f: (f["val_accuracy"],
                                                          f["racer"] == "params"))["racer"]
    finals = checked["heads"] + rung2
    assert checked["chosen"]["val_accuracy"] == max(f["val_accuracy"] for f in finals)
    assert checked["kendall_tau_vs_val"] == {"logme": None, "probe": None, "knn": None}
    assert "Verified by training" in out.with_suffix(".md").read_text()


def test_apply_writes_typed_values_and_keeps_comments(tmp_path):
    from pipeline.core.config import load_params

    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    advise.apply_to_params(params, ["backbone.name=efficientnet_lite2", "backbone.layer=6",
                                    "finetune.enabled=true", "finetune.blocks=4",
                                    "finetune.lr_backbone=0.001", "prepare.short_side=292"])
    text = params.read_text()
    assert "# image folder" in text or "#" in text.split("finetune:")[1].splitlines()[1]
    loaded = load_params(params, "backbone", "finetune", "prepare")
    assert loaded["backbone"].name == "efficientnet_lite2" and loaded["backbone"].layer == 6
    assert loaded["finetune"].blocks == 4 and loaded["finetune"].lr_backbone == 0.001
    assert loaded["finetune"].epochs == 20 and loaded["prepare"].short_side == 292
    before = [line for line in (REPO / "params.yaml").read_text().splitlines()
              if "#" in line and "layer:" not in line and "blocks:" not in line
              and "lr_backbone:" not in line and "short_side:" not in line
              and "name:" not in line and "enabled:" not in line]
    after = text.splitlines()
    assert all(line in after for line in before)  # every other commented line unchanged


def test_apply_needs_a_verified_choice(tmp_path):
    write_params(tmp_path / "params.yaml", verify=0)
    result = CliRunner().invoke(main, ["advise", "--params", str(tmp_path / "params.yaml"),
                                       "--apply"])
    assert result.exit_code == 2 and "--apply writes only a verified choice" in result.output


def test_the_auto_stage_with_nothing_auto_writes_only_not_requested(project, tmp_path):
    write_params(tmp_path / "params.yaml", verify=0)
    out = tmp_path / "auto"
    result = CliRunner().invoke(main, ["auto", "--params", str(tmp_path / "params.yaml"),
                                       "--prepared", str(project / "prepared"),
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "choice.json").read_text()) == {
        "format": "pipeline-auto-choice/1", "requested": False}
    assert sorted(p.name for p in out.iterdir()) == ["choice.json"]
    assert "nothing to choose" in result.output


def test_the_auto_stage_needs_a_verified_choice(project, tmp_path):
    write_params(tmp_path / "params.yaml", verify=0)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["finetune"]["blocks"] = "auto"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(main, ["auto", "--params", str(tmp_path / "params.yaml"),
                                       "--prepared", str(project / "prepared"),
                                       "--out", str(tmp_path / "auto")])
    assert result.exit_code != 0
    assert "finetune.blocks: auto takes a verified choice; set advise.verify" in result.output
    assert not (tmp_path / "auto").exists()
    # the stages that read auto params say what to run first
    result = CliRunner().invoke(main, ["cut-cache", "--params", str(tmp_path / "params.yaml"),
                                       "--prepared", str(project / "prepared"),
                                       "--out", str(tmp_path / "cut")])
    assert result.exit_code != 0 and "dvc repro auto" in result.output


def test_a_kept_cut_cache_is_what_a_fresh_run_writes(project, tmp_path):
    from pipeline.core.config import BackboneParams, FinetuneParams
    from pipeline.stages.cut_cache import run as cut_cache

    backbone = BackboneParams(**TINY_BACKBONE)
    ft = FinetuneParams(blocks=1, views=1, batch_size=8, threads=2)
    cut_cache(backbone, ft, project / "prepared", tmp_path / "kept")
    meta = cut_cache(backbone, ft, project / "prepared", tmp_path / "copy", tmp_path / "kept")
    assert meta["reused"] == str(tmp_path / "kept")
    fresh = cut_cache(backbone, ft, project / "prepared", tmp_path / "fresh")
    assert "reused" not in fresh
    for item in (tmp_path / "fresh").iterdir():
        assert (tmp_path / "copy" / item.name).read_bytes() == item.read_bytes()
    # another cut is not this cache: computed, not copied
    other = cut_cache(backbone, dataclasses.replace(ft, blocks=2), project / "prepared",
                      tmp_path / "other", tmp_path / "kept")
    assert "reused" not in other and other["cut"] != meta["cut"]
