"""The serving API: pydantic request/response models, limits, settings, and the numpy
conversions between requests, model inputs, score matrices and answers.

No Ray, no torch: `rayvid.infer.app` wraps these in a FastAPI ingress. Every rule a request
must follow lives here, so FastAPI answers a bad body with a 422 naming the field before
any fusion or model code runs:

- a clip is up to `MAX_FACES_PER_CLIP` faces, each with the official fields `det_score`,
  `quality_score` and `feature` (512 finite numbers; |x| <= 65504, the float16 range the
  prepared dataset stores and the models were trained on) or `feature_b64` (the same 512
  values as little-endian float16 or float32 bytes, base64: ~4x less JSON to parse);
- and optionally up to `MAX_FACES_PER_CLIP` `heads` (`feature`/`feature_b64`, `det_score`)
  and `bodies` (`feature`/`feature_b64`), and one `audio` vector (`feature`/`feature_b64`),
  checked like faces; within a request each modality's list features have one length, and
  `clip_parts` checks every length against the run's `InputSpec.dims` (a mismatch is a
  `FieldError`, a 422 naming the field and both lengths);
- `faces` may be empty or absent, but a clip needs at least one face, head, body or audio;
- `/identify/batch` takes 1 to `MAX_CLIPS_PER_BATCH` clips and at most
  `MAX_ITEMS_PER_REQUEST` faces, heads, bodies and audio vectors in all; a body over
  `MAX_BODY_BYTES` gets a 413;
- NaN and +-Infinity (which Python's JSON reader accepts) are rejected; unknown fields
  are rejected (a typo such as `quality` must not silently become a default).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rayvid.config import Config
from rayvid.core.fusion import offsets_from_counts
from rayvid.core.inputs import AudioParts, BodyParts, ClipParts, FaceParts, HeadParts
from rayvid.infer.predict import top_classes

FEATURE_DIM = 512
MAX_FACES_PER_CLIP = 1000
MAX_CLIPS_PER_BATCH = 256
MAX_ITEMS_PER_REQUEST = 8192  # faces + heads + bodies + audio vectors of one request
MAX_BODY_BYTES = 64 << 20
MAX_TOP_K = 100
MAX_SEARCH_K = 1000
MAX_AUX_DIM = 4096  # head / body / audio feature length
F16_MAX = 65504.0

Finite = Annotated[float, Field(allow_inf_nan=False, ge=-1e6, le=1e6)]
Half = Annotated[float, Field(allow_inf_nan=False, ge=-F16_MAX, le=F16_MAX)]
Vector = Annotated[list[Half], Field(min_length=FEATURE_DIM, max_length=FEATURE_DIM)]
AuxVector = Annotated[list[Half], Field(min_length=1, max_length=MAX_AUX_DIM)]
BBox = Annotated[list[int], Field(min_length=4, max_length=4)]
Frame = Annotated[int, Field(ge=0)]
TopK = Annotated[int, Field(ge=1, le=MAX_TOP_K)]
_STRICT = ConfigDict(extra="forbid")


class FieldError(ValueError):
    """A request that passed the models but does not fit the served run (e.g. a head
    feature's length differs from the run's head dim). `loc` names the field, as in
    pydantic's errors; the ingress answers a 422 with it."""

    def __init__(self, loc: Sequence[str | int], msg: str) -> None:
        super().__init__(f"{'.'.join(str(p) for p in loc) or 'body'}: {msg}")
        self.loc, self.msg = tuple(loc), msg


