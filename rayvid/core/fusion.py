"""Quality gating and feature fusion: the numpy core of the 4th-place method.

Pure numpy: no Ray, no torch. Every function works on the faces of a *batch* of clips
stored flat, with `offsets: (n_clips + 1,) int64` (clip c owns faces
`offsets[c]:offsets[c+1]`), the layout of the prepared Parquet dataset. Nothing loops in
Python over clips or faces.

- `gate_mask`: the training-time gate (keep a face when det >= 0.7 and quality >= 25;
  the 4th place's code; their write-up says 0.8 and 30).
- `fusion_weights`: q * d * W(q) with the band function W (or a smooth `q**p`).
- `qff`: test-time quality-weighted feature fusion over all faces of a clip.
- `qfda`: training-time augmentation fusion: 5 draws with replacement, emit one raw face
  (p=0.25), the weighted mean of the first 3 (0.65) or of all 5 (0.10), weights q * d.
- `vote`: per-frame voting, the baseline qFF replaced (classify every face, then average).

Degenerate clips get a defined result, never NaN: a clip whose weights sum to 0 falls back
to the plain mean of its faces, and a clip with no face gets a zero vector; `ok` is False
for both so callers can route them to the "other/unknown" path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rayvid.core import fourth_place as fp

# The 4th place's code: W(q) = 0 (q < 0), 0.2 (q < 20), 0.3 (q < 30), 0.6 (q < 40), 1.0.
DEFAULT_BAND_CUTS = fp.BAND_CUTS
DEFAULT_BAND_VALUES = fp.BAND_VALUES


@dataclass(frozen=True)
class Weighting:
    """How faces are weighted in qFF.

    kind: "bands" -> q * d * W(q) with W a step function of quality (`cuts`, `values`);
          "power" -> d * max(q, 0) ** power (power=1 is plain q * d), smooth, for search;
          "mean"  -> every face weight 1 (plain mean, the ablation baseline).
    """

    kind: str = "bands"
    cuts: tuple[float, ...] = DEFAULT_BAND_CUTS
    values: tuple[float, ...] = DEFAULT_BAND_VALUES
    power: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("bands", "power", "mean"):
            raise ValueError(f"weighting kind must be bands, power or mean, got {self.kind!r}")
        if self.kind == "bands":
            if len(self.values) != len(self.cuts) + 1:
                raise ValueError("band weighting needs len(values) == len(cuts) + 1")
            if list(self.cuts) != sorted(self.cuts):
                raise ValueError(f"band cuts must be ascending, got {self.cuts}")

    @classmethod
    def from_dict(cls, spec: dict) -> "Weighting":
        """From its JSON form (`dataclasses.asdict`, lists for tuples); ValueError names
        an unknown key."""
        unknown = set(spec) - {"kind", "cuts", "values", "power"}
        if unknown:
            raise ValueError(f"unknown weighting key(s): {', '.join(sorted(unknown))}")
        return cls(kind=str(spec.get("kind", "bands")),
                   cuts=tuple(float(c) for c in spec.get("cuts", DEFAULT_BAND_CUTS)),
                   values=tuple(float(v) for v in spec.get("values", DEFAULT_BAND_VALUES)),
                   power=float(spec.get("power", 1.0)))


def offsets_from_counts(counts: np.ndarray) -> np.ndarray:
    """counts: (n_clips,) faces per clip -> offsets (n_clips + 1,) int64."""
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets


def segment_sum(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per-clip sums of `values` (F,) or (F, D) -> (n_clips,) or (n_clips, D), float32/64.

    `np.add.reduceat` over the non-empty clips only (reduceat returns an element, not 0,
    for an empty segment); empty clips get 0.
    """
    n = len(offsets) - 1
    out = np.zeros((n,) + values.shape[1:], dtype=np.result_type(values.dtype, np.float32))
    counts = np.diff(offsets)
    nonempty = counts > 0
    if values.shape[0] and nonempty.any():
        out[nonempty] = np.add.reduceat(values, offsets[:-1][nonempty], axis=0)
    return out


