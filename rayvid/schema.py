"""The prepared dataset's Arrow schema and zero-copy accessors (design.md section 2).

One row per clip. Faces, heads and bodies are variable-length per clip, so each field is a
flat list column and the per-clip counts (`n_faces`, `n_heads`, `n_bodies`) give the
offsets: a `batch_format="pyarrow"` `map_batches` gets the whole batch's faces as one
`(F, 512)` float16 array without a Python loop per clip or per face.

    feat, det, quality, offsets = face_arrays(batch)   # batch: pa.Table or pa.RecordBatch

`rayvid.prepare` writes this schema; `rayvid.data` reads it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pyarrow as pa

FORMAT_NAME = "rayvid-dataset"
FORMAT_VERSION = 1
META_FILE = "_rayvid_dataset.json"
SPLITS = ("train", "val", "test")
LABELLED_SPLITS = ("train", "val")
MODALITIES = ("face", "head", "body", "audio")
FACE_DIM = 512
BBOX_LEN = 4
NOISE_LABEL = 0

_i32 = pa.int32()
_li32 = pa.list_(pa.int32())
_lf32 = pa.list_(pa.float32())
_lf16 = pa.list_(pa.float16())

# Per-modality columns, in the order they appear in the dataset. The count column is
# first; every list column holds `per_item` values per detection (feat: the feature dim).
FACE_FIELDS = [
    pa.field("n_faces", _i32, nullable=False),
    pa.field("face_frame", _li32, nullable=False),
    pa.field("face_bbox", _li32, nullable=False),
    pa.field("face_det", _lf32, nullable=False),
    pa.field("face_quality", _lf32, nullable=False),
    pa.field("face_feat", _lf16, nullable=False),
]
HEAD_FIELDS = [
    pa.field("n_heads", _i32, nullable=False),
    pa.field("head_frame", _li32, nullable=False),
    pa.field("head_bbox", _li32, nullable=False),
    pa.field("head_det", _lf32, nullable=False),
    pa.field("head_feat", _lf16, nullable=False),
]
BODY_FIELDS = [
    pa.field("n_bodies", _i32, nullable=False),
    pa.field("body_frame", _li32, nullable=False),
    pa.field("body_bbox", _li32, nullable=False),
    pa.field("body_feat", _lf16, nullable=False),
]
AUDIO_FIELDS = [pa.field("audio_feat", _lf16, nullable=False)]

KEY_FIELDS = [
    pa.field("clip", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("label", _i32, nullable=True),
    pa.field("strat_rank", _i32, nullable=True),
]
MODALITY_FIELDS = {"face": FACE_FIELDS, "head": HEAD_FIELDS, "body": BODY_FIELDS,
                   "audio": AUDIO_FIELDS}
DATASET_SCHEMA = pa.schema(KEY_FIELDS + FACE_FIELDS + HEAD_FIELDS + BODY_FIELDS + AUDIO_FIELDS)
COUNT_COLUMN = {"face": "n_faces", "head": "n_heads", "body": "n_bodies"}


def fold_of(label: np.ndarray, strat_rank: np.ndarray, k: int) -> np.ndarray:
    """Fold index in [0, k) of each labelled clip: `(strat_rank + label) % k`.

    label, strat_rank: (n,) ints (train/val rows; test rows have nulls and no fold).
    Stratified for any k: within a label, ranks are dense, so fold sizes differ by <= 1.
    """
    return (np.asarray(strat_rank, np.int64) + np.asarray(label, np.int64)) % k


class FaceArrays(NamedTuple):
    feat: np.ndarray      # (F, 512) float16, not normalised; read-only view of the batch
    det: np.ndarray       # (F,) float32
    quality: np.ndarray   # (F,) float32
    offsets: np.ndarray   # (n_clips + 1,) int64; faces of clip i are [offsets[i], offsets[i+1])


class HeadArrays(NamedTuple):
    feat: np.ndarray      # (H, head_dim) float16
    det: np.ndarray       # (H,) float32
    offsets: np.ndarray   # (n_clips + 1,) int64


class BodyArrays(NamedTuple):
    feat: np.ndarray      # (B, body_dim) float16
    offsets: np.ndarray   # (n_clips + 1,) int64


def _column(batch: pa.Table | pa.RecordBatch, name: str) -> pa.Array:
    col = batch.column(name)
    if isinstance(col, pa.ChunkedArray):
        # One chunk (the usual case for a Ray Data block) is returned without a copy.
        col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    return col


def list_values(batch: pa.Table | pa.RecordBatch, name: str) -> np.ndarray:
    """Flat values of list column `name` over the batch's rows, zero-copy where possible.

    Respects list offsets of a sliced batch (`flatten`, not `.values`).
    """
    return _column(batch, name).flatten().to_numpy(zero_copy_only=False)


def offsets_from_counts(counts: np.ndarray) -> np.ndarray:
    """(n,) counts -> (n+1,) int64 offsets `[0, cumsum(counts)...]`."""
    out = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def counts(batch: pa.Table | pa.RecordBatch, name: str) -> np.ndarray:
    """(n,) int32 values of a non-null count column such as `n_faces`."""
    return _column(batch, name).to_numpy(zero_copy_only=False)


def _rows(values: np.ndarray, n_rows: int, column: str, dim: int | None) -> np.ndarray:
    if n_rows == 0:
        if values.size:
            raise ValueError(f"{column}: {values.size} values for 0 detections")
        return values.reshape(0, dim or 0)
    if values.size % n_rows or (dim is not None and values.size != n_rows * dim):
        raise ValueError(f"{column}: {values.size} values are not a whole number of "
                         f"{n_rows} detections")
    return values.reshape(n_rows, -1)


def face_arrays(batch: pa.Table | pa.RecordBatch) -> FaceArrays:
    """Flat face buffers of a batch of clips (zero-copy for one-chunk columns)."""
    offsets = offsets_from_counts(counts(batch, "n_faces"))
    n = int(offsets[-1])
    feat = list_values(batch, "face_feat")
    if feat.size != n * FACE_DIM:
        raise ValueError(f"face_feat has {feat.size} values for {n} faces x {FACE_DIM}")
    return FaceArrays(feat.reshape(n, FACE_DIM), list_values(batch, "face_det"),
                      list_values(batch, "face_quality"), offsets)


def head_arrays(batch: pa.Table | pa.RecordBatch, head_dim: int | None = None) -> HeadArrays:
    """Flat head buffers of a batch: feat (H, head_dim) float16, det (H,), offsets.

    head_dim: checked when given (the dataset meta's `dims.head`), else inferred.
    """
    offsets = offsets_from_counts(counts(batch, "n_heads"))
    feat = _rows(list_values(batch, "head_feat"), int(offsets[-1]), "head_feat", head_dim)
    return HeadArrays(feat, list_values(batch, "head_det"), offsets)


def body_arrays(batch: pa.Table | pa.RecordBatch, body_dim: int | None = None) -> BodyArrays:
    """Flat body buffers of a batch: feat (B, body_dim) float16, offsets (body_dim as heads)."""
    offsets = offsets_from_counts(counts(batch, "n_bodies"))
    feat = _rows(list_values(batch, "body_feat"), int(offsets[-1]), "body_feat", body_dim)
    return BodyArrays(feat, offsets)


def audio_arrays(batch: pa.Table | pa.RecordBatch, audio_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Audio of a batch: (feat (n, audio_dim) float16, zeros where absent; present (n,) bool)."""
    col = _column(batch, "audio_feat")
    lengths = col.value_lengths().to_numpy(zero_copy_only=False)
    present = lengths > 0
    if np.any(lengths[present] != audio_dim):
        raise ValueError(f"audio_feat: lengths {np.unique(lengths[present])} != {audio_dim}")
    out = np.zeros((len(col), audio_dim), np.float16)
    out[present] = list_values(batch, "audio_feat").reshape(-1, audio_dim)
    return out, present
