"""An ensemble of checkpoints scored as the 4th place blended: a weighted sum of sigmoids.

    ens = Ensemble.from_run("runs/exp1")       # reads runs/exp1/ensemble.json
    scores = ens.scores(clip_feats)            # (n, 512) float32 -> (n, C) float32

The run folder's `ensemble.json` (members, weights, the qFF weighting) is read by
`rayvid.model.run_folder`; its keys other than the members are kept in `Ensemble.info`.
`scores` is the weighted *sum*; `run_folder.weighted_mean` turns it into the [0, 1] mean.
Pure torch, no Ray: Ray Data batch prediction and Ray Serve both wrap this class.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from rayvid.model.checkpoints import load_model
from rayvid.model.run_folder import read_ensemble


class Ensemble:
    """Members (rayvid models) that agree on `num_classes` and `input_kind`, with blend weights.

    members: models in any mode (they are put in eval mode and moved to `device`).
    weights: one per member, default all 1.0 (the 4th place summed 5 archs x 5 folds).
    batch_size: rows per forward pass in `scores`.
    """

    def __init__(
        self, members: Sequence[nn.Module], weights: Sequence[float] | None = None,
        device: str | torch.device = "cpu", batch_size: int = 4096, info: dict[str, Any] | None = None,
    ) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        weights = [1.0] * len(members) if weights is None else [float(w) for w in weights]
        if len(weights) != len(members):
            raise ValueError(f"{len(members)} members but {len(weights)} weights")
        classes = {_num_classes(m) for m in members}
        kinds = {getattr(m, "input_kind", "clip_vector") for m in members}
        if len(classes) != 1:
            raise ValueError(f"ensemble members disagree on num_classes: {sorted(classes)}")
        if len(kinds) != 1:
            raise ValueError(f"ensemble members disagree on input kind: {sorted(kinds)}")
        self.members = [m.eval() for m in members]
        self.weights = weights
        self.batch_size = int(batch_size)
        self.info = dict(info or {})
        self._num_classes = classes.pop()
        self.input_kind: str = kinds.pop()
        self.device = torch.device(device)
        for m in self.members:
            m.to(self.device)

    @classmethod
    def from_dirs(
        cls, dirs: Sequence[str | os.PathLike], weights: Sequence[float] | None = None,
        device: str | torch.device = "cpu", **kwargs: Any,
    ) -> "Ensemble":
        """Load every checkpoint directory (see `rayvid.model.checkpoints`)."""
        members = [load_model(d)[0] for d in dirs]
        return cls(members, weights, device=device, **kwargs)

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, device: str | torch.device = "cpu", **kwargs: Any) -> "Ensemble":
        """Load the members listed in `run_dir/ensemble.json` with their weights.
        Raises `run_folder.RunFolderError` for a missing or malformed file."""
        spec = read_ensemble(run_dir)
        info = {k: v for k, v in spec.to_json().items() if k != "members"}
        return cls.from_dirs(spec.member_dirs(run_dir), spec.weights, device=device, info=info,
                             **kwargs)

    @property
    def num_classes(self) -> int:
        """C, the number of outputs (class 0 = other)."""
        return self._num_classes

    def to(self, device: str | torch.device) -> "Ensemble":
        """Move every member to `device`."""
        self.device = torch.device(device)
        for m in self.members:
            m.to(self.device)
        return self

    def scores(self, x: np.ndarray, mask: np.ndarray | None = None,
               weights: Sequence[float] | None = None) -> np.ndarray:
        """Weighted sum over members of `sigmoid(logit_scale * output)`, `(n, C) float32`.

        x: `(n, in_dim) float32` fused clip features for clip-vector members; `(n, F, in_dim + 2)`
        face sets for "face_set" members; `(n, sum of modality dims)` for "multimodal".
        mask: `(n, F) bool` face mask, or `(n, 4) bool` modality presence; None when unused.
        weights: one per member for this call (a served ensemble's current weights);
            None uses `self.weights`.
        """
        weights = self.weights if weights is None else [float(w) for w in weights]
        if len(weights) != len(self.members):
            raise ValueError(f"{len(self.members)} members but {len(weights)} weights")
        x = np.asarray(x, dtype=np.float32)
        out = np.empty((len(x), self.num_classes), dtype=np.float32)
        with torch.inference_mode():
            for lo in range(0, len(x), self.batch_size):
                xb = torch.from_numpy(x[lo:lo + self.batch_size]).to(self.device)
                args = [xb]
                if mask is not None:
                    args.append(torch.from_numpy(np.asarray(mask[lo:lo + self.batch_size], dtype=bool)).to(self.device))
                total = torch.zeros((len(xb), self.num_classes), dtype=torch.float32, device=self.device)
                for m, w in zip(self.members, weights):
                    scale = float(getattr(m, "logit_scale", 1.0))
                    total += w * torch.sigmoid(scale * m(*args).float())
                out[lo:lo + len(xb)] = total.cpu().numpy()
        return out

    def __len__(self) -> int:
        return len(self.members)


def _num_classes(model: nn.Module) -> int:
    if hasattr(model, "model_config"):
        return int(model.model_config()["num_classes"])
    raise TypeError(f"ensemble members must be rayvid models (with model_config()), got {type(model).__name__}")
