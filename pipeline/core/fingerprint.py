"""Which package files a stage runs, and a fingerprint of them.

:func:`import_closure` follows a module's imports (at module level and inside functions,
packages' ``__init__.py`` included) within this package. In this repository a test checks that
each stage's ``dvc.yaml`` deps cover that closure; in a project made by ``pipeline init`` the
stages cannot name the installed package's files, so they depend on
``.pipeline/code/<stage>.sha256`` instead: :func:`stage_fingerprint` hashes the closure's
files (path and bytes) with the distribution version, and ``pipeline fingerprint`` rewrites
those files before every ``dvc repro`` (an always-changed first stage). A file whose content
did not change keeps its hash, so only the stages whose code changed re-run.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

from .atomic import write_text

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # .../pipeline


def module_file(name: str, root: Path = PACKAGE_ROOT) -> Path | None:
    """``pipeline.core.config`` -> its file (a package's ``__init__.py``); None if not ours."""
    parts = name.split(".")
    if parts[0] != root.name:
        return None
    base = root.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, root: Path = PACKAGE_ROOT) -> set[str]:
    """Every module of this package that ``path`` imports, anywhere in the file."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    package = parts[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]  # `from . import x`
        else:
            continue
        found |= {n for n in names if module_file(n, root) is not None}
    return found


def import_closure(path: Path, root: Path = PACKAGE_ROOT) -> set[Path]:
    """The package files that running ``path`` may execute."""
    todo, seen = [path], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for name in imported_modules(current, root):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                f = module_file(".".join(parts[:i]), root)
                if f is not None:
                    todo.append(f)
    return seen


def stage_fingerprint(stage: str, root: Path = PACKAGE_ROOT) -> str:
    """SHA-256 over the relative path and bytes of every file the stage runs."""
    from .stage_table import STAGE

    digest = hashlib.sha256()
    for f in sorted(import_closure(root / STAGE[stage].module_path, root)):
        digest.update(f.relative_to(root).as_posix().encode() + b"\0")
        digest.update(f.read_bytes() + b"\0")
    return digest.hexdigest()


def write_fingerprints(folder: str | Path, root: Path = PACKAGE_ROOT) -> dict[str, str]:
    """Write ``<folder>/<stage>.sha256`` for every stage; unchanged files keep their bytes."""
    from .stage_table import MODULE_STAGES

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for stage in MODULE_STAGES:
        out[stage] = stage_fingerprint(stage, root)
        path = folder / f"{stage}.sha256"
        if not path.is_file() or path.read_text(encoding="utf-8").strip() != out[stage]:
            write_text(path, out[stage] + "\n")
    return out
