"""Checkpoints as directories (pure torch): save a model, rebuild it from the directory alone.

    CKPT/
      model.pt            # unwrapped state_dict (no DDP `module.`, no torch.compile `_orig_mod.`)
      model_config.json   # {"arch": "M5", "in_dim": 512, "num_classes": 10035, ..., "extra": {...}}
      job_config.yaml     # the resolved job config, when given

    save_checkpoint(ckpt_dir, model, job_config=cfg, extra={"epoch": 3, "fold": 0, "map": 0.81})
    model, meta = load_model(ckpt_dir)   # eval mode; meta = model_config.json as a dict

The directory is written under a temporary name and renamed into place (`rayvid.core.atomic`),
so a reader never sees half a checkpoint; an existing checkpoint of the same name is replaced.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from rayvid.core.atomic import atomic_path, write_json, write_text
from rayvid.model.architectures import MODELS, RayvidModel, build_from_config

MODEL_FILE = "model.pt"
CONFIG_FILE = "model_config.json"
JOB_CONFIG_FILE = "job_config.yaml"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / DataParallel (`.module`) and torch.compile (`._orig_mod`)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def clean_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP `module.` and torch.compile `_orig_mod.` prefixes (nested in any order); CPU copies."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value.detach().cpu()
    return out


def _jsonable(obj: Any) -> Any:
    # Metrics often arrive as numpy scalars or arrays.
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def save_checkpoint(
    directory: str | os.PathLike, model: nn.Module, *,
    job_config: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write the checkpoint directory atomically and return its path.

    model: a `RayvidModel`, possibly wrapped in DDP or torch.compile.
    job_config: the resolved job config (a mapping or a dataclass), saved as YAML.
    extra: JSON-serialisable facts (epoch, fold, metrics, the qFF weighting it expects).
    """
    final = Path(directory)
    bare = unwrap_model(model)
    if not isinstance(bare, RayvidModel):
        raise TypeError(f"can only checkpoint a rayvid model (with model_config()), got {type(bare).__name__}")
    config = {**bare.model_config(), "extra": dict(extra or {})}
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(final) as tmp:
        tmp.mkdir()
        torch.save(clean_state_dict(bare.state_dict()), tmp / MODEL_FILE)
        write_json(tmp / CONFIG_FILE, config, default=_jsonable)
        if job_config is not None:
            if dataclasses.is_dataclass(job_config) and not isinstance(job_config, type):
                job_config = dataclasses.asdict(job_config)
            write_text(tmp / JOB_CONFIG_FILE, yaml.safe_dump(dict(job_config), sort_keys=False))
    return final


def read_model_config(directory: str | os.PathLike) -> dict[str, Any]:
    """`model_config.json` of a checkpoint directory, as a dict (arch, kwargs, "extra")."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {directory}: missing {CONFIG_FILE} (is it a rayvid checkpoint directory?)")
    return json.loads(path.read_text())


def load_model(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[RayvidModel, dict[str, Any]]:
    """Rebuild the model of a checkpoint directory (eval mode) -> (model, model_config.json dict)."""
    directory = Path(directory)
    meta = read_model_config(directory)
    weights = directory / MODEL_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint {directory}: missing {MODEL_FILE}")
    config = {k: v for k, v in meta.items() if k != "extra"}
    arch = config.get("arch")
    if arch not in MODELS:
        raise ValueError(f"checkpoint {directory}: unknown arch {arch!r}; known: {sorted(MODELS)}")
    model = build_from_config(config)
    state = torch.load(weights, map_location="cpu", weights_only=True)  # moved with the model below
    try:
        model.load_state_dict(clean_state_dict(state))
    except RuntimeError as err:
        raise RuntimeError(f"checkpoint {directory}: weights do not fit arch {arch!r}: {err}") from err
    calibration = (meta.get("extra") or {}).get("calibration")
    if calibration:  # written after training (`rayvid.model.calibration.calibrate_checkpoint`)
        model.logit_scale, model.logit_bias = float(calibration["a"]), float(calibration["b"])
    model.to(map_location)
    return model.eval(), meta
