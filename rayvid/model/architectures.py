"""Model architectures, registered by name (pure torch, no Ray).

`build_model("M5", in_dim=512, num_classes=10035)` builds one of:

- `M1`..`M5`: the 4th-place MLPs over one fused clip feature (method.md §1), input
  `(B, in_dim) float32` -> logits `(B, C)`; class 0 = other/noise.
- `cosine_mlp`: the M5 trunk with a cosine classifier head, for margin losses.
- `attention`: the 3rd place's face-set model: self-attention across faces, NAN-style
  attention pooling, cosine classifier. Input `(B, F, in_dim + 2)` plus a `(B, F)` mask.
- `multimodal`: iQIYI's own idea: face, head, body and audio clip vectors fused by an
  attention over modality embeddings, so a clip with no usable face still gets a score.

Every model has `input_kind` ("clip_vector", "face_set", "multimodal"), `logit_scale`
(multiplies the outputs before a sigmoid when scoring; `s` for cosine heads) and
`model_config()`, a JSON-serialisable dict from which `build_from_config` rebuilds it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Every architecture module is imported here so that `build_model` knows them all.
from rayvid.model import prototype as _prototype  # noqa: F401  (registers "prototype")
from rayvid.model.registry import MODELS, NUM_CLASSES, RayvidModel, register_model

__all__ = ["COSINE_HEADS", "MLP_ARCHS", "MODELS", "NUM_CLASSES", "RayvidModel",
           "build_from_config", "build_model", "input_kind_of", "register_model"]

# Architectures whose outputs are cosines (a margin loss trains them; `logit_scale` = s).
COSINE_HEADS = ("cosine_mlp", "attention")


def input_kind_of(arch: str) -> str:
    """The input kind (`rayvid.core.inputs`) a registered architecture consumes."""
    if arch not in MODELS:
        raise ValueError(f"unknown model {arch!r}; known: {sorted(MODELS)}")
    return getattr(MODELS[arch], "input_kind", "clip_vector")


def build_model(name: str, in_dim: int = 512, num_classes: int = NUM_CLASSES, **kwargs: Any) -> "RayvidModel":
    """Build a registered architecture; unknown names raise ValueError listing the known ones."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    return MODELS[name](in_dim=in_dim, num_classes=num_classes, **kwargs)


def build_from_config(config: Mapping[str, Any]) -> "RayvidModel":
    """Rebuild a model from `model.model_config()` (extra keys are not allowed)."""
    cfg = dict(config)
    return build_model(cfg.pop("arch"), **cfg)


def _init_linear(module: nn.Module) -> None:
    # 4th-place code: every Linear is Xavier-uniform with zero bias.
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# (width, activation, batch norm after the activation, dropout) per hidden layer: method.md.
# M1 2-layer-sigmoid, M2 3-layer-sigmoid, M3 2-layer-swish, M4 3-layer-swish, M5
# 3-layer-swish-new (the 4th place's main model); each is registered under its name.
_MLP_SPECS: dict[str, tuple[tuple[int, str, bool, float], ...]] = {
    "M1": ((1024, "sigmoid", True, 0.25),),
    "M2": ((512, "sigmoid", True, 0.2), (1024, "sigmoid", True, 0.5)),
    "M3": ((1024, "swish", True, 0.25),),
    "M4": ((768, "swish", False, 0.2), (1024, "swish", False, 0.5)),
    "M5": ((1024, "swish", False, 0.5), (1024, "swish", False, 0.5)),
}
# Swish = x * sigmoid(x), which is exactly nn.SiLU.
_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"sigmoid": nn.Sigmoid, "swish": nn.SiLU}


def _mlp_trunk(in_dim: int, spec: Sequence[tuple[int, str, bool, float]]) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    for width, act, bn, p in spec:
        layers += [nn.Linear(in_dim, width), _ACTIVATIONS[act]()]
        if bn:  # BN after the activation, as in the 4th-place code
            layers.append(nn.BatchNorm1d(width))
        layers.append(nn.Dropout(p))
        in_dim = width
    return nn.Sequential(*layers), in_dim


