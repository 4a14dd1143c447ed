"""An ensemble of checkpoints scored as the 4th place blended: a weighted sum of sigmoids.

    ens = Ensemble.from_run("runs/exp1")       # reads runs/exp1/ensemble.json
    scores = ens.scores(clip_feats)            # (n, 512) float32 -> (n, C) float32
    scores = ens.scores(inputs.build(parts, spec))   # mixed kinds: a dict of inputs

The run folder's `ensemble.json` (members, weights, the qFF weighting) is read by
`rayvid.model.run_folder`; its keys other than the members are kept in `Ensemble.info`.
`scores` is the weighted *sum*; `run_folder.weighted_mean` turns it into the [0, 1] mean.
Pure torch, no Ray: Ray Data batch prediction and Ray Serve both wrap this class.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from rayvid.core.inputs import COLUMNS, INPUT_KINDS
from rayvid.core.inputs import usable as _usable
from rayvid.model.checkpoints import load_model
from rayvid.model.run_folder import blend, read_ensemble


class Ensemble:
    """Members (rayvid models) that agree on `num_classes`, with blend weights. Members may
    take different input kinds (`rayvid.core.inputs`): `scores` feeds each its own.

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
        if len(classes) != 1:
            raise ValueError(f"ensemble members disagree on num_classes: {sorted(classes)}")
        self.members = [m.eval() for m in members]
        self.kinds = [getattr(m, "input_kind", "clip_vector") for m in members]
        self.weights = weights
        self.batch_size = int(batch_size)
        self.info = dict(info or {})
        self._num_classes = classes.pop()
        self.device = torch.device(device)
        for m in self.members:
            m.to(self.device)

    @property
    def input_kinds(self) -> tuple[str, ...]:
        """The input kinds the members need, in `rayvid.core.inputs.INPUT_KINDS` order."""
        return tuple(k for k in INPUT_KINDS if k in self.kinds)

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

    def scores(self, x: np.ndarray | Mapping[str, np.ndarray], mask: np.ndarray | None = None,
               weights: Sequence[float] | None = None) -> np.ndarray:
        """Blend of the members' scores (`RayvidModel.score_outputs`: `sigmoid(logit_scale * output
        + logit_bias)`, calibrated for cosine heads), `(n, C) float32`.

        x: the inputs as `rayvid.core.inputs.build` returns them (`x`, `faces` +
            `face_mask`, `mm` + `mm_mask`: the columns of every member's kind), or, for an
            ensemble of clip-vector members only, the `(n, 512)` clip features themselves.
        mask: with an array `x` of another kind: its mask (face mask or modality presence).
        weights: one per member for this call (a served ensemble's current weights);
            None uses `self.weights`.

        Per clip, only the members that can use it (`rayvid.core.inputs.usable`: a face
        model needs a face) are blended, rescaled to the full weight: a clip every member
        can use gets the plain weighted sum (the 4th place's blend), a faceless clip the
        multimodal members' share scaled up, and a clip no member can use all zeros.
        """
        weights = self.weights if weights is None else [float(w) for w in weights]
        sums, used = self.partial_scores(x, mask, weights)
        return blend(sums, used, float(sum(weights)))

    def partial_scores(self, x: np.ndarray | Mapping[str, np.ndarray], mask: np.ndarray | None = None,
                       weights: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The parts of `scores` that add up across groups of members (Serve's member
        deployments each score a group): `(sums (n, C), used (n,))`, the weighted sum of the
        sigmoid scores of the members that can use each clip, and those members' total
        weight. `blend(sum of sums, sum of used, total weight)` is `scores`."""
        weights = self.weights if weights is None else [float(w) for w in weights]
        if len(weights) != len(self.members):
            raise ValueError(f"{len(self.members)} members but {len(weights)} weights")
        inputs = self._inputs(x, mask)
        n = len(next(iter(inputs.values())))
        usable = {k: np.asarray(_usable(k, inputs), bool) for k in self.input_kinds}
        out = np.empty((n, self.num_classes), dtype=np.float32)
        used = np.zeros(n, np.float32)
        for w, kind in zip(weights, self.kinds):
            used += np.float32(w) * usable[kind]
        with torch.inference_mode():
            for lo in range(0, n, self.batch_size):
                hi = min(lo + self.batch_size, n)
                cols = {c: torch.from_numpy(np.ascontiguousarray(v[lo:hi])).to(self.device)
                        for c, v in inputs.items() if c in _ALL_COLUMNS}
                total = torch.zeros((hi - lo, self.num_classes), dtype=torch.float32,
                                    device=self.device)
                for m, w, kind in zip(self.members, weights, self.kinds):
                    use = torch.from_numpy(usable[kind][lo:hi]).to(self.device)[:, None].float()
                    args = [cols[c].float() if cols[c].dtype == torch.float16 else cols[c]
                            for c in COLUMNS[kind]]
                    total += (w * use) * m.score_outputs(m(*args))
                out[lo:hi] = total.cpu().numpy()
        return out, used

    def _inputs(self, x: np.ndarray | Mapping[str, np.ndarray],
                mask: np.ndarray | None) -> dict[str, np.ndarray]:
        if isinstance(x, Mapping):
            missing = sorted({c for k in self.input_kinds for c in COLUMNS[k]} - set(x))
            if missing:
                raise ValueError(f"the ensemble's members need input column(s) {missing}")
            return dict(x)
        if len(self.input_kinds) != 1:
            raise ValueError(f"members take {list(self.input_kinds)}: pass a dict of inputs")
        kind = self.input_kinds[0]
        cols = COLUMNS[kind]
        arrays = [np.asarray(x, np.float32)] + ([] if mask is None else [np.asarray(mask, bool)])
        if len(arrays) != len(cols):
            raise ValueError(f"{kind} members take {list(cols)}")
        return dict(zip(cols, arrays))

    def __len__(self) -> int:
        return len(self.members)


_ALL_COLUMNS = {c for cols in COLUMNS.values() for c in cols}


def _num_classes(model: nn.Module) -> int:
    if hasattr(model, "model_config"):
        return int(model.model_config()["num_classes"])
    raise TypeError(f"ensemble members must be rayvid models (with model_config()), got {type(model).__name__}")