def gate_mask(det: np.ndarray, quality: np.ndarray, det_min: float = fp.GATE_DET_MIN,
              quality_min: float = fp.GATE_QUALITY_MIN) -> np.ndarray:
    """(F,) bool: faces kept for training (det >= det_min and quality >= quality_min)."""
    return (det >= det_min) & (quality >= quality_min)


def compress(mask: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """New offsets after keeping the faces where `mask` is True (per clip, order kept)."""
    return offsets_from_counts(segment_sum(mask.astype(np.int64), offsets).astype(np.int64))


def band_weights(quality: np.ndarray, cuts=DEFAULT_BAND_CUTS,
                 values=DEFAULT_BAND_VALUES) -> np.ndarray:
    """W(q): (F,) float32, the step function with W = values[i] for cuts[i-1] <= q < cuts[i]."""
    idx = np.searchsorted(np.asarray(cuts, dtype=np.float64), quality, side="right")
    return np.asarray(values, dtype=np.float32)[idx]


def fusion_weights(det: np.ndarray, quality: np.ndarray, weighting: Weighting) -> np.ndarray:
    """(F,) float32 non-negative weight of every face under `weighting`."""
    det = np.asarray(det, dtype=np.float32)
    quality = np.asarray(quality, dtype=np.float32)
    if weighting.kind == "mean":
        return np.ones_like(quality)
    if weighting.kind == "power":
        w = det * np.maximum(quality, 0.0) ** np.float32(weighting.power)
    else:
        w = quality * det * band_weights(quality, weighting.cuts, weighting.values)
    # A negative det or quality must not flip a face's contribution.
    return np.maximum(w, 0.0, dtype=np.float32)


# float16 -> float32 without numpy's scalar cast (~0.7 G elements/s here): shifting the
# 15 magnitude bits of a half into a float32's low exponent/mantissa bits gives exactly
# value * 2**-112 for every finite half, normal or subnormal (the sign is moved to bit 31).
# Scaling the fusion weights by 2**112 instead of the features makes the weighted sums
# bit-identical to an exact conversion at ~5x the speed. NaN/inf halves would come out
# finite: the prepared dataset and the serving API reject non-finite features upstream.
_HALF_SCALE = np.float32(2.0 ** 112)
_SIGN_AND_MAGNITUDE = np.int32(-1879048193)  # 0x8FFFFFFF: clears the sign-extension bits


def _half_bits_as_scaled_f32(half: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """(..., D) float16 -> float32 equal to value * 2**-112, bit-exact (see above)."""
    bits = np.left_shift(half.view(np.int16), 13, dtype=np.int32, out=out)
    np.bitwise_and(bits, _SIGN_AND_MAGNITUDE, out=bits)
    return bits.view(np.float32)


def as_float32(feat: np.ndarray) -> np.ndarray:
    """Exact float32 copy of float16 (or any float) features, fast."""
    if feat.dtype == np.float16:
        out = _half_bits_as_scaled_f32(feat)
        out *= _HALF_SCALE
        return out
    return np.asarray(feat, dtype=np.float32)


def _segment_weighted_sum(feat: np.ndarray, weights: np.ndarray, offsets: np.ndarray,
                          chunk_faces: int = 16384) -> np.ndarray:
    """Per-clip sum of weights[i] * feat[i] as a CSR (clips x faces) product, in chunks of
    clips so the widened features stay in cache. weights: (F,) float32, |w| <= 1."""
    import scipy.sparse as sp  # scipy ships with scikit-learn; import kept local

    n, dim = len(offsets) - 1, feat.shape[1]
    out = np.zeros((n, dim), dtype=np.float32)
    half = feat.dtype == np.float16
    w = weights * _HALF_SCALE if half else weights.astype(np.float32)
    c0 = 0
    while c0 < n:
        c1 = max(c0 + 1, int(np.searchsorted(offsets, offsets[c0] + chunk_faces, "right")) - 1)
        c1 = min(c1, n)
        f0, f1 = offsets[c0], offsets[c1]
        if f1 > f0:
            x = _half_bits_as_scaled_f32(feat[f0:f1]) if half else feat[f0:f1].astype(np.float32)
            rows = sp.csr_matrix((w[f0:f1], np.arange(f1 - f0), offsets[c0:c1 + 1] - f0),
                                 shape=(c1 - c0, f1 - f0))
            out[c0:c1] = rows @ x
        c0 = c1
    return out


def weighted_mean(feat: np.ndarray, weights: np.ndarray,
                  offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-clip weighted mean of faces with the documented fallbacks.

    feat: (F, D) float16/float32; weights: (F,) >= 0.
    Returns (fused (n_clips, D) float32, ok (n_clips,) bool). A clip whose weights sum to
    0 gets the plain mean of its faces; a clip with no face gets zeros; ok=False for both.
    """
    counts = np.diff(offsets)
    weights = weights.astype(np.float32)
    wsum = segment_sum(weights, offsets)
    ok = wsum > 0
    # Faces of clips with zero total weight get weight 1: their clip falls back to the mean.
    w = np.where(np.repeat(~ok, counts), np.float32(1.0), weights)
    denom = np.where(ok, wsum, np.maximum(counts, 1).astype(np.float32))
    w /= np.repeat(denom, counts)  # normalised per clip: every |w| <= 1
    return _segment_weighted_sum(feat, w, offsets), ok


def qff(feat: np.ndarray, det: np.ndarray, quality: np.ndarray, offsets: np.ndarray,
        weighting: Weighting = Weighting()) -> tuple[np.ndarray, np.ndarray]:
    """Quality-weighted feature fusion (qFF) of every clip in a batch, no gate.

    feat: (F, 512) float16, not normalised; det, quality: (F,); offsets: (n_clips+1,).
    Returns (fused (n_clips, 512) float32, ok (n_clips,) bool) as `weighted_mean`.
    """
    return weighted_mean(feat, fusion_weights(det, quality, weighting), offsets)


def qfda(feat: np.ndarray, det: np.ndarray, quality: np.ndarray, offsets: np.ndarray,
         rng: np.random.Generator, n_draws: int = fp.QFDA_N_DRAWS,
         sizes: tuple[int, ...] = fp.QFDA_SIZES, mix: tuple[float, ...] = fp.QFDA_MIX) -> np.ndarray:
    """Quality-aware feature augmentation (qFDA) for a batch of clips, one sample per clip.

    Per clip: `n_draws` faces uniformly with replacement; pick a size k from `sizes` with
    probabilities `mix`; emit the (q * d)-weighted mean of the first k draws (k=1: the raw
    face). Every clip must have at least one face (gate first, drop empty clips).
    feat: (F, D); returns (n_clips, D) float32. Reproducible for a given `rng` state.
    """
    counts = np.diff(offsets)
    if (counts <= 0).any():
        raise ValueError("qfda needs at least one face per clip: drop empty clips first")
    if max(sizes) > n_draws or len(sizes) != len(mix):
        raise ValueError(f"qfda sizes {sizes} must be <= n_draws={n_draws} and match mix {mix}")
    n = len(counts)
    picks = offsets[:-1, None] + (rng.random((n, n_draws)) * counts[:, None]).astype(np.int64)
    picks = np.minimum(picks, offsets[1:, None] - 1)  # guard the u -> 1.0 rounding edge
    k = np.asarray(sizes)[rng.choice(len(sizes), size=n, p=np.asarray(mix) / np.sum(mix))]
    use = np.arange(n_draws)[None, :] < k[:, None]
    w = (np.maximum(quality[picks], 0) * np.maximum(det[picks], 0)).astype(np.float32) * use
    wsum = w.sum(axis=1)
    # Zero total weight (an ungated clip of non-positive scores): plain mean of the draws.
    w = np.where((wsum > 0)[:, None], w, use.astype(np.float32))
    w /= w.sum(axis=1, keepdims=True)
    return np.einsum("nk,nkd->nd", w, as_float32(feat[picks]), dtype=np.float32)


def vote(face_scores: np.ndarray, offsets: np.ndarray,
         weights: np.ndarray | None = None) -> np.ndarray:
    """Per-frame voting: mean (or weighted mean) of per-face class scores per clip.

    face_scores: (F, C) probabilities of every face; returns (n_clips, C) float32, zeros
    for a clip with no face.
    """
    w = np.ones(face_scores.shape[0], np.float32) if weights is None else weights
    fused, _ = weighted_mean(face_scores, w, offsets)
    return fused
