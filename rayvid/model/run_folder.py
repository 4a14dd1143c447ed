"""A training run folder's two JSON files, read and written in one place (numpy, no torch).

    RUN/
      ensemble.json   # written by training (`rayvid.train.kfold`): the blend to serve
      serving.json    # written by `rayvid.infer.person_index.calibrate`: the unknown threshold
      folds/0/M5/best/ ...  checkpoint directories (`rayvid.model.checkpoints`)

    ens = read_ensemble("runs/exp1")            # EnsembleSpec: members, weights, weighting
    dirs = ens.member_dirs("runs/exp1")          # checkpoint directories, absolute
    mean = weighted_mean(sums, ens.weights)      # the ONE weighted mean of member scores
    write_serving("runs/exp1", ServingSpec(0.42, {...}))

`ensemble.json`:

    {"members": [{"path": "folds/0/M5/best", "weight": 1.0, "fold": 0, "arch": "M5",
                  "fold_map": 0.81}, ...],
     "weighting": {"kind": "bands", "cuts": [...], "values": [...], "power": 1.0},
     "num_classes": 10035,
     "inputs": {"kinds": ["clip_vector", "multimodal"], "face_set_size": 16,
                "modalities": ["face", "head", "body", "audio"], "dims": [512, 512, 512]}}

`path` is relative to the run folder (an absolute path is kept as is); `weight` defaults to
1.0; `fold`, `arch`, `fold_map`, `weighting`, `num_classes` and `inputs` are optional (older
runs lack them; no `inputs` means clip vectors only, `rayvid.core.inputs.InputSpec`). `serving.json`: `{"unknown_threshold": 0.42, "calibration": {...}}`.
A missing or malformed file raises `RunFolderError` naming the file and the field. Both
files are written under a temporary name and renamed (`rayvid.core.atomic`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rayvid.core.atomic import write_json
from rayvid.core.fusion import Weighting
from rayvid.core.inputs import InputSpec

ENSEMBLE_FILE = "ensemble.json"
SERVING_FILE = "serving.json"


class RunFolderError(ValueError):
    """A missing or malformed run folder file; the message names the file and the field."""


# ------------------------------------------------------------------ the weighted mean


def weighted_mean(weighted_sums: np.ndarray | Sequence[np.ndarray],
                  weights: Sequence[float]) -> np.ndarray:
    """Members' weighted sum of sigmoid scores -> their weighted mean, float32 in [0, 1].

    The 4th place ranked by the plain sum (`Ensemble.scores`; the ranking is the same);
    everything that compares a score with a threshold (`/identify`, the search index,
    calibration) uses this mean, so the units agree.
    weighted_sums: an array of any shape, e.g. `(n, C)`, of sums over members of
        weight * sigmoid score, or a sequence of such partial sums (groups of members,
        as the Serve member deployments return them), added first.
    weights: every member's weight (the divisor is their sum), >= 0 with a positive sum.
    """
    total_weight = _total_weight(weights)
    if isinstance(weighted_sums, np.ndarray):
        total = weighted_sums.astype(np.float32, copy=False)
    else:
        total = np.array(weighted_sums[0], dtype=np.float32, copy=True)
        for part in weighted_sums[1:]:
            total += part
    return total / np.float32(total_weight)


def blend(sums: np.ndarray, used: np.ndarray, total_weight: float) -> np.ndarray:
    """Members' partial results -> the ensemble's weighted sum, `(n, C) float32`.

    sums: `(n, C)` weighted sum of the sigmoid scores of the members that could use each
    clip (`Ensemble.partial_scores`, added over groups of members); used: `(n,)` those
    members' total weight per clip. Each clip is rescaled to `total_weight` (a clip every
    member can use is unchanged: the 4th place's sum); a clip no member could use is all
    zeros. `weighted_mean(blend(...), weights)` is then the weighted mean of the members
    that could use the clip.
    """
    used = np.asarray(used, np.float32)
    scale = np.where(used > 0, np.float32(total_weight) / np.maximum(used, np.float32(1e-12)),
                     np.float32(0))
    return np.asarray(sums, np.float32) * scale[:, None].astype(np.float32)


def _total_weight(weights: Sequence[float]) -> float:
    weights = [float(w) for w in weights]
    if not weights or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be finite numbers >= 0 with a positive sum, got {weights}")
    return sum(weights)


# ------------------------------------------------------------------ ensemble.json


@dataclass(frozen=True)
class Member:
    """One checkpoint of the blend. path: relative to the run folder (or absolute)."""

    path: str
    weight: float = 1.0
    fold: int | None = None
    arch: str | None = None
    fold_map: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The file's form: path, weight, then fold and arch when set; a fold's member always
        records its `fold_map` (null: never evaluated), as training has always written it."""
        out: dict[str, Any] = {"path": self.path, "weight": self.weight}
        if self.fold is not None:
            out["fold"] = self.fold
        if self.arch is not None:
            out["arch"] = self.arch
        if self.fold is not None or self.fold_map is not None:
            out["fold_map"] = self.fold_map
        return out


