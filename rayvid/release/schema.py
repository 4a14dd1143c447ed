"""The prepared dataset's Arrow schema and zero-copy accessors (design.md section 2).

One row per clip. Faces, heads and bodies are variable-length per clip: frames, boxes and
scores are flat list columns, features are one binary blob per clip (the clip's
`(n, dim)` float16 little-endian values, row-major), and the per-clip counts (`n_faces`,
`n_heads`, `n_bodies`) give the offsets: a `batch_format="pyarrow"` `map_batches` gets the
whole batch's faces as one `(F, 512)` float16 array, a view of the Arrow buffer, without a
Python loop per clip or per face.

    feat, det, quality, offsets = face_arrays(batch)   # batch: pa.Table or pa.RecordBatch

`rayvid.release.prepare` writes this schema; `rayvid.data.pipeline` reads it. Format version 2 (blobs)
replaced version 1 (`list<float16>` features, ~15x slower to write and ~8x slower to read
in Parquet); a version-1 dataset is refused with `DatasetFormatError`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from rayvid.core.fusion import offsets_from_counts

FORMAT_NAME = "rayvid-dataset"
FORMAT_VERSION = 2
META_FILE = "_rayvid_dataset.json"
SPLITS = ("train", "val", "test")
LABELLED_SPLITS = ("train", "val")
MODALITIES = ("face", "head", "body", "audio")
FACE_DIM = 512
BBOX_LEN = 4
NOISE_LABEL = 0
FEAT_DTYPE = np.dtype("<f2")  # feature blobs: float16, little-endian, row-major

_i32 = pa.int32()
_li32 = pa.list_(pa.int32())
_lf32 = pa.list_(pa.float32())
_blob = pa.large_binary()

# Per-modality columns, in the order they appear in the dataset. The count column is
# first; every list column holds `per_item` values per detection; the `*_feat` blob of a
# clip holds count x dim float16 values (audio: dim values, or none).
FACE_FIELDS = [
    pa.field("n_faces", _i32, nullable=False),
    pa.field("face_frame", _li32, nullable=False),
    pa.field("face_bbox", _li32, nullable=False),
    pa.field("face_det", _lf32, nullable=False),
    pa.field("face_quality", _lf32, nullable=False),
    pa.field("face_feat", _blob, nullable=False),
]
HEAD_FIELDS = [
    pa.field("n_heads", _i32, nullable=False),
    pa.field("head_frame", _li32, nullable=False),
    pa.field("head_bbox", _li32, nullable=False),
    pa.field("head_det", _lf32, nullable=False),
    pa.field("head_feat", _blob, nullable=False),
]
BODY_FIELDS = [
    pa.field("n_bodies", _i32, nullable=False),
    pa.field("body_frame", _li32, nullable=False),
    pa.field("body_bbox", _li32, nullable=False),
    pa.field("body_feat", _blob, nullable=False),
]
AUDIO_FIELDS = [pa.field("audio_feat", _blob, nullable=False)]

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


class DatasetFormatError(ValueError):
    """A dataset (or a column of one) is not of this rayvid's FORMAT_VERSION."""


def check_version(meta: dict, dataset: object) -> dict:
    """`meta` (a dataset's `_rayvid_dataset.json`) if it is of FORMAT_VERSION, else
    DatasetFormatError naming `dataset` and telling how to rebuild it."""
    version = meta.get("version")
    if version != FORMAT_VERSION:
        raise DatasetFormatError(
            f"{dataset} is a rayvid dataset of format version {version}; this rayvid reads "
            f"version {FORMAT_VERSION} (features as float16 blobs): re-run jobs/prepare.py "
            f"--release {meta.get('source', 'RELEASE')} --out {dataset} --force")
    return meta


def find_meta(dataset: str | Path) -> dict | None:
    """The meta (`META_FILE`) of a complete rayvid dataset at `dataset`, of any format
    version, or None when `dataset` holds none (no META_FILE: missing, empty, or a conversion
    that never finished; or a META_FILE that is not a rayvid dataset's). For callers that
    decide what to do with a folder (prepare: rebuild or leave alone); readers use
    `read_meta`."""
    try:
        return _load_meta(dataset)
    except (FileNotFoundError, DatasetFormatError):
        return None


def read_meta(dataset: str | Path) -> dict:
    """The meta of the complete rayvid dataset at `dataset`, of this FORMAT_VERSION.

    Raises FileNotFoundError naming the folder when it holds no complete dataset, and
    DatasetFormatError when META_FILE is not a rayvid dataset's or is of another version
    (the message says to re-run jobs/prepare.py --force).
    """
    return check_version(_load_meta(dataset), dataset)


def _load_meta(dataset: str | Path) -> dict:
    path = Path(dataset) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{dataset} is not a complete rayvid dataset (no {META_FILE}); "
                                "run jobs/prepare.py first")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DatasetFormatError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise DatasetFormatError(f"{path}: not a {FORMAT_NAME} meta file (no \"format\": "
                                 f"\"{FORMAT_NAME}\")")
    return meta


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


def counts(batch: pa.Table | pa.RecordBatch, name: str) -> np.ndarray:
    """(n,) int32 values of a non-null count column such as `n_faces`."""
    return _column(batch, name).to_numpy(zero_copy_only=False)