def _b64_bytes(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("feature_b64 is not valid base64") from None


def decode_b64(text: str, dim: int, what: str = "") -> np.ndarray:
    """`feature_b64` of `dim` values -> (dim,) float16; ValueError with a message when
    malformed. what: appended to the length message (e.g. "the run's head features")."""
    raw = _b64_bytes(text)
    if len(raw) == 2 * dim:
        vec = np.frombuffer(raw, "<f2")
    elif len(raw) == 4 * dim:
        vec = np.frombuffer(raw, "<f4")
        if np.isfinite(vec).all() and np.abs(vec).max() > F16_MAX:
            raise ValueError(f"feature_b64 has values outside the float16 range +-{F16_MAX}")
        vec = vec.astype(np.float16)
    else:
        raise ValueError(f"feature_b64 must decode to {dim} float16 ({2 * dim} bytes) or "
                         f"float32 ({4 * dim} bytes){' for ' + what if what else ''}, "
                         f"got {len(raw)} bytes")
    if not np.isfinite(vec).all():
        raise ValueError("feature_b64 has NaN or infinite values")
    return vec


def decode_b64_feature(text: str) -> np.ndarray:
    """A face's `feature_b64` -> (512,) float16; ValueError with a message when malformed."""
    return decode_b64(text, FEATURE_DIM)


class Face(BaseModel):
    """One detected face: the official fields of the release's face pickles."""

    model_config = _STRICT
    det_score: Finite = Field(description="face detector score, e.g. 0.99")
    quality_score: Finite = Field(description="face quality score, e.g. 45.2")
    feature: Vector | None = Field(None, description="512 numbers, not normalised")
    feature_b64: str | None = Field(
        None, max_length=8 * FEATURE_DIM,
        description="instead of `feature`: 512 little-endian float16 or float32, base64")
    bbox: BBox | None = Field(None, description="x1, y1, x2, y2")
    frame: Frame | None = None

    @field_validator("feature_b64")
    @classmethod
    def _b64(cls, value: str | None) -> str | None:
        if value is not None:
            decode_b64_feature(value)
        return value

    @model_validator(mode="after")
    def _one_feature(self) -> "Face":
        if (self.feature is None) == (self.feature_b64 is None):
            raise ValueError("give exactly one of feature (512 numbers) or feature_b64")
        return self

    def vector(self) -> np.ndarray | list[float]:
        """The feature as (512,) float16 (base64) or the list of numbers."""
        return self.feature if self.feature is not None else decode_b64_feature(self.feature_b64)


class AuxFeature(BaseModel):
    """A head, body or audio feature: `feature` numbers or `feature_b64` (their length is the
    run's dim for the modality, `InputSpec.dims`, checked by `clip_parts`)."""

    model_config = _STRICT
    feature: AuxVector | None = Field(
        None, description="the feature vector, not normalised: as many numbers as the run's "
                          "dim for this modality (512 in the release), |x| <= 65504")
    feature_b64: str | None = Field(
        None, max_length=8 * MAX_AUX_DIM,
        description="instead of `feature`: the same values as little-endian float16 or "
                    "float32 bytes, base64")

    @field_validator("feature_b64")
    @classmethod
    def _b64(cls, value: str | None) -> str | None:
        if value is not None:
            raw = _b64_bytes(value)
            if not raw or len(raw) % 2 or len(raw) > 4 * MAX_AUX_DIM:
                raise ValueError(f"feature_b64 must decode to 1 to {MAX_AUX_DIM} float16 or "
                                 f"float32 values, got {len(raw)} bytes")
        return value

    @model_validator(mode="after")
    def _one_feature(self) -> "AuxFeature":
        if (self.feature is None) == (self.feature_b64 is None):
            raise ValueError("give exactly one of feature (a list of numbers) or feature_b64")
        return self

    def vector(self, dim: int, loc: tuple[str | int, ...], modality: str) -> np.ndarray:
        """The feature as (dim,) float16; FieldError naming `loc` when its length is not
        `dim` (the run's) or its base64 does not decode to finite values."""
        if self.feature is not None:
            if len(self.feature) != dim:
                raise FieldError((*loc, "feature"), f"{len(self.feature)} values, but the "
                                 f"run's {modality} features have {dim}")
            return np.asarray(self.feature, np.float16)
        try:
            return decode_b64(self.feature_b64, dim, f"the run's {modality} features")
        except ValueError as e:
            raise FieldError((*loc, "feature_b64"), str(e)) from None


class Head(AuxFeature):
    """One head detection (the release's head pickles): a clip's head vector is the
    det_score-weighted mean of its heads."""

    det_score: Finite = Field(description="head detector score; weights the clip's head mean "
                                          "(negative counts as 0)")
    bbox: BBox | None = Field(None, description="x1, y1, x2, y2")
    frame: Frame | None = None


class Body(AuxFeature):
    """One body detection: a clip's body vector is the plain mean of its bodies."""

    bbox: BBox | None = Field(None, description="x1, y1, x2, y2")
    frame: Frame | None = None


class Audio(AuxFeature):
    """The clip's audio feature (one vector per clip)."""


class Clip(BaseModel):
    """The faces, heads, bodies and audio of one video clip: at least one of them. Clip-
    vector and face-set members use the faces; a multimodal member uses all four."""

    model_config = _STRICT
    faces: list[Face] = Field(
        default_factory=list, max_length=MAX_FACES_PER_CLIP,
        description="face detections; may be empty or absent when the clip has heads, "
                    "bodies or audio (then only multimodal members can score it)")
    clip: str | None = Field(None, max_length=256, description="a name, echoed in the answer")
    heads: list[Head] | None = Field(None, max_length=MAX_FACES_PER_CLIP,
                                     description="head detections (multimodal members)")
    bodies: list[Body] | None = Field(None, max_length=MAX_FACES_PER_CLIP,
                                      description="body detections (multimodal members)")
    audio: Audio | None = Field(None, description="the clip's audio feature (multimodal members)")

    @model_validator(mode="after")
    def _not_empty(self) -> "Clip":
        if self.items() == 0:
            name = f" {self.clip!r}" if self.clip is not None else ""
            raise ValueError(f"clip{name} has no face, head, body or audio: send at least one")
        _one_length_per_modality([self], single=True)
        return self

    def items(self) -> int:
        """Faces + heads + bodies + audio vectors (the request size limits count these)."""
        return (len(self.faces) + len(self.heads or ()) + len(self.bodies or ())
                + (self.audio is not None))


def _one_length_per_modality(clips: Sequence[Clip], single: bool = False) -> None:
    """ValueError naming two list features of one modality with different lengths."""
    first: dict[str, tuple[str, int]] = {}
    for i, c in enumerate(clips):
        prefix = "" if single else f"clips.{i}."
        items = [("head", f"heads.{j}", h) for j, h in enumerate(c.heads or ())]
        items += [("body", f"bodies.{j}", b) for j, b in enumerate(c.bodies or ())]
        items += [("audio", "audio", c.audio)] if c.audio is not None else []
        for modality, where, item in items:
            if item.feature is None:
                continue
            loc, n = f"{prefix}{where}.feature", len(item.feature)
            seen = first.setdefault(modality, (loc, n))
            if seen[1] != n:
                raise ValueError(f"{loc} has {n} values but {seen[0]} has {seen[1]}: one "
                                 f"length per modality in a request")


class IdentifyRequest(Clip):
    """`POST /identify`: one clip."""

    top_k: TopK | None = Field(None, description="identities to return (default: the app's)")


class BatchRequest(BaseModel):
    """`POST /identify/batch`: many clips, answered in order."""

    model_config = _STRICT
    clips: list[Clip] = Field(min_length=1, max_length=MAX_CLIPS_PER_BATCH)
    top_k: TopK | None = None

    @model_validator(mode="after")
    def _total_items(self) -> "BatchRequest":
        total = sum(c.items() for c in self.clips)
        if total > MAX_ITEMS_PER_REQUEST:
            raise ValueError(f"{total} faces, heads, bodies and audio vectors in one request; "
                             f"the limit is {MAX_ITEMS_PER_REQUEST}")
        _one_length_per_modality(self.clips)
        return self


class Identity(BaseModel):
    id: int = Field(description="identity id, 1..num_classes-1")
    score: float = Field(description="ensemble score in [0, 1]: weighted mean of sigmoids")


class IdentifyResponse(BaseModel):
    clip: str | None = None
    identities: list[Identity] = Field(description="top-k identities, best first")
    identity: int | None = Field(description="the answer: best id, or null for other/unknown")
    unknown: bool = Field(description="best score below the threshold, or the clip is not usable")
    best_score: float
    threshold: float
    usable: bool = Field(description="False when no member with a non-zero weight can use the "
                                     "clip: a clip-vector member needs a face with a positive "
                                     "qFF weight, a face-set member a face, a multimodal member "
                                     "any of face, head, body or audio")
    faces: int = Field(description="faces in the request's clip")


class BatchResponse(BaseModel):
    results: list[IdentifyResponse]


class SearchHit(BaseModel):
    clip: str
    score: float
    frame_min: int = Field(description="first face frame of the clip (-1: no face)")
    frame_max: int


class SearchResponse(BaseModel):
    id: int
    hits: list[SearchHit]
    index_version: int


class Health(BaseModel):
    status: str
    members: int  # checkpoints in the ensemble
    input_kinds: list[str]  # the members' input kinds (rayvid.core.inputs)
    member_deployments: int  # the deployments they are packed into
    num_classes: int
    unknown_threshold: float
    threshold_source: str
    weights: list[float]
    top_k: int
    index: str | None
    index_version: int | None
    replica: str


class ServingConfig(Config):
    """The ingress's `user_config`: applied in `reconfigure`, without a redeploy. Keys left
    out keep the run's defaults (threshold from `RUN/serving.json`, weights from
    `ensemble.json`, top_k 5, the index the app was built with)."""

    unknown_threshold: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    weights: list[Annotated[float, Field(ge=0.0, allow_inf_nan=False)]] | None = None
    top_k: TopK | None = None
    index: str | None = None


class MemberConfig(Config):
    """An `EnsembleMember`'s `user_config`: its `@serve.batch` settings."""

    max_batch_size: int = Field(16, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(0.002, ge=0.0, le=1.0)


class AppArgs(Config):
    """Arguments of `rayvid.infer.app:app_builder` (the `args:` of a Serve config file).

    run: a run folder of `jobs/train.py` (ensemble.json + checkpoints).
    index: a person-search index of `jobs/index.py`, or None (then /search answers 503).
    members / ingress: Serve deployment options (autoscaling_config, max_ongoing_requests,
        ray_actor_options, user_config, ...) for every member deployment / for the ingress.
    members_per_deployment: checkpoints per member deployment; 0 (default) packs the whole
        ensemble into one (one handle call per ingress batch: the fastest on CPU, where
        the models are small). 1 gives each checkpoint its own deployment (to spread a
        large ensemble over GPUs or nodes).
    """

    run: str
    index: str | None = None
    members_per_deployment: int = Field(0, ge=0)
    members: dict[str, Any] = Field(default_factory=dict)
    ingress: dict[str, Any] = Field(default_factory=dict)


# ------------------------------------------------------------------ requests <-> arrays


def clip_parts(clips: Sequence[Clip], dims: Sequence[int], single: bool = False) -> ClipParts:
    """Validated clips -> their detections, flat (`rayvid.core.inputs.ClipParts`, the
    layout `inputs.build` takes; features float16 like the prepared dataset's).

    dims: the run's head, body and audio feature lengths (`InputSpec.dims`); a feature of
    another length raises `FieldError` naming it (`clips.<i>.heads.<j>.feature`, or
    `heads.<j>.feature` with `single`, the body of `/identify`) and both lengths.
    A modality no clip has is None (audio: None unless some clip has it)."""
    hd, bd, ad = (int(d) for d in dims)

    def loc(i: int, *rest: str | int) -> tuple[str | int, ...]:
        return (*(() if single else ("clips", i)), *rest)

    faces = [f for c in clips for f in c.faces]
    feat = np.empty((len(faces), FEATURE_DIM), np.float16)
    for i, f in enumerate(faces):
        feat[i] = f.vector()  # list of numbers or decoded float16: cast like the dataset
    face_parts = FaceParts(
        feat, np.array([f.det_score for f in faces], np.float32),
        np.array([f.quality_score for f in faces], np.float32),
        offsets_from_counts(np.array([len(c.faces) for c in clips], np.int64)))
    heads = bodies = audio = None
    if any(c.heads for c in clips):
        vecs = [h.vector(hd, loc(i, "heads", j), "head")
                for i, c in enumerate(clips) for j, h in enumerate(c.heads or ())]
        heads = HeadParts(np.stack(vecs), np.array([h.det_score for c in clips for h in c.heads or ()],
                                                   np.float32),
                          offsets_from_counts(np.array([len(c.heads or ()) for c in clips], np.int64)))
    if any(c.bodies for c in clips):
        vecs = [b.vector(bd, loc(i, "bodies", j), "body")
                for i, c in enumerate(clips) for j, b in enumerate(c.bodies or ())]
        bodies = BodyParts(np.stack(vecs), offsets_from_counts(
            np.array([len(c.bodies or ()) for c in clips], np.int64)))
    if any(c.audio is not None for c in clips):
        present = np.array([c.audio is not None for c in clips])
        feat_a = np.zeros((len(clips), ad), np.float16)
        for i, c in enumerate(clips):
            if c.audio is not None:
                feat_a[i] = c.audio.vector(ad, loc(i, "audio"), "audio")
        audio = AudioParts(feat_a, present)
    return ClipParts(face_parts, heads, bodies, audio)


def concat_parts(parts: Sequence[ClipParts]) -> ClipParts:
    """Several requests' `ClipParts` (of one run: equal dims) -> one, clips in order."""
    if len(parts) == 1:
        return parts[0]
    ns = [p.n for p in parts]

    def offsets(counts: Sequence[np.ndarray]) -> np.ndarray:
        return offsets_from_counts(np.concatenate(counts).astype(np.int64))

    f = [p.faces for p in parts]
    faces = FaceParts(np.concatenate([x.feat for x in f]), np.concatenate([x.det for x in f]),
                      np.concatenate([x.quality for x in f]), offsets([np.diff(x.offsets) for x in f]))
    out: dict[str, Any] = {}
    for name in ("heads", "bodies"):
        given = [getattr(p, name) for p in parts]
        some = next((g for g in given if g is not None), None)
        if some is None:
            out[name] = None
            continue
        empty = [np.zeros((0,) + a.shape[1:], a.dtype) for a in some[:-1]]
        arrays = [g[:-1] if g is not None else empty for g in given]
        counts = [np.diff(g.offsets) if g is not None else np.zeros(n, np.int64)
                  for g, n in zip(given, ns)]
        out[name] = type(some)(*(np.concatenate(a) for a in zip(*arrays)), offsets(counts))
    audio = [p.audio for p in parts]
    some = next((a for a in audio if a is not None), None)
    out["audio"] = None if some is None else AudioParts(
        np.concatenate([a.feat if a is not None else np.zeros((n, some.feat.shape[1]), some.feat.dtype)
                        for a, n in zip(audio, ns)]),
        np.concatenate([a.present if a is not None else np.zeros(n, bool) for a, n in zip(audio, ns)]))
    return ClipParts(faces, **out)


def answers(scores: np.ndarray, ok: np.ndarray, top_k: int, threshold: float,
            counts: np.ndarray, names: Sequence[str | None]) -> list[dict[str, Any]]:
    """Per clip: top-k identities (class 0 = other is never listed), best first, ties by
    the lower id; unknown when the best is below `threshold` or the clip is not ok (no
    member can use it: its scores are then all 0). counts: faces per clip."""
    ids, vals = top_classes(scores[:, 1:], top_k)  # column j is identity j + 1
    out = []
    for i in range(len(scores)):
        best = float(vals[i, 0])
        unknown = bool(best < threshold or not ok[i])
        out.append({"clip": names[i], "identities": [
            {"id": int(c) + 1, "score": float(v)} for c, v in zip(ids[i], vals[i])],
            "identity": None if unknown else int(ids[i, 0]) + 1, "unknown": unknown,
            "best_score": best, "threshold": threshold, "usable": bool(ok[i]),
            "faces": int(counts[i])})
    return out
