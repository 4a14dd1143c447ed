"""The sweep job's config (`TuneJobConfig`) and its search space, without Ray.

A sweep starts every trial from `base` (a full `TrainJobConfig`) and sets the keys of
`space`: a mapping from dotted `TrainJobConfig` keys to one distribution each,

    gate.det_min:  {uniform: [0.5, 0.9]}        loguniform, quniform [lo, hi, q], randint
    qfda.n_draws:  {choice: [5, 7]}             grid (every value, x num_samples), value (fixed)
    qfda.mix:      {choice: [[0.25, 0.65, 0.10], [0.1, 0.6, 0.3]]}

Keys are checked against `TrainJobConfig` up front (an unknown key is a `ConfigError`
naming it); values are checked in the trial, so a bad value or combination fails that
trial only. List- and mapping-valued choices (bands, qFDA mix, loss stages) travel through
Tune as compact JSON strings: every searcher handles them, and the results table stays
flat and readable. Loss stages are searched by preset name (`rayvid.train.config.LOSS_PRESETS`; `SIGMOID_PRESETS` for `loss.stages`, `COSINE_PRESETS` for `loss.cosine_stages`). `load_tune_config` is `load_config` with one difference: a YAML
`space` replaces the default space, and `--set space.<key>=<dist>` replaces one key's
distribution (`null` drops it), where a deep merge would mix two distributions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from rayvid.config import (Config, ConfigError, _is_model, _merge, _strip_optional, parse_overrides,
                           parse_value, read_yaml, smoke_overrides, to_dict, validate, with_values)
from rayvid.core import fourth_place as fp
from rayvid.train.config import SIGMOID_PRESETS, TrainJobConfig

KINDS = ("uniform", "loguniform", "quniform", "randint", "choice", "grid", "value")
NUMERIC = ("uniform", "loguniform", "quniform", "randint")

# Covers the list: gate, test-time weighting, qFDA mix and draws, loss stages,
# learning rate and dropout. Ranges bracket the 4th place's code and write-up values.
DEFAULT_SPACE: dict[str, Any] = {
    "gate.det_min": {"uniform": [0.5, 0.9]},
    "gate.quality_min": {"uniform": [15.0, 40.0]},
    "fusion.kind": {"choice": ["bands", "power"]},
    "fusion.cuts": {"choice": [list(fp.BAND_CUTS), list(fp.POSTER_BAND_CUTS)]},
    "fusion.power": {"uniform": [0.5, 3.0]},
    "qfda.mix": {"choice": [list(fp.QFDA_MIX), [0.1, 0.6, 0.3], [0.4, 0.5, 0.1]]},
    "qfda.n_draws": {"choice": [fp.QFDA_N_DRAWS, 7]},
    "loss.stages": {"choice": list(SIGMOID_PRESETS)},  # fourth_place, ce, start_combine
    "optim.lr": {"loguniform": [5e-5, 3e-3]},
    "model.dropout": {"uniform": [0.1, 0.6]},
    "model.head_bias": {"choice": ["zero", "prior"]},
}

# Where rayvid's defaults deliberately differ from the 4th place's released code: the
# `--compare-defaults` trial takes these (and `TrainJobConfig()`'s other values) for every
# searched key, so it is their code's recipe whatever rayvid's defaults become.
FOURTH_PLACE_CODE: dict[str, Any] = {
    "optim.lr": fp.LR,  # Adam 1.5e-4 (rayvid's default is higher: docs/benchmarks.md)
    "optim.warmup": "constant",  # 2e-5 held for 9 epochs, then a jump to lr
    "model.head_bias": "zero",  # PyTorch's default output bias (rayvid: the class prior)
}


@dataclass(frozen=True)
class Distribution:
    """One searched key: `kind` from KINDS and its arguments (bounds, or the values)."""

    kind: str
    args: tuple

    @property
    def structured(self) -> bool:
        """Values are lists/mappings, sent through Tune as JSON strings."""
        return self.kind in ("choice", "grid", "value") and any(
            isinstance(v, (list, tuple, Mapping)) for v in self.values)

    @property
    def values(self) -> tuple:
        return (self.args[0],) if self.kind == "value" else self.args

    def encode(self, value: Any) -> Any:
        """A config value as Tune carries it (the matching choice's exact string if any;
        None as NaN for numeric kinds: Tune compares a preset point with the bounds)."""
        if value is None and self.kind in NUMERIC:
            return math.nan
        if not self.structured:
            return value
        for v in self.values:
            if v == to_dict(value):
                return _json(v)
        return _json(value)

    def decode(self, value: Any) -> Any:
        if hasattr(value, "item") and not isinstance(value, (str, bytes)):
            value = value.item()  # numpy scalar -> Python, for the strict config checks
        if self.kind in NUMERIC and isinstance(value, float) and math.isnan(value):
            return None
        return json.loads(value) if self.structured and isinstance(value, str) else value

    def to_tune(self):
        """The `ray.tune` search-space object (Ray imported here only)."""
        from ray import tune

        a = self.args
        if self.kind in ("choice", "grid"):
            values = [self.encode(v) for v in a]
            return tune.choice(values) if self.kind == "choice" else tune.grid_search(values)
        if self.kind == "value":
            return self.encode(a[0])
        return {"uniform": tune.uniform, "loguniform": tune.loguniform,
                "quniform": tune.quniform, "randint": tune.randint}[self.kind](*a)


def _yaml_float(value: Any) -> Any:
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def _json(value: Any) -> str:
    return json.dumps(to_dict(value), separators=(",", ":"))


def parse_distribution(key: str, spec: Any) -> Distribution:
    """`{"uniform": [lo, hi]}` etc. -> Distribution, or ConfigError naming `key`."""
    if not isinstance(spec, Mapping) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(f"space {key}: expected one of {{{', '.join(KINDS)}: ...}}, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind == "value":
        return Distribution(kind, (args,))
    if not isinstance(args, (list, tuple)) or not args:
        raise ConfigError(f"space {key}: {kind} needs a non-empty list, got {args!r}")
    if kind in ("choice", "grid"):
        return Distribution(kind, tuple(args))
    args = [_yaml_float(v) for v in args]  # YAML 1.1 reads 1e-3 (no dot) as a string
    want = 3 if kind == "quniform" else 2
    if len(args) != want or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                    for v in args):
        raise ConfigError(f"space {key}: {kind} needs {want} numbers, got {args!r}")
    if not args[0] < args[1] or (kind == "loguniform" and args[0] <= 0):
        raise ConfigError(f"space {key}: {kind} bounds must satisfy "
                          f"{'0 < ' if kind == 'loguniform' else ''}lo < hi, got {args!r}")
    return Distribution(kind, tuple(args))


def check_key(key: str, cls: type = TrainJobConfig) -> None:
    """ConfigError unless `key` names a setting (not a whole section) of config `cls`."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part not in cls.model_fields:
            raise ConfigError(f"space: unknown key {key!r} ({'.'.join(parts[:i + 1])!r} is not "
                              f"in {', '.join(sorted(cls.model_fields))})")
        cls, _ = _strip_optional(cls.model_fields[part].annotation)
        if i < len(parts) - 1 and not _is_model(cls):
            raise ConfigError(f"space: unknown key {key!r} ({'.'.join(parts[:i + 1])!r} is a "
                              f"setting: give it one of {{{', '.join(KINDS)}: ...}})")
    if _is_model(cls):
        raise ConfigError(f"space: {key!r} is a section; search its settings, e.g. {key}.<name>")


