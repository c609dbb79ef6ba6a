"""Configs to and from JSON, type-checked against the dataclasses' annotations."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal

from structlm.config.run import RunConfig
from structlm.utils.files import atomic_write_text


def to_dict(cfg: Any) -> dict:
    """A dataclass config as plain JSON-able dicts (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type, d: dict, path: str = "") -> Any:
    """Rebuild a dataclass config from `to_dict` output; unknown keys raise with their field
    path."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        where = path.rstrip(".") or cls.__name__
        raise ValueError(f"unknown config key(s) {unknown} in {where}; valid keys: {sorted(names)}")
    kwargs = {}
    for k, v in d.items():
        t = hints[k]
        if dataclasses.is_dataclass(t) and isinstance(v, dict):
            v = from_dict(t, v, f"{path}{k}.")
        else:
            v = checked(v, t, f"{path}{k}")
        kwargs[k] = v
    return cls(**kwargs)


def checked(v: Any, hint: Any, path: str) -> Any:
    """`v` if it has the type `hint` describes (ints pass as floats, lists as tuples), converted;
    else ValueError naming the field. For values from JSON/TOML, which nothing else type-checks."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(hint, types.UnionType) or origin is typing.Union:
        if v is None and type(None) in args:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return checked(v, a, path)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"{path}={v!r} has the wrong type")
    if origin is Literal:
        if v in args:
            return v
        raise ValueError(f"{path}={v!r} must be one of {list(args)}")
    if origin is tuple and isinstance(v, list | tuple):
        item = args[0] if args else Any
        return tuple(checked(x, item, f"{path}[{i}]") for i, x in enumerate(v))
    if origin is dict and isinstance(v, dict):
        return {checked(k, args[0], path): checked(x, args[1], f"{path}.{k}") for k, x in v.items()}
    ok = {int: lambda: isinstance(v, int) and not isinstance(v, bool),
          float: lambda: isinstance(v, int | float) and not isinstance(v, bool),
          bool: lambda: isinstance(v, bool), str: lambda: isinstance(v, str)}
    if hint is Any or (hint in ok and ok[hint]()):
        return float(v) if hint is float else v
    if hint not in ok and isinstance(hint, type) and isinstance(v, hint):
        return v
    want = getattr(hint, "__name__", str(hint))
    raise ValueError(f"{path}={v!r} must be of type {want}")


def save_json(cfg: Any, path: str) -> None:
    """Write a config as JSON, atomically (a kill mid-write leaves the previous file)."""
    atomic_write_text(path, json.dumps(to_dict(cfg), indent=2))


def load_run_config(path: str) -> RunConfig:
    """A RunConfig from a config.json; an unreadable or invalid file is refused by name."""
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(
            f"cannot read the run configuration {path} ({e}); it is damaged or not a structlm "
            "config.json: restore it, or copy the one inside a checkpoint directory "
            "(checkpoints/step_*/config.json)"
        ) from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} does not hold a config object; it is not a structlm config.json")
    return from_dict(RunConfig, d)
