"""``auto`` in params.yaml: the auto stage's verified choice, put in where the params are read.

``backbone.layer``, ``finetune.blocks``, ``finetune.lr_backbone`` and ``finetune.lr_head`` may
be ``auto``. The ``auto`` DVC stage (``pipeline auto``, built on ``pipeline advise --verify``)
trains the candidates for the configured backbone on the user's data and writes its choice to
``data/auto/choice.json``; :func:`resolve` swaps every ``auto`` value for that choice, so the
stages and their outputs only ever see concrete values. A head-only choice with
``finetune.blocks: auto`` turns fine-tuning off (``enabled: false``): the head is the model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .errors import ParamsError

AUTO = "auto"
# (section, key) pairs that may be auto, and the key of the choice that fills each
AUTO_KEYS = (("backbone", "layer"), ("finetune", "blocks"), ("finetune", "lr_backbone"),
             ("finetune", "lr_head"))
CHOICE_FORMAT = "pipeline-auto-choice/1"


def auto_keys(parsed: dict[str, Any]) -> list[str]:
    """The ``section.key`` names set to ``auto`` among the parsed sections."""
    return [f"{section}.{key}" for section, key in AUTO_KEYS
            if section in parsed and getattr(parsed[section], key) == AUTO]


def choice(chosen_layer: int | str, finetune: dict[str, Any], backbone: str,
           manifest_sha256: str, evidence: dict[str, Any]) -> dict[str, Any]:
    """The choice file's content: what each auto key becomes, and why (no timings: the file's
    bytes decide whether later stages re-run)."""
    enabled = bool(finetune["enabled"])
    return {"format": CHOICE_FORMAT, "requested": True, "backbone": backbone,
            "manifest_sha256": manifest_sha256,
            "values": {"backbone.layer": chosen_layer,
                       "finetune.enabled": enabled,
                       "finetune.blocks": finetune["blocks"] if enabled else 0,
                       "finetune.lr_backbone": finetune.get("lr_backbone"),
                       "finetune.lr_head": finetune.get("lr_head")},
            "evidence": evidence}


def not_requested() -> dict[str, Any]:
    return {"format": CHOICE_FORMAT, "requested": False}


def resolve(parsed: dict[str, Any], choice_path: Path) -> dict[str, Any]:
    """``parsed`` with every ``auto`` value replaced from ``choice_path``; unchanged (the same
    objects) when nothing is auto."""
    wanted = auto_keys(parsed)
    if not wanted:
        return parsed
    what = ", ".join(wanted)
    fix = "run `dvc repro auto` (or `pipeline auto`) first"
    if not choice_path.is_file():
        raise ParamsError(f"{what}: auto needs {choice_path}, the auto stage's choice; {fix}")
    try:
        made = json.loads(choice_path.read_text(encoding="utf-8"))
        values = made["values"] if made.get("requested") else None
    except (ValueError, KeyError, TypeError):
        raise ParamsError(f"{choice_path}: not an auto choice file; {fix}") from None
    if values is None:
        raise ParamsError(f"{what}: {choice_path} was written when no param was auto; {fix}")
    backbone = parsed.get("backbone")
    if backbone is not None and made.get("backbone") != backbone.name:
        raise ParamsError(f"{choice_path}: chosen for backbone {made.get('backbone')}, but "
                          f"backbone.name is {backbone.name}; {fix}")
    out = dict(parsed)
    for section in {name.split(".")[0] for name in wanted}:
        changes = {key: values[f"{section}.{key}"] for s, key in AUTO_KEYS
                   if s == section and f"{section}.{key}" in wanted}
        if section == "finetune" and "blocks" in changes:
            changes["enabled"] = parsed["finetune"].enabled and values["finetune.enabled"]
        for key, value in changes.items():
            if value is None:  # a head-only choice has no fine-tuning LR: keep the default
                changes[key] = getattr(type(parsed[section])(), key)
        out[section] = dataclasses.replace(parsed[section], **changes)
    return out
