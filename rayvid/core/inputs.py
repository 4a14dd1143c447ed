"""Model inputs by kind, from a batch of clips' flat detections (numpy; no Ray, no torch).

Every model declares the kind of input it consumes (`RayvidModel.input_kind`); training,
batch prediction, the search index and the Serve endpoint all build it here, from the same
flat arrays (`ClipParts`), so there is no train/serve skew:

- `clip_vector` -> `x (n, 512) float32`: the clip's fused face feature. Evaluation: qFF of
  every face (no gate, the 4th place's test-time rule). Training: a fresh qFDA draw of the
  gated faces. Also `ok (n,) bool` (qFF's flag: faces with a positive total weight).
- `face_set` -> `faces (n, K, 514) float16` and `face_mask (n, K) bool`: up to K faces per
  clip, each its unit-norm feature followed by quality/100 and det. Evaluation: the K best
  by qFF weight (q * d * W(q)), best first. Training: K of the gated faces drawn at random
  without replacement, fresh every call (the set analogue of qFDA).
- `multimodal` -> `mm (n, 512 + head + body + audio dims) float32` and `mm_mask (n, 4)
  bool` (face, head, body, audio): one unit-norm vector per modality, the face's as for
  `clip_vector`, the head's the detection-weighted mean of the clip's heads, the body's the
  plain mean of its bodies, the audio vector as given. A modality that is missing (no
  detection, no audio, an all-zero vector) or switched off (`modalities`) is masked and
  zero; training also drops each present modality with probability `modality_dropout`
  (never all of them), so the model learns to answer from what is left.

`usable(kind, inputs)` says which clips a member of that kind can score: a clip with no face
is unusable for the face models but usable for a multimodal one with a head, body or audio.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from rayvid.core import fusion

INPUT_KINDS = ("clip_vector", "face_set", "multimodal")
MODALITIES = ("face", "head", "body", "audio")
FACE_DIM = 512
SET_EXTRA = 2  # quality / 100 and det, appended to each face of a face set
# The columns each kind adds to a batch (besides `y`, `ok` and `clip`), in the order the
# model's forward takes them.
COLUMNS: dict[str, tuple[str, ...]] = {
    "clip_vector": ("x",),
    "face_set": ("faces", "face_mask"),
    "multimodal": ("mm", "mm_mask"),
}


class FaceParts(NamedTuple):
    feat: np.ndarray      # (F, 512) float16/float32, not normalised
    det: np.ndarray       # (F,) float32
    quality: np.ndarray   # (F,) float32
    offsets: np.ndarray   # (n + 1,) int64


class HeadParts(NamedTuple):
    feat: np.ndarray      # (H, head_dim)
    det: np.ndarray       # (H,)
    offsets: np.ndarray   # (n + 1,)


class BodyParts(NamedTuple):
    feat: np.ndarray      # (B, body_dim)
    offsets: np.ndarray   # (n + 1,)


class AudioParts(NamedTuple):
    feat: np.ndarray      # (n, audio_dim); rows of absent audio are ignored
    present: np.ndarray   # (n,) bool


@dataclass(frozen=True)
class ClipParts:
    """A batch of n clips' detections, flat. heads/bodies/audio: None = not read (the
    modality is then absent for every clip)."""

    faces: FaceParts
    heads: HeadParts | None = None
    bodies: BodyParts | None = None
    audio: AudioParts | None = None

    @property
    def n(self) -> int:
        return len(self.faces.offsets) - 1

    def take(self, rows: np.ndarray) -> "ClipParts":
        """The clips `rows` (bool mask or ascending indices), every modality alike."""
        rows = np.flatnonzero(rows) if rows.dtype == bool else np.asarray(rows, np.int64)
        return ClipParts(
            FaceParts(*_take_flat(self.faces.offsets, rows, self.faces.feat, self.faces.det,
                                  self.faces.quality)),
            None if self.heads is None else
            HeadParts(*_take_flat(self.heads.offsets, rows, self.heads.feat, self.heads.det)),
            None if self.bodies is None else
            BodyParts(*_take_flat(self.bodies.offsets, rows, self.bodies.feat)),
            None if self.audio is None else
            AudioParts(self.audio.feat[rows], self.audio.present[rows]))

    def gate_faces(self, det_min: float, quality_min: float) -> "ClipParts":
        """The same clips with only the faces that pass the training gate."""
        f = self.faces
        keep = fusion.gate_mask(f.det, f.quality, det_min, quality_min)
        faces = FaceParts(f.feat[keep], f.det[keep], f.quality[keep],
                          fusion.compress(keep, f.offsets))
        return ClipParts(faces, self.heads, self.bodies, self.audio)


def _take_flat(offsets: np.ndarray, rows: np.ndarray, *arrays: np.ndarray) -> list[np.ndarray]:
    counts = np.diff(offsets)[rows]
    starts = offsets[:-1][rows]
    # Flat indices of the kept clips' items, in clip order, without a Python loop per clip.
    new = fusion.offsets_from_counts(counts)
    idx = np.repeat(starts - new[:-1], counts) + np.arange(int(new[-1]))
    return [a[idx] for a in arrays] + [new]


@dataclass(frozen=True)
class InputSpec:
    """How the inputs are built: recorded in the run's `ensemble.json` so that prediction
    and serving build exactly what training built.

    kinds: the kinds to build (a mixed ensemble builds all of its members' kinds at once).
    face_set_size: K, faces per face set (3rd place: 40).
    modalities: the modalities a multimodal input uses; the others are always masked.
    modality_dropout: training only: the chance of masking each present modality.
    dims: feature dims of head, body and audio (the dataset meta's `dims`; 512 each in the
        release).
    """

    kinds: tuple[str, ...] = ("clip_vector",)
    weighting: fusion.Weighting = field(default_factory=fusion.Weighting)
    face_set_size: int = 16
    modalities: tuple[str, ...] = MODALITIES
    modality_dropout: float = 0.0
    dims: tuple[int, int, int] = (512, 512, 512)  # head, body, audio

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in INPUT_KINDS]
        if not self.kinds or bad:
            raise ValueError(f"input kinds {list(self.kinds)}: each must be one of {INPUT_KINDS}")
        if self.face_set_size < 1:
            raise ValueError(f"face_set_size must be >= 1, got {self.face_set_size}")
        bad = [m for m in self.modalities if m not in MODALITIES]
        if not self.modalities or bad:
            raise ValueError(f"modalities {list(self.modalities)}: each must be one of {MODALITIES}")
        if not 0.0 <= self.modality_dropout < 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1), got {self.modality_dropout}")

    @property
    def mm_dim(self) -> int:
        return FACE_DIM + sum(self.dims)

    def to_json(self) -> dict[str, Any]:
        """The form kept in `ensemble.json` (training-only settings left out)."""
        return {"kinds": list(self.kinds), "face_set_size": self.face_set_size,
                "modalities": list(self.modalities), "dims": list(self.dims)}

    @classmethod
    def from_json(cls, spec: dict[str, Any], weighting: fusion.Weighting) -> "InputSpec":
        unknown = set(spec) - {"kinds", "face_set_size", "modalities", "dims"}
        if unknown:
            raise ValueError(f"unknown inputs key(s): {', '.join(sorted(unknown))}")
        return cls(kinds=tuple(spec.get("kinds", ("clip_vector",))), weighting=weighting,
                   face_set_size=int(spec.get("face_set_size", 16)),
                   modalities=tuple(spec.get("modalities", MODALITIES)),
                   dims=tuple(int(d) for d in spec.get("dims", (512, 512, 512))))


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); an all-zero row stays zero."""
    x = np.asarray(x, np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, np.float32(1e-12))


def _face_vector(parts: ClipParts, spec: InputSpec, rng: np.random.Generator | None,
                 qfda: dict | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x (n, 512), ok (n,), has_face (n,)): qFF, or with `qfda` a qFDA draw per clip that has a face."""
    f = parts.faces
    has_face = np.diff(f.offsets) > 0
    if qfda is None:
        x, ok = fusion.qff(f.feat, f.det, f.quality, f.offsets, spec.weighting)
        return x, ok, has_face
    x = np.zeros((parts.n, f.feat.shape[1]), np.float32)
    if has_face.any():
        sub = f if has_face.all() else FaceParts(*_take_flat(
            f.offsets, np.flatnonzero(has_face), f.feat, f.det, f.quality))
        x[has_face] = fusion.qfda(sub.feat, sub.det, sub.quality, sub.offsets, rng, **qfda)
    return x, has_face.copy(), has_face


def face_set(parts: ClipParts, k: int, weighting: fusion.Weighting,
             rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(faces (n, k, 514) float16, mask (n, k) bool), see the module docstring.

    rng None: the k best faces by qFF weight (ties by order in the clip), best first;
    else k faces drawn uniformly without replacement (all of them when a clip has <= k).
    """
    f = parts.faces
    n, counts = parts.n, np.diff(f.offsets)
    if rng is None:
        key = -fusion.fusion_weights(f.det, f.quality, weighting).astype(np.float64)
    else:
        key = rng.random(len(f.det))
    # Sort faces by (clip, key): one lexsort for the whole batch, then rank within the clip.
    order = np.lexsort((np.arange(len(key)), key, np.repeat(np.arange(n), counts)))
    rank = np.arange(len(order)) - np.repeat(f.offsets[:-1], counts)
    take = rank < k
    src, clip, slot = order[take], np.repeat(np.arange(n), counts)[take], rank[take]
    faces = np.zeros((n, k, FACE_DIM + SET_EXTRA), np.float16)
    faces[clip, slot, :FACE_DIM] = unit_rows(fusion.as_float32(f.feat[src]))
    faces[clip, slot, FACE_DIM] = np.asarray(f.quality[src], np.float32) / 100.0
    faces[clip, slot, FACE_DIM + 1] = f.det[src]
    mask = np.zeros((n, k), bool)
    mask[clip, slot] = True
    return faces, mask


def _weighted_clip_mean(feat: np.ndarray, weights: np.ndarray,
                        offsets: np.ndarray) -> np.ndarray:
    x, _ = fusion.weighted_mean(feat, weights, offsets)
    return x


def multimodal(parts: ClipParts, spec: InputSpec, face: np.ndarray, has_face: np.ndarray,
               rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mm (n, spec.mm_dim) float32, mm_mask (n, 4) bool) from the face vector `face`
    (qFF or a qFDA draw) and the other modalities of `parts`; see the module docstring."""
    n = parts.n
    hd, bd, ad = spec.dims
    vecs = [unit_rows(face)]
    present = [has_face & (np.abs(face).sum(axis=1) > 0)]
    if parts.heads is not None and len(parts.heads.feat):
        h = parts.heads
        vecs.append(unit_rows(_weighted_clip_mean(h.feat, np.maximum(h.det, 0), h.offsets)))
        present.append(np.diff(h.offsets) > 0)
    else:
        vecs.append(np.zeros((n, hd), np.float32))
        present.append(np.zeros(n, bool))
    if parts.bodies is not None and len(parts.bodies.feat):
        b = parts.bodies
        vecs.append(unit_rows(_weighted_clip_mean(b.feat, np.ones(len(b.feat), np.float32),
                                                  b.offsets)))
        present.append(np.diff(b.offsets) > 0)
    else:
        vecs.append(np.zeros((n, bd), np.float32))
        present.append(np.zeros(n, bool))
    if parts.audio is not None:
        vecs.append(unit_rows(fusion.as_float32(parts.audio.feat)))
        present.append(np.asarray(parts.audio.present, bool))
    else:
        vecs.append(np.zeros((n, ad), np.float32))
        present.append(np.zeros(n, bool))
    for i, (v, d) in enumerate(zip(vecs, (FACE_DIM, hd, bd, ad))):
        if v.shape[1] != d:
            raise ValueError(f"{MODALITIES[i]} features have {v.shape[1]} values, expected {d}")
    mask = np.stack(present, axis=1)
    mask &= np.stack([np.abs(v).sum(axis=1) > 0 for v in vecs], axis=1)  # zero = absent
    mask &= np.array([m in spec.modalities for m in MODALITIES])[None, :]
    if rng is not None and spec.modality_dropout > 0:
        drop = rng.random(mask.shape) < spec.modality_dropout
        kept = mask & ~drop
        # never drop every present modality: such a clip keeps what it had
        mask = np.where(kept.any(axis=1, keepdims=True), kept, mask)
    mm = np.concatenate(vecs, axis=1)
    mm *= np.repeat(mask, (FACE_DIM, hd, bd, ad), axis=1)  # masked modalities are zero
    return mm, mask


def build(parts: ClipParts, spec: InputSpec, rng: np.random.Generator | None = None,
          qfda: dict | None = None) -> dict[str, np.ndarray]:
    """Every kind of `spec.kinds` for the clips of `parts`: the columns of `COLUMNS` plus `ok`.

    rng None: evaluation (qFF, the best K faces, no modality dropout). rng given: training;
    `qfda` (n_draws, sizes, mix) then makes the face vector a qFDA draw (None: qFF).
    """
    out: dict[str, np.ndarray] = {}
    need_face = "clip_vector" in spec.kinds or "multimodal" in spec.kinds
    if need_face:
        x, ok, has_face = _face_vector(parts, spec, rng, qfda if rng is not None else None)
    else:
        has_face = np.diff(parts.faces.offsets) > 0
        ok = has_face
    if "clip_vector" in spec.kinds:
        out["x"] = x
    if "face_set" in spec.kinds:
        out["faces"], out["face_mask"] = face_set(parts, spec.face_set_size, spec.weighting, rng)
    if "multimodal" in spec.kinds:
        out["mm"], out["mm_mask"] = multimodal(parts, spec, x, has_face, rng)
    out["ok"] = ok
    return out


def usable(kind: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """(n,) bool: the clips a member of `kind` can score from `inputs` (see `build`)."""
    if kind == "clip_vector":
        return np.abs(inputs["x"]).sum(axis=1) > 0
    if kind == "face_set":
        return np.asarray(inputs["face_mask"]).any(axis=1)
    if kind == "multimodal":
        return np.asarray(inputs["mm_mask"]).any(axis=1)
    raise ValueError(f"unknown input kind {kind!r}; known: {INPUT_KINDS}")


def answerable(kinds, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """(n,) bool: the clips an ensemble of members of `kinds` answers for (predict's and the
    endpoint's `ok`/`usable`): a multimodal or face-set member that can use the clip, or a
    clip-vector member and qFF's `ok` (a face with a positive fusion weight, the rule served
    M1-M5 ensembles always had). Other clips are reported unknown."""
    ok = np.zeros(len(inputs["ok"]), bool)
    for kind in dict.fromkeys(kinds):
        use = usable(kind, inputs)
        ok |= (use & np.asarray(inputs["ok"], bool)) if kind == "clip_vector" else use
    return ok


def trainable(kind: str, parts: ClipParts, spec: InputSpec) -> np.ndarray:
    """(n,) bool: the (gated) clips a training run of `kind` keeps: face models need a face,
    a multimodal model any of its modalities."""
    has_face = np.diff(parts.faces.offsets) > 0
    if kind != "multimodal":
        return has_face
    keep = has_face & ("face" in spec.modalities)
    if "head" in spec.modalities and parts.heads is not None:
        keep |= np.diff(parts.heads.offsets) > 0
    if "body" in spec.modalities and parts.bodies is not None:
        keep |= np.diff(parts.bodies.offsets) > 0
    if "audio" in spec.modalities and parts.audio is not None:
        keep |= np.asarray(parts.audio.present, bool)
    return keep
