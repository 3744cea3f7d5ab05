from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.backbones import BackboneParams
from pipeline.cli import main
from pipeline.errors import ParamsError
from pipeline.features import FeaturesParams
from pipeline.params import parse_section, read_section
from pipeline.prepare import PrepareParams
from pipeline.train_head import TrainHeadParams

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_yaml_parses_for_every_stage():
    for cls, section in [(PrepareParams, "prepare"), (BackboneParams, "backbone"),
                         (FeaturesParams, "features"), (TrainHeadParams, "train_head")]:
        assert read_section(REPO / "params.yaml", cls, section) is not None


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