def _blob_column(batch: pa.Table | pa.RecordBatch, name: str) -> pa.LargeBinaryArray:
    col = _column(batch, name)
    if pa.types.is_large_binary(col.type):
        if col.null_count:
            raise ValueError(f"{name}: {col.null_count} null rows in a non-nullable column")
        return col
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        raise DatasetFormatError(
            f"{name} is {col.type}: a column of a format-1 dataset; this rayvid reads format "
            f"version {FORMAT_VERSION} (features as float16 blobs): re-run jobs/prepare.py "
            "--force on the release")
    raise ValueError(f"{name}: expected large_binary feature blobs, got {col.type}")


def _where(batch: pa.Table | pa.RecordBatch, row: int) -> str:
    if "clip" in batch.schema.names:
        return f"row {row} (clip {batch.column('clip')[row].as_py()})"
    return f"row {row}"


def feat_rows(batch: pa.Table | pa.RecordBatch, name: str, counts: np.ndarray,
              dim: int | None = None) -> np.ndarray:
    """The feature blobs of column `name` as one (sum(counts), dim) float16 array.

    Row i's blob must hold counts[i] x dim float16 values (2 bytes each); dim None infers it
    from the total. A read-only view of the Arrow buffer for a one-chunk column (sliced or
    not), a copy for a multi-chunk one. ValueError names the column and the first bad row.
    """
    col = _blob_column(batch, name)
    counts = np.asarray(counts, np.int64)
    if len(counts) != len(col):
        raise ValueError(f"{name}: {len(col)} rows but {len(counts)} counts")
    total = int(counts.sum())
    offsets = np.frombuffer(col.buffers()[1], np.int64, count=len(col) + 1,
                            offset=8 * col.offset)
    start, nbytes = int(offsets[0]), int(offsets[-1] - offsets[0])
    if dim is None:
        dim = nbytes // (FEAT_DTYPE.itemsize * total) if total else 0
    lengths = np.diff(offsets)
    expected = counts * (FEAT_DTYPE.itemsize * dim)
    if not np.array_equal(lengths, expected):
        i = int(np.argmax(lengths != expected))
        raise ValueError(f"{name}: {_where(batch, i)} has {lengths[i]} bytes, expected "
                         f"{counts[i]} x {dim} float16 = {expected[i]} bytes")
    if total == 0:
        return np.empty((0, dim), FEAT_DTYPE)
    out = np.frombuffer(col.buffers()[2], FEAT_DTYPE, count=total * dim, offset=start)
    out.flags.writeable = False  # a view of Arrow memory other readers share
    return out.reshape(total, dim)


def face_arrays(batch: pa.Table | pa.RecordBatch) -> FaceArrays:
    """Flat face buffers of a batch of clips (zero-copy for one-chunk columns)."""
    n_faces = counts(batch, "n_faces")
    feat = feat_rows(batch, "face_feat", n_faces, FACE_DIM)
    return FaceArrays(feat, list_values(batch, "face_det"), list_values(batch, "face_quality"),
                      offsets_from_counts(n_faces))


def head_arrays(batch: pa.Table | pa.RecordBatch, head_dim: int | None = None) -> HeadArrays:
    """Flat head buffers of a batch: feat (H, head_dim) float16, det (H,), offsets.

    head_dim: checked when given (the dataset meta's `dims.head`), else inferred.
    """
    n_heads = counts(batch, "n_heads")
    feat = feat_rows(batch, "head_feat", n_heads, head_dim)
    return HeadArrays(feat, list_values(batch, "head_det"), offsets_from_counts(n_heads))


def body_arrays(batch: pa.Table | pa.RecordBatch, body_dim: int | None = None) -> BodyArrays:
    """Flat body buffers of a batch: feat (B, body_dim) float16, offsets (body_dim as heads)."""
    n_bodies = counts(batch, "n_bodies")
    return BodyArrays(feat_rows(batch, "body_feat", n_bodies, body_dim),
                      offsets_from_counts(n_bodies))


def audio_arrays(batch: pa.Table | pa.RecordBatch, audio_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Audio of a batch: (feat (n, audio_dim) float16, zeros where absent; present (n,) bool).

    Each clip's blob is audio_dim float16 values or empty (no audio).
    """
    col = _blob_column(batch, "audio_feat")
    lengths = np.diff(np.frombuffer(col.buffers()[1], np.int64, count=len(col) + 1,
                                    offset=8 * col.offset))
    present = lengths > 0
    feat = feat_rows(batch, "audio_feat", present, audio_dim)
    out = np.zeros((len(col), audio_dim), np.float16)
    out[present] = feat
    return out, present


def feat_blobs(feats: Sequence[np.ndarray]) -> pa.LargeBinaryArray:
    """One blob per clip from per-clip float16 arrays ((n, dim) or (dim,); any n, may be 0):
    the writer's side of `feat_rows`."""
    sizes = np.fromiter((f.size for f in feats), np.int64, len(feats))
    offsets = offsets_from_counts(sizes * FEAT_DTYPE.itemsize)
    data = (np.concatenate([np.ravel(f) for f in feats]).astype(FEAT_DTYPE, copy=False)
            if int(sizes.sum()) else np.empty(0, FEAT_DTYPE))
    return pa.LargeBinaryArray.from_buffers(_blob, len(feats),
                                            [None, pa.py_buffer(offsets), pa.py_buffer(data)])
