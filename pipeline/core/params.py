"""``params.yaml`` sections parsed into small frozen dataclasses.

Each stage declares the sections it reads (in ``dvc.yaml``) and parses them here before doing
any work. Unknown keys, wrong types and out-of-range values raise :class:`ParamsError` with a
message that names the key (``train_head.lr``) and lists the valid choices.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from .errors import ParamsError

T = TypeVar("T")


def param(default: Any, *, ge: float | None = None, gt: float | None = None,
          le: float | None = None, lt: float | None = None, help: str = "") -> Any:
    """A dataclass field with optional numeric bounds, checked by :func:`parse_section`."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le, "lt": lt, "help": help})


def load_params_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: params file not found; pass --params PATH or create it "
                          "(see the README for the keys)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections")
    return data


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return "a list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ParamsError(f"{key} must be one of {', '.join(repr(c) for c in choices)} "
                              f"(got {value!r})")
        return value
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ParamsError:
                continue
        raise ParamsError(f"{key} must be {_type_name(tp)} (got {value!r})")
    if origin is tuple:
        (inner, *_rest) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{key} must be a list (got {value!r})")
        return tuple(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is type(None):
        if value is not None:
            raise ParamsError(f"{key} must be null (got {value!r})")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key} must be true or false (got {value!r})")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key} must be an integer (got {value!r})")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{key} must be a number (got {value!r})")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{key} must be a string (got {value!r})")
        return value
    raise TypeError(f"unsupported param type {tp!r} for {key}")


def _check_bounds(value: Any, meta: typing.Mapping[str, Any], key: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    checks = (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
              ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<"))
    for name, ok, symbol in checks:
        bound = meta.get(name)
        if bound is not None and not ok(value, bound):
            raise ParamsError(f"{key} must be {symbol} {bound} (got {value!r})")


def parse_section(cls: type[T], data: Any, section: str) -> T:
    """Build the frozen dataclass ``cls`` from ``data`` (the ``section`` mapping of params)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{section} must be a mapping of keys (got {data!r})")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ParamsError(f"unknown key {section}.{unknown[0]}; valid keys of {section}: "
                          f"{', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        key = f"{section}.{name}"
        if name not in data:
            continue
        value = _coerce(data[name], hints[name], key)
        _check_bounds(value, f.metadata, key)
        values[name] = value
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(section)
    return obj


def as_dict(obj: Any) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(obj).items()}
