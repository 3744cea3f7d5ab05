"""A fresh copy of this project for the evidence scripts: ``dvc.yaml``, the package and a
``params.yaml`` of the caller's, in a new git + DVC repository, so each run starts from nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


def default_params(data: str) -> dict[str, Any]:
    """This repository's ``params.yaml``, reading ``data``: ``digits`` (the embedded default)
    or a folder of ``root/<class>/*`` images."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    if data != "digits":
        params["prepare"] |= {"source": "folder", "path": str(Path(data).resolve())}
    return params


def fresh_project(work: Path, params: dict[str, Any]) -> dict[str, str]:
    """Make the project in ``work`` (which must not exist); returns the environment in which
    ``dvc`` and ``pipeline`` of this interpreter run."""
    work.mkdir(parents=True)
    shutil.copy(REPO / "dvc.yaml", work / "dvc.yaml")
    shutil.copytree(REPO / "pipeline", work / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (work / "data" / "images").mkdir(parents=True)  # the digits' stage reads an empty folder
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"],
                ["dvc", "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=work, env=env, check=True)
    return env
