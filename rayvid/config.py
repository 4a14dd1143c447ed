"""Typed, frozen job configs: YAML files plus `--set a.b=value` overrides.

One frozen dataclass per job, composed of small sections. Loading is strict: an unknown
key (in YAML or `--set`) is an error naming the key and the known ones; values are
type-checked and coerced (`"0.5"` -> 0.5, `"[1, 3, 5]"` -> (1, 3, 5)). Derived values are
properties; nothing is written back. `to_dict` gives the resolved config that jobs print
once and save next to their outputs and inside every checkpoint.

    cfg = load_config(TrainJobConfig, "my.yaml", ["optim.lr=3e-4", "folds.k=3"])
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

from rayvid.core.atomic import write_text

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value that does not fit the job's config."""


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise ConfigError naming `where`."""
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: null is not allowed here")
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=where)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
    if origin in (dict, Mapping) or tp is dict:
        kt, vt = typing.get_args(tp) or (str, Any)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported config type {tp}")


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f" in {prefix}" if prefix else ""
        raise ConfigError(f"unknown config key{where}: {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from e


def to_dict(cfg: Any) -> Any:
    """Resolved config as plain YAML-friendly data (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def _set_path(data: dict, dotted: str, value: Any, known: type) -> None:
    keys = dotted.split(".")
    node, cls = data, known
    for i, key in enumerate(keys):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if dataclasses.is_dataclass(cls) and key not in fields:
            raise ConfigError(f"unknown config key: {'.'.join(keys[:i + 1])} "
                              f"(known at that level: {', '.join(sorted(fields))})")
        if i == len(keys) - 1:
            node[key] = value
            return
        tp, _ = _strip_optional(typing.get_type_hints(cls)[key]) if dataclasses.is_dataclass(cls) else (None, 0)
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted}: {'.'.join(keys[:i + 1])} is not a section")
        cls = tp


def parse_overrides(overrides: Sequence[str], cls: type) -> dict:
    """`["a.b=1", "c=[1, 2]"]` -> nested dict; values parsed as YAML scalars/lists."""
    data: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: cannot parse {raw!r}: {e}") from e
        _set_path(data, key.strip(), value, cls)
    return data


def _merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls: type[T], path: str | Path | None = None,
                overrides: Sequence[str] = ()) -> T:
    """Defaults <- YAML file <- `--set` overrides, strictly checked."""
    data = to_dict(cls())
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{path}: the top level must be a mapping")
        from_dict(cls, loaded)  # unknown keys / bad types named before merging
        data = _merge(data, loaded)
    data = _merge(data, parse_overrides(overrides, cls))
    return from_dict(cls, data)


def with_values(cfg: T, values: Mapping[str, Any]) -> T:
    """A copy of `cfg` with dotted keys set to values, checked (used by Tune trials):
    `with_values(cfg, {"gate.det_min": 0.8, "qfda.mix": [0.2, 0.7, 0.1]})`."""
    data: dict = {}
    for key, value in values.items():
        _set_path(data, key, list(value) if isinstance(value, tuple) else value, type(cfg))
    return from_dict(type(cfg), _merge(to_dict(cfg), data))


def dump_yaml(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, whole or not at all."""
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