HEAD_BIASES = ("zero", "prior")
MLP_ARCHS = tuple(_MLP_SPECS)  # the architectures that take `dropout` and `head_bias`


class MLP(RayvidModel):
    """One of the 4th-place MLPs: `(B, in_dim) float32` fused clip feature -> logits `(B, C)`.

    head_bias: "zero" is the 4th-place init (every bias 0, so every class starts at
    sigmoid 0.5); "prior" starts the output layer's bias at `-log(C - 1)`, i.e. every class
    at probability 1/C, the focal-loss paper's prior init. With a per-class sigmoid focal
    loss summed over C classes, a zero start spends the first few hundred steps pushing
    C - 1 negatives down before any positive is learned: harmless over the 4th place's
    ~27,000 steps, fatal for a small release's few hundred (docs/benchmarks.md, ablation).
    """

    def __init__(self, arch: str, in_dim: int, num_classes: int,
                 dropout: float | None = None, head_bias: str = "zero") -> None:
        if head_bias not in HEAD_BIASES:
            raise ValueError(f"head_bias must be one of {HEAD_BIASES}, got {head_bias!r}")
        super().__init__(arch, in_dim=in_dim, num_classes=num_classes, dropout=dropout,
                         head_bias=head_bias)
        spec = _MLP_SPECS[arch]
        if dropout is not None:  # one rate for every layer (a Tune search dimension)
            spec = [(w, act, bn, dropout) for w, act, bn, _ in spec]
        self.trunk, width = _mlp_trunk(in_dim, spec)
        self.head = nn.Linear(width, num_classes)
        _init_linear(self)
        if head_bias == "prior" and num_classes > 1:
            nn.init.constant_(self.head.bias, -math.log(num_classes - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def _register_mlp(arch: str) -> None:
    @register_model(arch)
    def build(in_dim: int = 512, num_classes: int = NUM_CLASSES, dropout: float | None = None,
              head_bias: str = "zero") -> MLP:
        return MLP(arch, in_dim, num_classes, dropout, head_bias)


for _arch in _MLP_SPECS:
    _register_mlp(_arch)


class CosineClassifier(nn.Module):
    """`(B, D)` -> cosine logits `(B, C)` in [-1, 1]: normalised features times normalised weights."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A zero feature (a clip with nothing to pool) normalises to zero: all cosines 0.
        return F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1))


@register_model("cosine_mlp")
class CosineMLP(RayvidModel):
    """M5 trunk + cosine head: `(B, in_dim)` -> cosine logits `(B, C)`, for the margin loss."""

    def __init__(self, in_dim: int = 512, num_classes: int = NUM_CLASSES, scale: float = 30.0) -> None:
        super().__init__("cosine_mlp", in_dim=in_dim, num_classes=num_classes, scale=scale)
        self.logit_scale = float(scale)  # ArcFace s: makes sigmoid scores comparable with the MLPs'
        self.trunk, width = _mlp_trunk(in_dim, _MLP_SPECS["M5"])
        self.head = CosineClassifier(width, num_classes)
        _init_linear(self.trunk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over the True entries of `mask`; all-False rows give all zeros (not NaN)."""
    scores = scores.masked_fill(~mask, float("-inf"))
    w = torch.softmax(scores, dim=dim)
    return torch.nan_to_num(w, nan=0.0)


class AttentionPool(nn.Module):
    """NAN-style pooling (Yang et al. 2017): a learned query, softmax over the valid items.

    `(B, N, D)`, mask `(B, N) bool` -> `(B, D)`; a row with no valid item pools to zeros.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.zeros(dim))  # zeros: starts as a plain mean

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = masked_softmax(h @ self.query / math.sqrt(h.shape[-1]), mask)
        return torch.einsum("bn,bnd->bd", w, h)


@register_model("attention")
class FaceSetAttention(RayvidModel):
    """3rd place: a face set `(B, F, in_dim + 2)` (feature, quality/100, det) -> cosine logits `(B, C)`.

    One pre-norm self-attention block across faces, NAN-style attention pooling and a cosine
    classifier; train with the margin loss (3rd place: ArcFace s=30, m=0.5, + focal).
    """

    input_kind = "face_set"

    def __init__(
        self, in_dim: int = 512, num_classes: int = NUM_CLASSES, d_model: int = 512,
        num_heads: int = 8, dropout: float = 0.1, scale: float = 30.0,
    ) -> None:
        super().__init__("attention", in_dim=in_dim, num_classes=num_classes, d_model=d_model,
                         num_heads=num_heads, dropout=dropout, scale=scale)
        self.logit_scale = float(scale)
        self.proj = nn.Linear(in_dim + 2, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.SiLU(), nn.Dropout(dropout),
                                 nn.Linear(2 * d_model, d_model))
        self.pool = AttentionPool(d_model)
        self.head = CosineClassifier(d_model, num_classes)
        _init_linear(self.proj)
        _init_linear(self.ffn)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: `(B, F, in_dim + 2) float32`; mask: `(B, F) bool`, True = a real face (None: all)."""
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        # A clip with no face would make every attention row -inf (NaN); let it attend to its
        # padding instead, and the pooling (which uses the real mask) returns zeros for it.
        attend = mask | ~mask.any(dim=1, keepdim=True)
        h = self.proj(x)
        q = self.norm1(h)
        h = h + self.attn(q, q, q, key_padding_mask=~attend, need_weights=False)[0]
        h = h + self.ffn(self.norm2(h))
        return self.head(self.pool(h, mask))


@register_model("multimodal")
class MultiModal(RayvidModel):
    """iQIYI's own system: face, head, body, audio clip vectors fused by attention over modalities.

    x: `(B, in_dim + head_dim + body_dim + audio_dim) float32`, the concatenated clip vectors;
    present: `(B, 4) bool` modality-presence mask (None: a modality is present when its slice
    is not all zeros). Returns logits `(B, C)`. A clip with no face still gets a prediction from
    its other modalities; a clip with nothing gets the bias-only logits.
    """

    input_kind = "multimodal"
    modalities = ("face", "head", "body", "audio")

    def __init__(
        self, in_dim: int = 512, num_classes: int = NUM_CLASSES, head_dim: int = 512,
        body_dim: int = 512, audio_dim: int = 512, d_model: int = 512, dropout: float = 0.5,
        head_bias: str = "zero",
    ) -> None:
        if head_bias not in HEAD_BIASES:
            raise ValueError(f"head_bias must be one of {HEAD_BIASES}, got {head_bias!r}")
        super().__init__("multimodal", in_dim=in_dim, num_classes=num_classes, head_dim=head_dim,
                         body_dim=body_dim, audio_dim=audio_dim, d_model=d_model, dropout=dropout,
                         head_bias=head_bias)
        self.dims = (in_dim, head_dim, body_dim, audio_dim)
        self.embed = nn.ModuleList(
            nn.Sequential(nn.Linear(d, d_model), nn.SiLU(), nn.LayerNorm(d_model)) for d in self.dims
        )
        self.modality_emb = nn.Parameter(torch.zeros(len(self.dims), d_model))
        # Additive attention (a score per modality from its own embedding): how much to trust it.
        self.score = nn.Sequential(nn.Linear(d_model, d_model // 4), nn.Tanh(), nn.Linear(d_model // 4, 1))
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(d_model, 1024), nn.SiLU(),
                                  nn.Dropout(dropout), nn.Linear(1024, num_classes))
        _init_linear(self)
        if head_bias == "prior" and num_classes > 1:  # as the MLPs' (see MLP)
            nn.init.constant_(self.head[-1].bias, -math.log(num_classes - 1))

    def forward(self, x: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        parts = torch.split(x, self.dims, dim=-1)
        if present is None:
            present = torch.stack([p.abs().sum(-1) > 0 for p in parts], dim=1)
        e = torch.stack([emb(p) for emb, p in zip(self.embed, parts)], dim=1) + self.modality_emb
        w = masked_softmax(self.score(e).squeeze(-1), present.bool())
        return self.head(torch.einsum("bm,bmd->bd", w, e))