def flatten_space(space: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections (`{gate: {det_min: {...}}}`, as `--set` builds) -> dotted keys."""
    out: dict[str, Any] = {}
    for k, v in space.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v and not any(kind in v for kind in KINDS):
            out.update(flatten_space(v, key + "."))
        else:
            out[key] = v
    return out


class SearchSection(Config):
    """How the sweep runs. Trial resources are per Train worker of a trial (one worker
    unless `base.train.num_workers` says otherwise); they replace `base.train`'s in
    trials only, so `best.yaml` keeps the base's resources for the full training run."""

    num_samples: int = Field(12, ge=1)
    max_concurrent: int = Field(0, ge=0)  # 0: as many trials as the cluster's CPUs/GPUs hold
    metric: str = "fold_map"
    mode: Literal["min", "max"] = "max"
    fold: int = Field(0, ge=0)  # the held-out fold every trial is scored on
    arch: str = "M5"
    # BasicVariantGenerator (ships with Ray); optuna/hyperopt if installed
    searcher: Literal["random", "optuna", "hyperopt"] = "random"
    grace_period: int = Field(2, ge=1)  # ASHA: epochs before a trial can be stopped
    reduction_factor: int = Field(2, ge=2)
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)  # e.g. 0.25: four trials share a GPU (small MLP)
    driver_cpus: float = Field(0.25, gt=0)  # the trial's process only builds and waits on Train
    # Ray Data passes the trial runs itself (counting gated clips, the held-out fold) are
    # scheduled inside the trial's placement group, so it holds this much for them (>= 1).
    data_cpus: float = Field(1.0, ge=1)
    trial_retries: int = Field(0, ge=0)  # Tune restarts of a trial whose process died
    seed: int = 0
    compare_defaults: bool = False  # one extra trial at the 4th place's code defaults


