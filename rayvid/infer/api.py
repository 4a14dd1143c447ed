"""The serving API: pydantic request/response models, limits, settings, and the numpy
conversions between requests, score matrices and answers.

No Ray, no torch: `rayvid.infer.app` wraps these in a FastAPI ingress. Every rule a request
must follow lives here, so FastAPI answers a bad body with a 422 naming the field before
any fusion or model code runs:

- a clip is 1 to `MAX_FACES_PER_CLIP` faces, each with the official fields `det_score`,
  `quality_score` and `feature` (512 finite numbers; |x| <= 65504, the float16 range the
  prepared dataset stores and the models were trained on) or `feature_b64` (the same 512
  values as little-endian float16 or float32 bytes, base64: ~4x less JSON to parse);
- optional `bbox`, `frame`, and clip-level `heads`, `bodies`, `audio` are validated and
  accepted; clip-vector ensembles (M1-M5) do not use them;
- `/identify/batch` takes 1 to `MAX_CLIPS_PER_BATCH` clips and at most
  `MAX_FACES_PER_REQUEST` faces in all; a body over `MAX_BODY_BYTES` gets a 413;
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
from rayvid.infer.predict import top_classes

FEATURE_DIM = 512
MAX_FACES_PER_CLIP = 1000
MAX_CLIPS_PER_BATCH = 256
MAX_FACES_PER_REQUEST = 8192
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


def decode_b64_feature(text: str) -> np.ndarray:
    """`feature_b64` -> (512,) float16; ValueError with a message when malformed."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("feature_b64 is not valid base64") from None
    if len(raw) == 2 * FEATURE_DIM:
        vec = np.frombuffer(raw, "<f2")
    elif len(raw) == 4 * FEATURE_DIM:
        vec = np.frombuffer(raw, "<f4")
        if np.isfinite(vec).all() and np.abs(vec).max() > F16_MAX:
            raise ValueError(f"feature_b64 has values outside the float16 range +-{F16_MAX}")
        vec = vec.astype(np.float16)
    else:
        raise ValueError(f"feature_b64 must decode to {FEATURE_DIM} float16 ({2 * FEATURE_DIM} "
                         f"bytes) or float32 ({4 * FEATURE_DIM} bytes), got {len(raw)} bytes")
    if not np.isfinite(vec).all():
        raise ValueError("feature_b64 has NaN or infinite values")
    return vec


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


class Detection(BaseModel):
    """A head or body detection (accepted; clip-vector ensembles do not use it)."""

    model_config = _STRICT
    feature: AuxVector
    det_score: Finite | None = None
    bbox: BBox | None = None
    frame: Frame | None = None


class Clip(BaseModel):
    """The faces (and optionally heads, bodies, audio) of one video clip."""

    model_config = _STRICT
    faces: list[Face] = Field(min_length=1, max_length=MAX_FACES_PER_CLIP)
    clip: str | None = Field(None, max_length=256, description="a name, echoed in the answer")
    heads: list[Detection] | None = Field(None, max_length=MAX_FACES_PER_CLIP)
    bodies: list[Detection] | None = Field(None, max_length=MAX_FACES_PER_CLIP)
    audio: AuxVector | None = None


class IdentifyRequest(Clip):
    """`POST /identify`: one clip."""

    top_k: TopK | None = Field(None, description="identities to return (default: the app's)")


class BatchRequest(BaseModel):
    """`POST /identify/batch`: many clips, answered in order."""

    model_config = _STRICT
    clips: list[Clip] = Field(min_length=1, max_length=MAX_CLIPS_PER_BATCH)
    top_k: TopK | None = None

    @model_validator(mode="after")
    def _total_faces(self) -> "BatchRequest":
        total = sum(len(c.faces) for c in self.clips)
        if total > MAX_FACES_PER_REQUEST:
            raise ValueError(f"{total} faces in one request; the limit is {MAX_FACES_PER_REQUEST}")
        return self


class Identity(BaseModel):
    id: int = Field(description="identity id, 1..num_classes-1")
    score: float = Field(description="ensemble score in [0, 1]: weighted mean of sigmoids")


class IdentifyResponse(BaseModel):
    clip: str | None = None
    identities: list[Identity] = Field(description="top-k identities, best first")
    identity: int | None = Field(description="the answer: best id, or null for other/unknown")
    unknown: bool = Field(description="best score below the threshold, or no usable face")
    best_score: float
    threshold: float
    usable: bool = Field(description="False when no face had a positive qFF weight")
    faces: int


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


def clip_arrays(clips: Sequence[Clip]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validated clips -> flat faces: feat (F, 512) float16, det (F,) float32,
    quality (F,) float32, counts (n_clips,) int64 (the layout `fusion.qff` takes)."""
    faces = [f for c in clips for f in c.faces]
    feat = np.empty((len(faces), FEATURE_DIM), np.float16)
    for i, f in enumerate(faces):
        feat[i] = f.vector()  # list of numbers or decoded float16: cast like the dataset
    det = np.array([f.det_score for f in faces], np.float32)
    quality = np.array([f.quality_score for f in faces], np.float32)
    return feat, det, quality, np.array([len(c.faces) for c in clips], np.int64)


def answers(scores: np.ndarray, ok: np.ndarray, top_k: int, threshold: float,
            counts: np.ndarray, names: Sequence[str | None]) -> list[dict[str, Any]]:
    """Per clip: top-k identities (class 0 = other is never listed), best first, ties by
    the lower id; unknown when the best is below `threshold` or the clip is not ok."""
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
