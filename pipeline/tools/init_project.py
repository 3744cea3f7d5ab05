"""``pipeline init``: scaffold a user project that runs the chain through the installed tool.

Writes ``dvc.yaml`` (the same stages as this repository's, depending on per-stage code
fingerprints instead of the tool's source files), ``params.yaml`` with every default (from
:mod:`pipeline.core.config`, commented), ``data/images/README.md``, ``.gitignore`` and
``.dvcignore``, then runs ``git init`` and ``dvc init`` where the folder is not yet a repository.
Nothing is written when an input is wrong or a file exists (unless ``force``).
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from ..core.atomic import write_text
from ..core.config import SECTIONS
from ..core.errors import PipelineError
from ..core.fingerprint import write_fingerprints
from ..core.stage_table import render_dvc_yaml

IMAGES_README = """Put your images here as `data/images/<class>/<image>` (or point `prepare.path` in
`params.yaml` at another folder, or at a CSV manifest with `prepare.source: csv`). Files outside
class folders, like this README, are ignored. Then run `dvc repro`.
"""
GITIGNORE = "/data/prepared\n/data/features\n/data/cut_cache\n*.tmp\n*.resume.pt\n"
DVCIGNORE = "__pycache__/\n.venv/\n"


def _yaml_value(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix(
        "\n...").removesuffix("...").strip()


def render_params(overrides: dict[str, dict[str, Any]]) -> str:
    """``params.yaml`` text: every section and key with its default (or override) and help."""
    lines = ["# Every key with its default. `pipeline <stage> --help` and the docs explain them;",
             "# unknown keys, wrong types and out-of-range values fail before any work.", ""]
    for name, cls in SECTIONS.items():
        lines.append(f"{name}:")
        defaults = cls()
        for f in dataclasses.fields(cls):
            value = overrides.get(name, {}).get(f.name, getattr(defaults, f.name))
            text = f"  {f.name}: {_yaml_value(value)}"
            hint = f.metadata.get("help", "") if f.metadata else ""
            lines.append(f"{text.ljust(32)}  # {hint}" if hint else text)
        lines.append("")
    return "\n".join(lines)


def check_image_folder(folder: Path) -> None:
    """At least two class folders with files, else a one-line error naming the folder."""
    if not folder.is_dir():
        raise PipelineError(f"--images: folder not found: {folder}")
    classes = [d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")
               and any(p.is_file() for p in d.rglob("*"))]
    if not classes:
        raise PipelineError(f"--images: {folder} has no class subfolders with images (expected "
                            f"{folder}/<class>/<image>)")
    if len(classes) < 2:
        raise PipelineError(f"--images: {folder} has one class ({classes[0].name}); a "
                            "classifier needs at least two class folders")


def _append_missing_lines(path: Path, text: str) -> bool:
    """Add the lines of ``text`` that ``path`` lacks (a user's own lines stay)."""
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    missing = [line for line in text.splitlines() if line not in old.splitlines()]
    if not missing:
        return False
    write_text(path, old + ("" if not old or old.endswith("\n") else "\n") +
               "\n".join(missing) + "\n")
    return True


def missing_params(params_path: str | Path) -> list[str]:
    """``section.key (default value)`` for every key this version needs that the file lacks."""
    from ..core.params import load_params_file

    data = load_params_file(params_path)
    out = []
    for name, cls in SECTIONS.items():
        section = data.get(name) or {}
        defaults = cls()
        out += [f"{name}.{f.name} (default {_yaml_value(getattr(defaults, f.name))})"
                for f in dataclasses.fields(cls) if f.name not in section]
    return out


def fingerprint(out: str | Path, params_path: str | Path) -> dict[str, str]:
    """The ``code`` stage of a user project: refuse a params file that lacks keys (a project
    made by an older version), then write the per-stage code fingerprints."""
    missing = missing_params(params_path)
    if missing:
        raise PipelineError(f"{params_path} lacks keys this version of the tool needs: "
                            f"{', '.join(missing)}; add them (or re-create the file with "
                            "`pipeline init --force` and re-apply your changes)")
    return write_fingerprints(out)


def _is_repo(folder: Path, marker: str) -> bool:
    return any((p / marker).exists() for p in (folder, *folder.parents))


def init(folder: str | Path, images: str | Path | None = None, csv: str | Path | None = None,
         backbone: str | None = None, force: bool = False) -> list[str]:
    """Scaffold ``folder``; return what was done, one line each."""
    folder = Path(folder)
    if images is not None and csv is not None:
        raise PipelineError("--images and --csv: give one of them")
    overrides: dict[str, dict[str, Any]] = {}
    if images is not None:
        check_image_folder(Path(images).expanduser())
        overrides["prepare"] = {"source": "folder",
                                "path": str(Path(images).expanduser().resolve())}
    elif csv is not None:
        manifest = Path(csv).expanduser()
        if not manifest.is_file():
            raise PipelineError(f"--csv: manifest not found: {manifest}")
        overrides["prepare"] = {"source": "csv", "path": str(manifest.resolve())}
    if backbone is not None:
        overrides["backbone"] = {"name": backbone}
    files = {
        "dvc.yaml": render_dvc_yaml(project=True),
        "params.yaml": render_params(overrides),
        "data/images/README.md": IMAGES_README,
    }
    needs_git = not _is_repo(folder.resolve(), ".git")
    if needs_git and shutil.which("git") is None:
        raise PipelineError(f"git not found on PATH; install it (or run `git init` in {folder} "
                            "yourself), then run `pipeline init` again")
    existing = [name for name in files if (folder / name).exists()]
    if existing and not force:
        raise PipelineError(f"{folder}: {', '.join(existing)} already exist(s); use --force to "
                            "overwrite them")
    done = []
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        write_text(folder / name, text)
        done.append(f"wrote {name}")
    for name, text in ((".gitignore", GITIGNORE), (".dvcignore", DVCIGNORE)):
        if _append_missing_lines(folder / name, text):
            done.append(f"updated {name}")
    write_fingerprints(folder / ".pipeline" / "code")
    done.append("wrote .pipeline/code/<stage>.sha256 (fingerprints of the tool's code)")
    # dvc is a dependency of this package: run it with this interpreter, PATH or not
    for marker, command, name in ((".git", ["git", "init", "-q"], "git init"),
                                  (".dvc", [sys.executable, "-m", "dvc", "init", "-q"],
                                   "dvc init")):
        if _is_repo(folder.resolve(), marker):
            done.append(f"kept the existing {marker[1:]} repository")
            continue
        subprocess.run(command, cwd=folder, check=True, capture_output=True)
        done.append(f"ran {name}")
    return done
