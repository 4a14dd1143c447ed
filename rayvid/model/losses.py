"""Losses, registered by name, their weighted mix and the staged mix over training (pure torch).

Every loss maps `logits (B, C) float` and `target (B,) int64` (0 = other/noise,
1..C-1 = identity) to a scalar:

- `focal`: per-class sigmoid focal loss (4th place), gamma 2, no alpha.
- `ce`: softmax cross-entropy.
- `uir`: Unknown Identity Rejection (iQIYI's open-set loss): noise clips are pushed towards
  the uniform distribution over the known classes instead of into a class of their own.
- `margin` (`arcface`, `cosface` presets): the combined margin `cos(m1*theta + m2) - m3`,
  scaled by s, on cosine logits (arcface_torch's `CombinedMarginLoss`).

`MixedLoss({"ce": 0.25, "focal": 0.75})` sums them; `LossSchedule` switches the mix at
fractions of the total training steps, so it behaves the same at any dataset size.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rayvid.core import fourth_place as fp

LOSSES: dict[str, Callable[..., nn.Module]] = {}


def register_loss(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a loss factory `(**kwargs) -> nn.Module`."""

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        LOSSES[name] = factory
        return factory

    return deco


def build_loss(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered loss; unknown names raise ValueError listing the known ones."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known: {sorted(LOSSES)}")
    return LOSSES[name](**kwargs)


@register_loss("focal")
class FocalLoss(nn.Module):
    """Per-class sigmoid focal loss on the one-hot target (4th-place code), no alpha.

    Per class: `-(1 - p_t)^gamma * log(p_t)`, p_t = sigmoid(z) for the target class and
    1 - sigmoid(z) otherwise; summed over classes, averaged over the batch. Computed in
    log space (`p_t = sigmoid(s*z)`, `s = +-1`) so large logits neither overflow nor give log(0).
    """

    def __init__(self, gamma: float = 2.0) -> None:
        super().__init__()
        self.gamma = float(gamma)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        sign = F.one_hot(target, logits.shape[-1]).to(logits.dtype) * 2 - 1
        z = logits * sign
        log_pt = F.logsigmoid(z)
        modulator = torch.exp(self.gamma * F.logsigmoid(-z))  # (1 - p_t)^gamma
        return -(modulator * log_pt).sum(dim=-1).mean()