class TuneJobConfig(Config):
    name: str = "rayvid-tune"
    base: TrainJobConfig = TrainJobConfig()
    search: SearchSection = SearchSection()
    space: dict[str, Any | None] = Field(default_factory=lambda: dict(DEFAULT_SPACE))

    @model_validator(mode="after")
    def _check(self) -> "TuneJobConfig":
        if not self.distributions:
            raise ValueError("space is empty: give at least one key to search")
        if not 0 <= self.search.fold < self.base.folds.k:
            raise ValueError(f"search.fold {self.search.fold} is not a fold of "
                             f"base.folds.k={self.base.folds.k}")
        from rayvid.model.architectures import MODELS  # torch: imported when checked only

        if self.search.arch not in MODELS:
            raise ValueError(f"search.arch {self.search.arch!r} is not a model ({', '.join(MODELS)})")
        return self

    @property
    def distributions(self) -> dict[str, Distribution]:
        """Dotted key -> Distribution, validated; keys set to null are not searched."""
        out = {}
        for key, spec in flatten_space(self.space).items():
            check_key(key)
            if spec is not None:
                out[key] = parse_distribution(key, spec)
        return out


def decode_params(cfg: TuneJobConfig, params: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's Tune config -> `{dotted key: value}` for `with_values`."""
    dists = cfg.distributions
    return {k: dists[k].decode(v) for k, v in params.items() if k in dists}


def trial_config(cfg: TuneJobConfig, params: Mapping[str, Any],
                 with_resources: bool = True) -> TrainJobConfig:
    """The TrainJobConfig a trial trains (ConfigError on a bad value or combination).
    A sweep over `openset.noise` scores every trial's held-out fold with the same val
    noise clips (`openset.score_noise`), so trials with and without noise compare."""
    values = decode_params(cfg, params)
    if "openset.noise" in cfg.distributions:
        values["openset.score_noise"] = True
    if with_resources:
        s = cfg.search
        values.update({"train.cpus_per_worker": s.cpus_per_trial,
                       "train.use_gpu": s.gpus_per_trial > 0})
        if s.gpus_per_trial > 0:
            values["train.gpus_per_worker"] = s.gpus_per_trial
    return with_values(cfg.base, values)


def fourth_place_config() -> TrainJobConfig:
    """`TrainJobConfig()` with the 4th place's code values where rayvid's defaults differ
    (a key the config no longer has is skipped)."""
    known = {}
    for key, value in FOURTH_PLACE_CODE.items():
        try:
            check_key(key)
        except ConfigError:
            continue
        known[key] = value
    return with_values(TrainJobConfig(), known)


def defaults_point(cfg: TuneJobConfig) -> dict[str, Any]:
    """The searched keys at the 4th place's code defaults (`fourth_place_config()`),
    encoded for Tune (a choice that resolves to that value, e.g. the loss preset
    `fourth_place`, is taken as is); fixed (`value`) keys keep their value."""
    ref_cfg = fourth_place_config()
    ref = to_dict(ref_cfg)
    point = {}
    for key, dist in cfg.distributions.items():
        if dist.kind != "value":
            point[key] = dist.encode(_choice_for(key, dist, ref_cfg, _at(ref, key)))
    return point


def _at(data: Mapping, key: str) -> Any:
    for part in key.split("."):
        data = data[part]
    return data


def _choice_for(key: str, dist: Distribution, cfg: TrainJobConfig, value: Any) -> Any:
    """The value of `dist` that sets `key` of `cfg` to `value`, else `value` itself."""
    if dist.kind not in ("choice", "grid"):
        return value
    for v in dist.values:
        if to_dict(v) == value:
            return v
    for v in dist.values:
        try:
            if _at(to_dict(with_values(cfg, {key: v})), key) == value:
                return v
        except ConfigError:
            continue
    return value


def ray_param_space(cfg: TuneJobConfig) -> dict[str, Any]:
    return {k: d.to_tune() for k, d in cfg.distributions.items()}


def load_tune_config(path: str | Path | None = None,
                     overrides: Sequence[str] = ()) -> TuneJobConfig:
    """Defaults <- YAML <- `--set`, strictly checked, with `space` replaced per key."""
    data = read_yaml(path) if path is not None else {}
    space = flatten_space(data.pop("space", None) or DEFAULT_SPACE)
    rest = []
    for item in overrides:
        key, eq, raw = item.partition("=")
        if key.strip().startswith("space.") and eq:
            space[key.strip()[len("space."):]] = parse_value(key.strip(), raw)
        else:
            rest.append(item)
    set_data = parse_overrides(rest, TuneJobConfig)
    merged = _merge(_merge(to_dict(TuneJobConfig()), data), set_data)
    merged["space"] = space
    return validate(TuneJobConfig, merged, Path(path) if path is not None else None, data, set_data)


def smoke_tune_overrides() -> list[str]:
    """`jobs/tune.py --smoke-test`: the train smoke settings as the base, then the sweep's
    own (both from configs/smoke.yaml)."""
    return [f"base.{item}" for item in smoke_overrides("train")] + smoke_overrides("tune")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
