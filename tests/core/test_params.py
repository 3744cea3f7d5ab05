from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.core.config import (
    SECTIONS,
    ExportParams,
    FeaturesParams,
    FinetuneParams,
    PrepareParams,
    TrainHeadParams,
    load_params,
)
from pipeline.core.errors import ParamsError
from pipeline.core.params import parse_section

REPO = Path(__file__).resolve().parents[2]


def test_params_yaml_shows_every_default_of_every_section():
    """params.yaml and the dataclass defaults are one source: the file parses to exactly the
    defaults, for all nine sections, and lists every key."""
    import dataclasses

    import yaml

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(raw) == set(SECTIONS)
    parsed = load_params(REPO / "params.yaml")
    for name, cls in SECTIONS.items():
        assert set(raw[name]) == {f.name for f in dataclasses.fields(cls)}, name
        assert parsed[name] == cls(), f"params.yaml {name} differs from {cls.__name__} defaults"


def test_load_params_reads_only_the_named_sections_and_applies_overrides(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("finetune:\n  blocks: 1\nbench:\n  nonsense: 1\n")
    got = load_params(path, "finetune", overrides={"finetune": {"epochs": 3}})
    assert set(got) == {"finetune"}
    assert (got["finetune"].blocks, got["finetune"].epochs) == (1, 3)
    with pytest.raises(ParamsError, match=r"params.yaml: unknown key bench.nonsense"):
        load_params(path, "bench")
    with pytest.raises(ParamsError, match=r"finetune.epochs must be >= 1"):
        load_params(path, "finetune", overrides={"finetune": {"epochs": 0}})


def test_defaults_when_section_missing():
    assert parse_section(TrainHeadParams, None, "train_head") == TrainHeadParams()


def test_unknown_key_names_it_and_lists_valid_keys():
    with pytest.raises(ParamsError) as err:
        parse_section(TrainHeadParams, {"lrr": 0.1}, "train_head")
    assert "train_head.lrr" in str(err.value)
    assert "lr" in str(err.value) and "weight_decay" in str(err.value)


@pytest.mark.parametrize("data, needle", [
    ({"lr": "fast"}, "train_head.lr must be a number"),
    ({"lr": -1}, "train_head.lr must be > 0"),
    ({"epochs": 2.5}, "train_head.epochs must be an integer"),
    ({"epochs": True}, "train_head.epochs must be an integer"),
    ({"head": "svm"}, "train_head.head must be one of 'linear', 'mlp'"),
    ({"dropout": 1.0}, "train_head.dropout must be < 1.0"),
])
def test_bad_values_name_the_key(data, needle):
    with pytest.raises(ParamsError) as err:
        parse_section(TrainHeadParams, data, "train_head")
    assert needle in str(err.value)


def test_cross_field_check():
    with pytest.raises(ParamsError, match="val_fraction"):
        parse_section(PrepareParams, {"val_fraction": 0.5, "test_fraction": 0.45}, "prepare")


def test_optional_int_accepts_null_and_int():
    assert parse_section(PrepareParams, {"max_images_per_class": None}, "prepare") \
        .max_images_per_class is None
    assert parse_section(PrepareParams, {"max_images_per_class": 5}, "prepare") \
        .max_images_per_class == 5
    with pytest.raises(ParamsError, match="max_images_per_class"):
        parse_section(PrepareParams, {"max_images_per_class": "all"}, "prepare")


def test_cli_bad_params_is_one_line_and_writes_nothing(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("prepare:\n  seed: -3\n")
    out = tmp_path / "prepared"
    result = CliRunner().invoke(main, ["prepare", "--params", str(params), "--out", str(out)])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "prepare.seed must be >= 0" in lines[0], result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_cli_missing_params_file(tmp_path):
    result = CliRunner().invoke(main, ["train-head", "--params", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1 and "params file not found" in result.output


def test_cli_invalid_yaml(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("prepare: [unclosed\n")
    result = CliRunner().invoke(main, ["prepare", "--params", str(params)])
    assert result.exit_code == 1 and "not valid YAML" in result.output


@pytest.mark.parametrize("cls, section, data, message", [
    # optional ints name both accepted types
    (FeaturesParams, "features", {"workers": "two"},
     "features.workers must be int or null (got 'two')"),
    (FeaturesParams, "features", {"workers": -1}, "features.workers must be >= 0 (got -1)"),
    (FeaturesParams, "features", {"verify_tolerance": 0}, "features.verify_tolerance must be > 0"),
    (FeaturesParams, "features", {"batch_size": 5000}, "features.batch_size must be <= 4096"),
    (ExportParams, "export", {"variants": "int8"}, "export.variants must be a list"),
    (ExportParams, "export", {"variants": ["int4"]},
     "export.variants[0] must be one of 'fp16', 'int8'"),
    (ExportParams, "export", {"int8_reduce_range": "yes"},
     "export.int8_reduce_range must be true or false (got 'yes')"),
    (ExportParams, "export", {"fp16_min_agreement": 1.5},
     "export.fp16_min_agreement must be <= 1.0 (got 1.5)"),
    (ExportParams, "export", {"opset": 17}, "export.opset must be >= 18 (got 17)"),
    (ExportParams, "export", "fast", "export must be a mapping of keys (got 'fast')"),
    # a union holding a Literal names the type and the choices
    (FinetuneParams, "finetune", {"blocks": "some"},
     "finetune.blocks must be int or one of 'all', 'auto' (got 'some')"),
])
def test_each_kind_of_bad_value_gets_its_own_message(cls, section, data, message):
    with pytest.raises(ParamsError) as err:
        parse_section(cls, data, section)
    assert str(err.value).startswith(message), str(err.value)


def test_bounds_are_inclusive_exactly_where_they_say_so():
    assert parse_section(FeaturesParams, {"batch_size": 4096}, "features").batch_size == 4096
    assert parse_section(FeaturesParams, {"batch_size": 1}, "features").batch_size == 1
    with pytest.raises(ParamsError, match="must be >= 1"):
        parse_section(FeaturesParams, {"batch_size": 0}, "features")
    assert parse_section(ExportParams, {"int8_max_accuracy_drop": 0.0},
                         "export").int8_max_accuracy_drop == 0.0
    assert parse_section(ExportParams, {"tolerance": 1e-9}, "export").tolerance == 1e-9
    assert parse_section(ExportParams, {"variants": ["fp16"]}, "export").variants == ("fp16",)
    assert parse_section(ExportParams, None, "export") == ExportParams()
    value = parse_section(ExportParams, {"tolerance": 1}, "export").tolerance
    assert value == 1.0 and isinstance(value, float)
