"""The model registry and the base class of every registered model (pure torch).

An architecture module registers a builder with `@register_model("name")`; the builder
returns a `RayvidModel`, which remembers its name and constructor kwargs so that a
checkpoint can rebuild it (`rayvid.model.architectures.build_from_config`). This module
imports no architecture: `architectures` and `prototype` both import it, and
`architectures` imports every architecture module, so `build_model` sees them all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from rayvid.core.formats import NUM_IDENTITIES

NUM_CLASSES = NUM_IDENTITIES + 1  # class 0 = other/noise, 1..10034 = id (4th-place convention)

MODELS: dict[str, Callable[..., RayvidModel]] = {}


def register_model(name: str) -> Callable[[Callable[..., RayvidModel]], Callable[..., RayvidModel]]:
    """Decorator: register a builder `(in_dim, num_classes, **kwargs) -> RayvidModel`."""

    def deco(fn: Callable[..., RayvidModel]) -> Callable[..., RayvidModel]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = fn
        return fn

    return deco


class RayvidModel(nn.Module):
    """Base class: remembers its registry name and constructor kwargs."""

    input_kind: str = "clip_vector"
    logit_scale: float = 1.0
    logit_bias: float = 0.0  # with logit_scale: a score calibration (`rayvid.model.calibration`)

    def score_outputs(self, output: torch.Tensor) -> torch.Tensor:
        """The member's score of its raw outputs: `sigmoid(logit_scale * output + logit_bias)`,
        what ensembles blend and fold evaluation ranks."""
        return torch.sigmoid(self.logit_scale * output.float() + self.logit_bias)

    def __init__(self, arch: str, **config: Any) -> None:
        super().__init__()
        self.arch = arch
        self._config = dict(config)

    def model_config(self) -> dict[str, Any]:
        """`{"arch": name, **constructor kwargs}`, JSON-serialisable."""
        return {"arch": self.arch, **self._config}

    @property
    def num_classes(self) -> int:
        return int(self._config["num_classes"])
