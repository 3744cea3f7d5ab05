"""Stage machine: a fingerprint of this machine, so that ``bench`` re-runs on another one.

DVC re-runs a stage when a dependency's bytes change, and a bench report's figures belong to
the machine that measured them. This stage runs on every ``dvc repro`` (``always_changed``)
and writes ``reports/machine.json`` (:func:`pipeline.core.runtime.machine_fingerprint`: CPU
model and flags, usable CPUs, GPUs, engine versions) only when its content differs, so that on
the same machine ``bench`` is skipped and in a fresh clone on another machine it runs again.

Run: ``pipeline machine --out reports/machine.json``
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.atomic import write_json
from ..core.runtime import machine_fingerprint


def run(out_path: str | Path) -> dict[str, Any]:
    """Write the fingerprint to ``out_path`` unless it already holds the same one."""
    out_path = Path(out_path)
    fingerprint = machine_fingerprint()
    try:
        current = json.loads(out_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        current = None
    if current != fingerprint:
        write_json(out_path, fingerprint)
    return fingerprint