@dataclass(frozen=True)
class EnsembleSpec:
    """The contents of `ensemble.json`.

    weighting: the qFF weighting the members were trained for; None when the file records
        none (runs older than the field: callers fall back to `Weighting()`).
    num_classes: C as training declared it, or None.
    extra: any other top-level keys, kept and written back unchanged.
    """

    members: tuple[Member, ...]
    weighting: Weighting | None = None
    num_classes: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.members:
            raise RunFolderError(f"{ENSEMBLE_FILE}: members: needs at least one member")
        try:
            _total_weight(self.weights)
        except ValueError as e:
            raise RunFolderError(f"{ENSEMBLE_FILE}: members[].weight: {e}") from None

    @property
    def weights(self) -> list[float]:
        """One blend weight per member, in member order."""
        return [m.weight for m in self.members]

    @property
    def total_weight(self) -> float:
        return sum(self.weights)

    def input_spec(self) -> InputSpec:
        """How to build the members' inputs (`rayvid.core.inputs`): the file's `inputs`
        object, or (runs older than the field) clip vectors only; always with `weighting`."""
        weighting = self.weighting or Weighting()
        raw = self.extra.get("inputs")
        if raw is None:
            return InputSpec(weighting=weighting)
        try:
            return InputSpec.from_json(dict(raw), weighting)
        except (ValueError, TypeError) as e:
            raise RunFolderError(f"{ENSEMBLE_FILE}: inputs: {e}") from None

    def member_dirs(self, run_dir: str | os.PathLike) -> list[Path]:
        """The members' checkpoint directories (relative paths resolved against `run_dir`)."""
        return [Path(run_dir) / m.path for m in self.members]

    def to_json(self) -> dict[str, Any]:
        """The file's form (keys in the order training has always written them)."""
        out: dict[str, Any] = {"members": [m.to_json() for m in self.members]}
        if self.weighting is not None:
            weighting = dataclasses.asdict(self.weighting)
            out["weighting"] = {k: list(v) if isinstance(v, tuple) else v
                                for k, v in weighting.items()}
        if self.num_classes is not None:
            out["num_classes"] = self.num_classes
        return {**out, **self.extra}


def read_ensemble(run_dir: str | os.PathLike) -> EnsembleSpec:
    """Read and check `run_dir/ensemble.json` (no checkpoint is opened)."""
    path = Path(run_dir) / ENSEMBLE_FILE
    if not path.is_file():
        raise RunFolderError(f"run {run_dir} has no {ENSEMBLE_FILE} (is training finished?)")
    spec = _read_object(path)
    entries = _field(path, spec, "members", list)
    members = tuple(_member(path, i, e) for i, e in enumerate(entries))
    weighting = None
    if spec.get("weighting") is not None:
        try:
            weighting = Weighting.from_dict(_field(path, spec, "weighting", dict))
        except (ValueError, TypeError) as e:
            raise RunFolderError(f"{path}: weighting: {e}") from None
    num_classes = spec.get("num_classes")
    if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool)
                                    or num_classes < 2):
        raise RunFolderError(f"{path}: num_classes: expected an integer >= 2, got {num_classes!r}")
    if not members:
        raise RunFolderError(f"{path}: members: needs at least one member")
    if sum(m.weight for m in members) <= 0:
        raise RunFolderError(f"{path}: members[].weight: the weights sum to 0")
    extra = {k: v for k, v in spec.items() if k not in ("members", "weighting", "num_classes")}
    if "inputs" in extra and not isinstance(extra["inputs"], dict):
        raise RunFolderError(f"{path}: inputs: expected an object, got {extra['inputs']!r}")
    out = EnsembleSpec(members, weighting, num_classes, extra)
    try:
        out.input_spec()
    except RunFolderError as e:
        raise RunFolderError(f"{path}: {str(e).split(': ', 1)[1]}") from None
    return out


