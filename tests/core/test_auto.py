"""`auto` params: the auto stage's choice put in where params are read, and cache reuse."""

import json

import numpy as np
import pytest

from pipeline.core import auto
from pipeline.core.caches import reuse_cache
from pipeline.core.config import BackboneParams, FinetuneParams, load_params
from pipeline.core.errors import ParamsError


def sections(layer="last", **finetune):
    return {"backbone": BackboneParams(name="net", layer=layer),
            "finetune": FinetuneParams(**finetune)}


def write_choice(path, layer, finetune, backbone="net"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(auto.choice(layer, finetune, backbone, "abc", {})))
    return path


FINETUNE = {"enabled": True, "blocks": 4, "lr_backbone": 1e-3, "lr_head": 2e-3}


def test_nothing_auto_is_returned_as_is_without_reading_a_choice(tmp_path):
    parsed = sections()
    assert auto.resolve(parsed, tmp_path / "missing.json") is parsed
    assert auto.auto_keys(parsed) == []


def test_a_fine_tune_choice_fills_each_auto_key_and_only_those(tmp_path):
    path = write_choice(tmp_path / "choice.json", "last", FINETUNE)
    parsed = sections(layer="auto", blocks="auto", lr_backbone="auto", lr_head=5e-4)
    assert auto.auto_keys(parsed) == ["backbone.layer", "finetune.blocks",
                                      "finetune.lr_backbone"]
    out = auto.resolve(parsed, path)
    assert out["backbone"].layer == "last" and out["backbone"].name == "net"
    ft = out["finetune"]
    assert (ft.enabled, ft.blocks, ft.lr_backbone, ft.lr_head) == (True, 4, 1e-3, 5e-4)
    assert parsed["finetune"].blocks == "auto"  # the input is not changed


def test_a_head_choice_turns_fine_tuning_off_and_keeps_default_lrs(tmp_path):
    path = write_choice(tmp_path / "choice.json", 5, {"enabled": False})
    out = auto.resolve(sections(layer="auto", blocks="auto", lr_head="auto"), path)
    assert out["backbone"].layer == 5
    ft = out["finetune"]
    assert (ft.enabled, ft.blocks, ft.lr_head) == (False, 0, FinetuneParams().lr_head)
    # a user who turned fine-tuning off keeps it off, whatever the choice
    off = auto.resolve(sections(blocks="auto", enabled=False),
                       write_choice(tmp_path / "c2.json", "last", FINETUNE))
    assert (off["finetune"].enabled, off["finetune"].blocks) == (False, 4)
    # a fixed blocks with an auto LR keeps the user's blocks and enabled
    lr_only = auto.resolve(sections(lr_backbone="auto"),
                           write_choice(tmp_path / "c3.json", 5, {"enabled": False}))
    assert (lr_only["finetune"].enabled, lr_only["finetune"].blocks) == (True, 2)


@pytest.mark.parametrize("content, message", [
    (None, "backbone.layer: auto needs"),
    (json.dumps(auto.not_requested()), "written when no param was auto"),
    ("{not json", "not an auto choice file"),
    (json.dumps({"requested": True}), "not an auto choice file"),
    (json.dumps(auto.choice(3, {"enabled": False}, "other", "abc", {})),
     "chosen for backbone other, but backbone.name is net"),
])
def test_a_missing_or_wrong_choice_is_a_one_line_params_error(tmp_path, content, message):
    path = tmp_path / "choice.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ParamsError, match=message) as info:
        auto.resolve(sections(layer="auto"), path)
    assert "\n" not in str(info.value) and "dvc repro auto" in str(info.value)


def test_load_params_reads_the_choice_beside_the_params_file(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("backbone:\n  layer: auto\nfinetune:\n  blocks: auto\n")
    write_choice(tmp_path / "data" / "auto" / "choice.json", 3, {"enabled": False},
                 backbone="efficientnet_lite0")
    got = load_params(params, "backbone", "finetune")
    assert got["backbone"].layer == 3 and got["finetune"].enabled is False
    raw = load_params(params, "backbone", "finetune", resolve_auto=False)
    assert raw["backbone"].layer == "auto" and raw["finetune"].blocks == "auto"


def test_the_choice_file_has_no_timings_and_a_head_has_no_blocks():
    made = auto.choice(2, {"enabled": False}, "net", "sha", {"val_accuracy": 0.9})
    assert made["values"]["finetune.blocks"] == 0 and made["values"]["finetune.enabled"] is False
    assert made["values"]["finetune.lr_backbone"] is None
    tuned = auto.choice("last", FINETUNE, "net", "sha", {})
    assert tuned["values"]["finetune.blocks"] == 4 and tuned["requested"] is True
    assert "seconds" not in json.dumps(made)


def make_cache(folder, meta):
    folder.mkdir(parents=True)
    np.save(folder / "features.npy", np.arange(6, dtype=np.float32))
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_a_cache_is_reused_only_when_its_meta_is_this_runs(tmp_path):
    meta = {"format": 1, "backbone": {"layer": 3}, "params": {"threads": 2}, "shape": (2, 3)}
    source = make_cache(tmp_path / "kept", json.loads(json.dumps(meta)) | {"views": 1})
    assert reuse_cache(source, meta, tmp_path / "out")
    assert (tmp_path / "out" / "features.npy").read_bytes() == \
        (source / "features.npy").read_bytes()
    other = meta | {"backbone": {"layer": 4}}
    assert not reuse_cache(source, other, tmp_path / "no")
    assert not (tmp_path / "no").exists()
    assert not reuse_cache(None, meta, tmp_path / "no")
    assert not reuse_cache(tmp_path / "absent", meta, tmp_path / "no")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "meta.json").write_text("[1, 2]")
    assert not reuse_cache(tmp_path / "bad", meta, tmp_path / "no")
    assert not (tmp_path / "no").exists()
