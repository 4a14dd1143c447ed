"""Learning-rate schedules in fractions of the total steps (pure python, plus a torch helper).

The 4th place counted epochs (warm-up 9 epochs at 2e-5, then 1.5e-4 halved every 50
epochs), tuned for ~180 steps per epoch on the full release; on a small data set the same
epoch counts leave the model far from converged. Here every length is a fraction of
`total_steps`, so the shape of the schedule is the same at any data-set size:

    sched = LRSchedule(base_lr=1.5e-4, warmup_fraction=0.06, warmup_lr=2e-5, kind="cosine")
    for step in range(total):
        apply(optimizer, sched.lr_at(step, total))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rayvid.core import fourth_place as fp

_KINDS = ("cosine", "step", "constant")
_WARMUPS = ("linear", "constant")


@dataclass(frozen=True)
class LRSchedule:
    """Warm-up, then step decay or cosine annealing.

    - warm-up: the first `round(warmup_fraction * total_steps)` steps; "linear" goes from
      `warmup_lr` (step 0) towards `base_lr`, "constant" holds `warmup_lr` (the 4th-place code:
      a separate Adam at 2e-5, then a fresh one at 1.5e-4).
    - after it, progress r runs from 0 (first step after warm-up) to 1 (last step):
      "step": `base_lr * step_gamma ** floor(r / step_fraction)`;
      "cosine": `min_lr + (base_lr - min_lr) * (1 + cos(pi * r)) / 2`, reaching min_lr at the last step;
      "constant": base_lr.
    """

    base_lr: float = fp.LR
    kind: str = "cosine"
    warmup_fraction: float = fp.WARMUP_FRACTION
    warmup_lr: float = fp.WARMUP_LR
    warmup: str = "linear"
    step_fraction: float = fp.STEP_FRACTION
    step_gamma: float = fp.LR_GAMMA
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown lr schedule kind {self.kind!r}; known: {list(_KINDS)}")
        if self.warmup not in _WARMUPS:
            raise ValueError(f"unknown warm-up {self.warmup!r}; known: {list(_WARMUPS)}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.kind == "step" and not self.step_fraction > 0.0:
            raise ValueError(f"step_fraction must be > 0, got {self.step_fraction}")

    def warmup_steps(self, total_steps: int) -> int:
        """Number of warm-up steps for a run of `total_steps` optimizer steps."""
        return int(round(self.warmup_fraction * total_steps))

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate for 0-based `step` of `total_steps`; steps past the end keep the last lr."""
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        w = self.warmup_steps(total_steps)
        if step < w:
            if self.warmup == "constant":
                return self.warmup_lr
            return self.warmup_lr + (self.base_lr - self.warmup_lr) * step / w
        r = min(max((step - w) / max(total_steps - w - 1, 1), 0.0), 1.0)
        if self.kind == "step":
            # The small epsilon keeps exact boundaries (r = k * step_fraction) on the new stage.
            return self.base_lr * self.step_gamma ** math.floor(r / self.step_fraction + 1e-9)
        if self.kind == "cosine":
            return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * r))
        return self.base_lr


# Their code: 9 of 150 epochs at a constant 2e-5, then 1.5e-4 halved every 50 epochs
# (rayvid.core.fourth_place.STEP_FRACTION says why that is 50/140 of the post-warm-up run).
FOURTH_PLACE_LR = LRSchedule(kind="step", warmup="constant")
# Their poster: the same warm-up length and peak, then cosine annealing (a reference shape;
# rayvid's own default is `TrainJobConfig().optim`, see rayvid.train.worker.lr_schedule).
POSTER_LR = LRSchedule(kind="cosine", warmup="linear")


def apply(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set `lr` on every parameter group of `optimizer`."""
    for group in optimizer.param_groups:
        group["lr"] = lr