def write_ensemble(run_dir: str | os.PathLike, spec: EnsembleSpec) -> Path:
    """Write `run_dir/ensemble.json` (temporary name, then rename; the folder is made if
    missing); returns its path."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return write_json(Path(run_dir) / ENSEMBLE_FILE, spec.to_json())


def _member(path: Path, i: int, entry: Any) -> Member:
    where = f"members[{i}]"
    if not isinstance(entry, dict):
        raise RunFolderError(f"{path}: {where}: expected an object, got {type(entry).__name__}")
    unknown = set(entry) - {f.name for f in dataclasses.fields(Member)}
    if unknown:
        raise RunFolderError(f"{path}: {where}: unknown key(s) {', '.join(sorted(unknown))}")
    rel = _field(path, entry, "path", str, where)
    if not rel:
        raise RunFolderError(f"{path}: {where}.path: empty")
    weight = entry.get("weight", 1.0)
    if not _is_number(weight) or not math.isfinite(weight) or weight < 0:
        raise RunFolderError(f"{path}: {where}.weight: expected a number >= 0, got {weight!r}")
    fold, arch, fold_map = entry.get("fold"), entry.get("arch"), entry.get("fold_map")
    if fold is not None and (not isinstance(fold, int) or isinstance(fold, bool)):
        raise RunFolderError(f"{path}: {where}.fold: expected an integer, got {fold!r}")
    if arch is not None and not isinstance(arch, str):
        raise RunFolderError(f"{path}: {where}.arch: expected a string, got {arch!r}")
    if fold_map is not None and not _is_number(fold_map):
        raise RunFolderError(f"{path}: {where}.fold_map: expected a number, got {fold_map!r}")
    return Member(rel, float(weight), fold, arch, None if fold_map is None else float(fold_map))


# ------------------------------------------------------------------ serving.json


@dataclass(frozen=True)
class ServingSpec:
    """The contents of `serving.json`: the calibrated "other/unknown" score threshold
    (units of the weighted mean, [0, 1]) and how it was found (`threshold_for`'s record)."""

    unknown_threshold: float
    calibration: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"unknown_threshold": self.unknown_threshold}
        if self.calibration is not None:
            out["calibration"] = dict(self.calibration)
        return out


def read_serving(run_dir: str | os.PathLike) -> ServingSpec | None:
    """`run_dir/serving.json`, or None when the run was not calibrated yet."""
    path = Path(run_dir) / SERVING_FILE
    if not path.is_file():
        return None
    spec = _read_object(path)
    threshold = spec.get("unknown_threshold")
    if not _is_number(threshold) or not 0.0 <= threshold <= 1.0 + 1e-6:
        raise RunFolderError(f"{path}: unknown_threshold: expected a number in [0, 1], "
                             f"got {threshold!r}")
    calibration = spec.get("calibration")
    if calibration is not None and not isinstance(calibration, dict):
        raise RunFolderError(f"{path}: calibration: expected an object, got {calibration!r}")
    return ServingSpec(float(threshold), calibration)


def write_serving(run_dir: str | os.PathLike, spec: ServingSpec) -> Path:
    """Write `run_dir/serving.json` (temporary name, then rename); returns its path."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return write_json(Path(run_dir) / SERVING_FILE, spec.to_json())


# ------------------------------------------------------------------ JSON checks


def _read_object(path: Path) -> dict[str, Any]:
    import json

    try:
        obj = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunFolderError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise RunFolderError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _field(path: Path, obj: Mapping[str, Any], key: str, kind: type, where: str = "") -> Any:
    name = f"{where}.{key}" if where else key
    if key not in obj:
        raise RunFolderError(f"{path}: {name}: missing")
    if not isinstance(obj[key], kind):
        raise RunFolderError(f"{path}: {name}: expected {kind.__name__}, "
                             f"got {type(obj[key]).__name__}")
    return obj[key]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