@register_loss("ce")
class CrossEntropy(nn.Module):
    """Softmax cross-entropy over all C classes (class 0 = other included)."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = float(label_smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)


@register_loss("uir")
class UIRLoss(nn.Module):
    """Unknown Identity Rejection (Yu et al. 2019, used in iQIYI's own system).

    `L = CE(labelled, over classes 1..C-1) + lam * mean_noise( -(1/n) sum_i log p_i )`,
    p = softmax over the n = C-1 known classes. The noise term is minimal (= log n) exactly
    when p is uniform: noise clips are pushed away from every identity. Logit 0 ("other") is
    not used: UIR replaces the dedicated noise class. A batch without labelled (or noise)
    samples contributes 0 for that term.
    """

    def __init__(self, lam: float = 1.0) -> None:
        super().__init__()
        self.lam = float(lam)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits[:, 1:], dim=-1)
        known = target > 0
        zero = logits.new_zeros(())
        cls = F.nll_loss(log_p[known], target[known] - 1) if known.any() else zero
        rej = -log_p[~known].mean(dim=-1).mean() if (~known).any() else zero
        return cls + self.lam * rej


@register_loss("margin")
class MarginLoss(nn.Module):
    """Combined margin on cosine logits: target logit `cos(m1*theta + m2) - m3`, all times s.

    ArcFace: m2 = 0.5 (3rd place: s = 30); CosFace: m3 = 0.35; m1 = 1, m2 = m3 = 0 is plain
    scaled-cosine CE. `gamma > 0` makes it a softmax focal loss on the margin logits (the
    3rd place combined ArcFace with focal). Input: cosine logits `(B, C)` in [-1, 1].
    """

    def __init__(self, s: float = 30.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0, gamma: float = 0.0) -> None:
        super().__init__()
        self.s, self.m1, self.m2, self.m3, self.gamma = float(s), float(m1), float(m2), float(m3), float(gamma)

    def margin_logits(self, cosine: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """`(B, C)` cosines -> `(B, C)` scaled logits with the margin on the target class."""
        cos_t = cosine.gather(1, target[:, None]).clamp(-1.0, 1.0)
        if self.m1 != 1.0 or self.m2 != 0.0:
            theta = torch.acos(cos_t.clamp(-1 + 1e-7, 1 - 1e-7))
            cos_m = torch.cos(self.m1 * theta + self.m2)
            if self.m1 == 1.0:
                # insightface: past theta = pi - m2 the margin would make cos increase again;
                # fall back to a CosFace-like penalty there so the logit stays monotone.
                th, mm = math.cos(math.pi - self.m2), math.sin(math.pi - self.m2) * self.m2
                cos_m = torch.where(cos_t > th, cos_m, cos_t - mm)
        else:
            cos_m = cos_t
        return cosine.scatter(1, target[:, None], cos_m - self.m3) * self.s

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(self.margin_logits(logits, target), dim=-1).gather(1, target[:, None])
        if self.gamma == 0.0:
            return -log_p.mean()
        return -((1 - log_p.exp()) ** self.gamma * log_p).mean()


@register_loss("arcface")
def arcface(s: float = 30.0, m: float = 0.5, gamma: float = 0.0) -> MarginLoss:
    """ArcFace preset of the margin loss (3rd place: s = 30, m = 0.5)."""
    return MarginLoss(s=s, m2=m, gamma=gamma)


@register_loss("cosface")
def cosface(s: float = 30.0, m: float = 0.35, gamma: float = 0.0) -> MarginLoss:
    """CosFace preset of the margin loss (m3 = 0.35)."""
    return MarginLoss(s=s, m2=0.0, m3=m, gamma=gamma)


class MixedLoss(nn.Module):
    """Weighted sum of registered losses, e.g. `MixedLoss({"ce": 0.02, "focal": 0.98})`.

    `options` gives constructor kwargs per loss name (`{"uir": {"lam": 0.5}}`). Weights can be
    changed between steps with `set_weights` (for a `LossSchedule`); a loss with weight 0
    is not computed.
    """

    def __init__(self, weights: Mapping[str, float], options: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        super().__init__()
        options = options or {}
        unknown = set(options) - set(weights)
        if unknown:
            raise ValueError(f"options for losses not in the mix: {sorted(unknown)}")
        self.losses = nn.ModuleDict({name: build_loss(name, **options.get(name, {})) for name in weights})
        self.weights: dict[str, float] = {}
        self.set_weights(weights)

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Replace the weights; every name must be one of the losses built at construction."""
        missing = set(weights) - set(self.losses)
        if missing:
            raise ValueError(f"losses {sorted(missing)} are not in this MixedLoss ({sorted(self.losses)})")
        self.weights = {name: float(weights.get(name, 0.0)) for name in self.losses}

    def components(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unweighted value of every loss with a non-zero weight (for logging)."""
        return {n: self.losses[n](logits, target) for n, w in self.weights.items() if w != 0.0}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        parts = self.components(logits, target)
        return sum((self.weights[n] * v for n, v in parts.items()), logits.new_zeros(()))


def uir_rejection(logits: torch.Tensor) -> torch.Tensor:
    """UIR's rejection term per sample: `-(1/n) sum_i log p_i`, p = softmax over the n known
    classes (logits 1..C-1); minimal (log n) exactly when p is uniform. (B, C) -> (B,)."""
    return -F.log_softmax(logits[:, 1:], dim=-1).mean(dim=-1)


OPEN_SET_MODES = ("class", "uir", "both")


class OpenSetLoss(nn.Module):
    """An open-set recipe around a head's loss mix (`rayvid.train.config.OpenSetSection`).

    Noise samples have target 0. mode:
    - "class": the mix sees every sample; noise is class 0 (the 4th place's `other`).
    - "uir": the mix sees the labelled samples only; noise samples get UIR's rejection term
      (`uir_rejection` of `scale * logits`: the cosine heads' scale, so the softmax is the
      one their margin loss trains), weighted `lam`.
    - "both": the mix on every sample (class 0) plus the rejection term on noise.
    The term is on from `start` (a fraction of the total steps, `set_progress`). A batch
    without noise (or, for "uir", without labelled samples) contributes 0 for that part.
    """

    def __init__(self, base: "MixedLoss", mode: str, lam: float = 1.0, start: float = 0.0,
                 scale: float = 1.0) -> None:
        super().__init__()
        if mode not in OPEN_SET_MODES:
            raise ValueError(f"open-set mode must be one of {OPEN_SET_MODES}, got {mode!r}")
        self.base, self.mode = base, mode
        self.lam, self.start, self.scale = float(lam), float(start), float(scale)
        self.progress = 0.0

    @property
    def losses(self) -> nn.ModuleDict:
        """The wrapped mix's named losses, so callers see the same terms as without a recipe."""
        return self.base.losses

    def set_weights(self, weights: Mapping[str, float]) -> None:
        self.base.set_weights(weights)

    def set_progress(self, progress: float) -> None:
        """progress: step / total steps, in [0, 1]: the term is on from `start`."""
        self.progress = float(progress)

    def components(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        noise = target == 0
        zero = logits.new_zeros(())
        if self.mode == "uir":
            known = ~noise
            parts = self.base.components(logits[known], target[known]) if known.any() else {}
        else:
            parts = self.base.components(logits, target)
        if self.mode != "class" and self.lam > 0 and self.progress >= self.start:
            parts["uir_rejection"] = uir_rejection(self.scale * logits[noise]).mean() \
                if noise.any() else zero
        return parts

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        parts = self.components(logits, target)
        total = logits.new_zeros(())
        for name, value in parts.items():
            total = total + (self.lam if name == "uir_rejection" else self.base.weights[name]) * value
        return total


class LossSchedule:
    """Loss mixes over training: `stages[k] = (start, weights)`, start = fraction of total steps.

    The first stage must start at 0 and starts must increase. `at(progress)` gives the weights
    of the last stage whose start is <= progress (progress = step / total_steps, in [0, 1]).
    """

    def __init__(self, stages: Sequence[tuple[float, Mapping[str, float]]]) -> None:
        if not stages or stages[0][0] != 0.0:
            raise ValueError("the first loss stage must start at fraction 0.0")
        starts = [float(s) for s, _ in stages]
        if any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] > 1.0:
            raise ValueError(f"stage starts must increase within [0, 1], got {starts}")
        self.starts = starts
        self.stages = [dict(w) for _, w in stages]

    @property
    def names(self) -> list[str]:
        """Every loss used by some stage (build one `MixedLoss` over these)."""
        return sorted({n for w in self.stages for n in w})

    def at(self, progress: float) -> Mapping[str, float]:
        k = max(bisect.bisect_right(self.starts, progress) - 1, 0)
        return dict(self.stages[k])


# The 4th place's mixes and stages (rayvid.core.fourth_place holds the numbers).
START = fp.START
COMBINE = fp.COMBINE
FOURTH_PLACE_STAGES: tuple[tuple[float, Mapping[str, float]], ...] = fp.LOSS_STAGES
