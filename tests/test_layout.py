"""The architecture holds: rooms by role, DVC deps that cover the code each stage runs, one
source of paths shared by the CLI and dvc.yaml."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import click
import pytest
import yaml

from pipeline.cli import main
from pipeline.core.fingerprint import import_closure
from pipeline.core.fingerprint import imported_modules as _imported_modules
from pipeline.core.paths import PATHS, ProjectPaths
from pipeline.core.stage_table import MODULE_STAGES, STAGE, STAGES, render_dvc_yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "pipeline"
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def closure(path: Path) -> set[Path]:
    return import_closure(path)


def imported_modules(path: Path) -> set[str]:
    return _imported_modules(path)


def stage_modules() -> list[Path]:
    return sorted(p for p in (PACKAGE / "stages").glob("*.py") if p.name != "__init__.py")


def test_every_dvc_stage_has_one_stage_module_and_back():
    """Each DVC stage runs one module: its own in pipeline/stages, or (the tools that chain
    stages, such as auto) the one the stage table names."""
    tool_stages = {s.name for s in STAGES if s.module}
    assert tool_stages == {"auto"}
    assert all((PACKAGE / STAGE[s].module_path).is_file() for s in tool_stages)
    assert {p.stem for p in stage_modules()} | tool_stages == set(DVC) == set(MODULE_STAGES)


def test_the_committed_dvc_yaml_is_the_rendering_of_the_stage_table():
    """One table of stages: dvc.yaml is rendered from it, never edited by hand."""
    assert (REPO / "dvc.yaml").read_text() == render_dvc_yaml(), \
        "dvc.yaml differs from the stage table: python -m pipeline.core.stage_table > dvc.yaml"


@pytest.mark.parametrize("module", stage_modules(), ids=lambda p: p.stem)
def test_a_stage_imports_no_other_stage_and_no_tool(module):
    for name in imported_modules(module):
        assert not name.startswith(("pipeline.stages.", "pipeline.tools.", "pipeline.cli")), \
            f"{module.name} imports {name}: move the shared code to pipeline/core or onnx"


@pytest.mark.parametrize("room", ["core", "onnx"])
def test_shared_rooms_import_no_stage_tool_or_cli(room):
    for module in (PACKAGE / room).glob("*.py"):
        for name in imported_modules(module):
            assert not name.startswith(("pipeline.stages", "pipeline.tools", "pipeline.cli")), \
                f"{room}/{module.name} imports {name}"


def covered(file: Path, deps: list[str]) -> bool:
    rel = file.relative_to(REPO).as_posix()
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", sorted(DVC))
def test_dvc_deps_cover_every_file_the_stage_runs(stage):
    """A change to any package file that a stage runs must re-run it under `dvc repro`."""
    deps = [d for d in DVC[stage]["deps"] if isinstance(d, str)]
    files = closure(PACKAGE / STAGE[stage].module_path)
    missing = sorted(f.relative_to(REPO).as_posix() for f in files if not covered(f, deps))
    assert not missing, f"dvc.yaml stage {stage} misses deps on {missing}"


def test_the_closure_follows_imports_inside_functions():
    """The check itself: card imports the runner only inside a function, and the closure
    still reaches it (and the runner's own imports)."""
    card = PACKAGE / "stages" / "card.py"
    top_level = {a.module for a in ast.parse(card.read_text()).body
                 if isinstance(a, ast.ImportFrom)}
    assert not any(m and "runner" in m for m in top_level)
    files = {f.relative_to(REPO).as_posix() for f in closure(card)}
    assert {"pipeline/onnx/runner.py", "pipeline/onnx/contract.py",
            "pipeline/onnx/__init__.py"} <= files
    assert not covered(PACKAGE / "onnx" / "contract.py", ["pipeline/core", "pipeline/stages"])


def cmd_options(stage: str) -> tuple[str, dict[str, str]]:
    words = shlex.split(DVC[stage]["cmd"])
    assert words[0] == "pipeline"
    options = dict(zip(words[2::2], words[3::2]))
    return words[1], options


@pytest.mark.parametrize("stage", sorted(DVC))
def test_dvc_yaml_paths_are_the_cli_defaults(stage):
    """dvc.yaml passes every path explicitly; each equals the CLI default, which comes from
    ProjectPaths: one source for where artefacts live."""
    name, options = cmd_options(stage)
    command = main.commands[name]
    defaults = {opt: p.default for p in command.params if isinstance(p, click.Option)
                for opt in p.opts}
    for opt, value in options.items():
        assert defaults[opt] == value, f"{stage}: {opt} {value} but the CLI default is " \
                                       f"{defaults[opt]}"


@pytest.mark.parametrize("stage", sorted(DVC))
def test_every_written_path_is_a_declared_output(stage):
    """Each path the command writes is declared (outs, metrics) or lies in a declared out."""
    _, options = cmd_options(stage)
    declared = []
    for key in ("outs", "metrics"):
        for item in DVC[stage].get(key, []):
            declared.append(item if isinstance(item, str) else next(iter(item)))
    deps = [d for d in DVC[stage]["deps"] if isinstance(d, str)]
    for opt, value in options.items():
        if opt == "--params":
            continue
        ok = covered(REPO / value, declared) or covered(REPO / value, deps) or any(
            covered(REPO / d, [value]) for d in declared + deps)
        assert ok, f"{stage}: {opt} {value} is neither a dep nor a declared output"


def test_paths_derive_from_one_root(tmp_path):
    other = ProjectPaths(tmp_path)
    assert other.onnx == tmp_path / PATHS.onnx and other.report_file("head") == \
        tmp_path / "reports" / "head.json"
    assert PATHS.metrics_file("export") == Path("metrics/export.json")


def test_dvc_metrics_are_headline_files_and_reports_are_not_metrics():
    metrics = [next(iter(m)) for s in DVC.values() for m in s.get("metrics", [])]
    assert metrics and all(re.fullmatch(r"metrics/\w+\.json", m) for m in metrics)


def test_dvc_ignores_bytecode_so_folder_deps_hash_only_source():
    """The stages depend on whole folders; Python's __pycache__ inside them must not count,
    or a fresh clone (no bytecode) or another Python version would re-run every stage."""
    ignored = (REPO / ".dvcignore").read_text().splitlines()
    assert "__pycache__/" in ignored and "*.pyc" in ignored
