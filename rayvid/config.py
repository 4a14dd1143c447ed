"""rayvid's one config system: frozen pydantic models, YAML files, `--set a.b=value` overrides.

Every job's config is a `Config` (a frozen pydantic v2 model, unknown keys forbidden) made
of small sections. Loading is strict: an unknown key (in YAML or `--set`) is a
`ConfigError` naming the dotted key and the known ones; a value of the wrong type names
the dotted key and where it came from (the file or `--set`); cross-field rules are model
validators, so they fire when the config loads, not inside a Ray worker. Derived values
are properties; nothing is written back. `to_dict` gives the resolved config that jobs
print once and save next to their outputs and inside every checkpoint.

    cfg = load_config(TrainJobConfig, "my.yaml", ["optim.lr=3e-4", "folds.k=3"])
    cfg = load_config(PrepareJobConfig, None, args.set, flags={"release": "data/iqiyi"})
    faster = with_values(cfg, {"optim.lr": 1e-3})        # a checked copy
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from rayvid.core.atomic import write_text

T = TypeVar("T", bound="Config")

# The repo's configs/ folder (an editable install or a checkout; see smoke_overrides).
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
SMOKE_FILE = CONFIG_DIR / "smoke.yaml"


class ConfigError(ValueError):
    """A config key or value that does not fit the job's config."""


class Config(BaseModel):
    """Base of every rayvid config: frozen, unknown keys rejected, and true/false never
    taken for a number (YAML reads `yes`/`no`/`on` as booleans; pydantic would make them 1/0)."""

    model_config = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True,
                              validate_default=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: Any) -> Any:
        tp, _ = _strip_optional(cls.model_fields[info.field_name].annotation)
        if isinstance(value, bool) and tp in (int, float):
            raise ValueError(f"expected {'an integer' if tp is int else 'a number'}, got {value!r}")
        return value


# ------------------------------------------------------------------ errors


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return tp, False


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _section(cls: type, keys: Sequence[Any]) -> type | None:
    """The model class at dotted path `keys` under `cls`, or None (not a model there)."""
    for key in keys:
        if not _is_model(cls) or key not in cls.model_fields:
            return None
        cls, _ = _strip_optional(cls.model_fields[key].annotation)
        if typing.get_origin(cls) is tuple:  # e.g. loss.stages.<i>: the item's model
            cls = typing.get_args(cls)[0]
    return cls if _is_model(cls) else None


_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true/false",
               "string": "a string", "tuple": "a list", "list": "a list", "dict": "a mapping",
               "model": "a mapping"}


def _describe(err: dict, cls: type) -> str:
    """One pydantic error as `dotted.key: what is wrong`."""
    loc = [str(p) for p in err["loc"] if p not in ("function-after", "function-before")]
    where = ".".join(loc)
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "extra_forbidden":
        known = _section(cls, err["loc"][:-1])
        names = ", ".join(sorted(known.model_fields)) if known else "?"
        return f"unknown config key: {where} (known at that level: {names})"
    if kind == "literal_error":
        return f"{where} must be {ctx.get('expected', '').replace(chr(39), '')}, got {err['input']!r}"
    if kind in ("value_error", "assertion_error"):
        msg = str(ctx.get("error", err["msg"]))
        section = _section(cls, err["loc"])
        if where and section and msg.split(" ")[0] in section.model_fields:  # a rule of the section:
            return f"{where}.{msg}"  # "qfda" + "sizes ... <= n_draws" -> "qfda.sizes ..."
        return f"{where}: {msg}" if where else msg
    if kind == "missing":
        return f"{where}: required, not given"
    for prefix, word in _TYPE_WORDS.items():
        if kind.startswith(prefix):
            return f"{where}: expected {word}, got {err['input']!r}"
    return f"{where}: {err['msg']} (got {err.get('input')!r})"


def _origin(loc: Sequence[Any], path: Path | None, file_data: Mapping, set_data: Mapping) -> str:
    """Where the value at `loc` came from: `--set` wins over the file (later overrides)."""
    def has(data: Any) -> bool:
        for key in loc:
            if not isinstance(data, Mapping) or str(key) not in data:
                return False
            data = data[str(key)]
        return True
    if loc and has(set_data):
        return " (from the command line)"
    if loc and path is not None and has(file_data):
        return f" (in {path})"
    return ""


def validate(cls: type[T], data: Mapping[str, Any], path: Path | None = None,
             file_data: Mapping = {}, set_data: Mapping = {}) -> T:
    """`cls.model_validate(data)`, with pydantic's errors as one ConfigError."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        lines = [_describe(err, cls) + _origin(err["loc"], path, file_data, set_data)
                 for err in e.errors()]
        raise ConfigError("; ".join(lines)) from None


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build config `cls` from plain data (a YAML mapping, `to_dict` output); strict."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{cls.__name__}: expected a mapping, got {data!r}")
    return validate(cls, data)


def to_dict(cfg: Any) -> Any:
    """Resolved config as plain YAML-friendly data (tuples become lists)."""
    if isinstance(cfg, BaseModel):
        return {name: to_dict(getattr(cfg, name)) for name in type(cfg).model_fields}
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


# ------------------------------------------------------------------ overrides and merging


def _set_path(data: dict, dotted: str, value: Any, cls: type) -> None:
    """`data[a][b] = value` for `dotted` "a.b", checking each key against model `cls`."""
    keys = dotted.split(".")
    node = data
    for i, key in enumerate(keys):
        if _is_model(cls) and key not in cls.model_fields:
            raise ConfigError(f"unknown config key: {'.'.join(keys[:i + 1])} "
                              f"(known at that level: {', '.join(sorted(cls.model_fields))})")
        if i == len(keys) - 1:
            node[key] = value
            return
        if _is_model(cls):
            cls, _ = _strip_optional(cls.model_fields[key].annotation)
            if not (_is_model(cls) or typing.get_origin(cls) in (dict, Mapping) or cls is dict):
                raise ConfigError(f"cannot set {dotted}: {'.'.join(keys[:i + 1])} is a setting, "
                                  "not a section")
        else:
            cls = None  # inside a free-form mapping: any key
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted}: {'.'.join(keys[:i + 1])} is not a section")


def parse_value(key: str, raw: str) -> Any:
    """A `--set` value: YAML-parsed (`3e-4` -> 0.0003, `[1, 3]` -> list, `null` -> None)."""
    if not raw.strip():
        return ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse {raw!r}: {e}") from None
    return value


def parse_overrides(overrides: Sequence[str], cls: type) -> dict:
    """`["a.b=1", "c=[1, 2]"]` -> nested dict; keys checked against `cls`, values YAML."""
    data: dict = {}
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        _set_path(data, key.strip(), parse_value(key.strip(), raw), cls)
    return data


def _merge(base: Mapping, extra: Mapping) -> dict:
    """Deep merge: mappings merge key by key, anything else in `extra` replaces."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def read_yaml(path: str | Path) -> dict:
    """A YAML config file's top-level mapping (empty file: {}), or ConfigError naming it."""
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    if not isinstance(loaded, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return dict(loaded)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
                flags: Mapping[str, Any] | None = None) -> T:
    """Defaults <- YAML file <- `flags` (a job's own options, dotted key -> value, already
    typed) <- `--set` overrides, strictly checked, in one validation."""
    file_data = read_yaml(path) if path is not None else {}
    for key in file_data:  # unknown top-level keys named with the file before anything else
        if key not in cls.model_fields:
            raise ConfigError(f"{path}: unknown config key: {key} "
                              f"(known: {', '.join(sorted(cls.model_fields))})")
    set_data: dict = {}
    for key, value in (flags or {}).items():
        _set_path(set_data, key, value, cls)
    set_data = _merge(set_data, parse_overrides(overrides, cls))
    return validate(cls, _merge(file_data, set_data),  # pydantic fills in the defaults
                    Path(path) if path is not None else None, file_data, set_data)


def with_values(cfg: T, values: Mapping[str, Any]) -> T:
    """A checked copy of `cfg` with dotted keys set (used by Tune trials and call sites
    that change a config): `with_values(cfg, {"gate.det_min": 0.8, "qfda.mix": [0.2, 0.7, 0.1]})`."""
    data: dict = {}
    for key, value in values.items():
        _set_path(data, key, to_dict(value), type(cfg))
    return validate(type(cfg), _merge(to_dict(cfg), data))


def dump_yaml(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, whole or not at all."""
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def smoke_overrides(job: str) -> list[str]:
    """The `--set` list of `job`'s smoke test ("train", "tune", ...) from configs/smoke.yaml:
    the one place the smoke settings live (jobs' --smoke-test and the tests read it)."""
    data = read_yaml(SMOKE_FILE)
    if job not in data:
        raise ConfigError(f"{SMOKE_FILE}: no section {job!r} (has: {', '.join(data)})")
    return [f"{key}={json.dumps(value)}" for key, value in _flatten(data[job] or {}).items()]


def _flatten(data: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
