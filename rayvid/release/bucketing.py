"""The external hash join that `rayvid.release.prepare` runs over a release: spill, then join.

Pass 1 streams a modality pickle and appends each validated clip to bucket
`crc32(clip) % n_buckets` of that modality, an Arrow IPC stream file on disk; pass 2 reads
the face/head/body/audio parts of one bucket (all of a clip's rows land in the same bucket,
whatever the order of the four dicts) and joins them in memory. Memory is O(bucket +
buffer), independent of the release size.

Spill rows use the dataset's own column names and types (`rayvid.release.schema`): `clip` plus the
modality's columns, e.g. `n_faces, face_frame, face_bbox, face_det, face_quality, face_feat`
(features as one float16 blob per clip).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rayvid.core.fusion import offsets_from_counts
from rayvid.release.layout import BadClipError
from rayvid.release.schema import (DATASET_SCHEMA, LABELLED_SPLITS, MODALITIES, MODALITY_FIELDS,
                           NOISE_LABEL, feat_blobs)

MiB = 1 << 20
DEFAULT_BUCKET_BYTES = 64 * MiB
DEFAULT_BUFFER_BYTES = 32 * MiB  # all buckets' pending rows together
MAX_BATCH_CLIPS = 1024
# One open IPC file per bucket while a pickle is read: stay under `ulimit -n`. At the cap
# (72 GiB of pickles per split at 96 MiB) buckets grow instead; a bucket's list columns hold
# at most 2**31 values (4 GiB of float16 features), far above that.
MAX_BUCKETS = 768


def bucket_of(clip: str, n_buckets: int) -> int:
    """Stable bucket of a clip name: crc32 of its UTF-8 bytes modulo n_buckets."""
    return zlib.crc32(clip.encode("utf-8")) % n_buckets


def choose_n_buckets(total_bytes: int, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> int:
    """Buckets for a split whose pickles total `total_bytes`, so one is ~bucket_bytes.

    Pickled float16 features take about as many bytes as their Arrow form, so the file
    sizes are a good estimate of the spilled size.
    """
    return int(min(MAX_BUCKETS, max(1, -(-total_bytes // max(1, bucket_bytes)))))


def spill_schema(modality: str) -> pa.Schema:
    """`clip` plus the dataset columns of one modality (e.g. n_heads, head_frame, ...)."""
    return pa.schema([pa.field("clip", pa.string(), nullable=False)] + MODALITY_FIELDS[modality])


def _list_column(parts: list[np.ndarray], counts: np.ndarray,
                 value_type: pa.DataType) -> pa.ListArray:
    """Concatenate per-clip arrays (first axis = detections) into one list column."""
    n_det = int(counts.sum())
    if n_det == 0:
        values = pa.array([], value_type)
        offsets = np.zeros(len(counts) + 1, np.int32)
    else:
        flat = np.concatenate([p.reshape(-1) for p in parts])
        values = pa.array(flat, value_type)  # parse_detections gives the schema's dtypes
        offsets = offsets_from_counts(counts) * (flat.size // n_det)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)


def detections_batch(modality: str, clips: list[str],
                     items: list[dict[str, np.ndarray]]) -> pa.RecordBatch:
    """Rows (clip + modality columns) for validated clips from `clip_values.parse_detections`."""
    fields = MODALITY_FIELDS[modality]
    counts = np.array([len(it["frame"]) for it in items], np.int32)
    cols = [pa.array(clips, pa.string()), pa.array(counts)]
    for field in fields[1:]:
        key = field.name.split("_", 1)[1]  # face_feat -> feat
        if key == "feat":
            cols.append(feat_blobs([it[key] for it in items]))
        else:
            cols.append(_list_column([it[key] for it in items], counts, field.type.value_type))
    return pa.RecordBatch.from_arrays(cols, schema=spill_schema(modality))


def audio_batch(clips: list[str], feats: list[np.ndarray]) -> pa.RecordBatch:
    """Rows (clip, audio_feat) for validated audio vectors from `clip_values.parse_audio`."""
    return pa.RecordBatch.from_arrays([pa.array(clips, pa.string()), feat_blobs(feats)],
                                      schema=spill_schema("audio"))


def _nbytes(value: dict[str, np.ndarray] | np.ndarray) -> int:
    if isinstance(value, np.ndarray):
        return value.nbytes + 64
    return sum(a.nbytes for a in value.values()) + 64


class SpillWriter:
    """Appends one modality's validated clips to per-bucket IPC files in `folder`.

    Rows are buffered per bucket and flushed as a record batch when the bucket's buffer
    reaches MAX_BATCH_CLIPS clips or its share of `buffer_bytes`, so at most about
    `buffer_bytes` of clips are held whatever the number of buckets.
    """

    def __init__(self, folder: Path, modality: str, n_buckets: int,
                 buffer_bytes: int = DEFAULT_BUFFER_BYTES):
        self.folder, self.modality, self.n_buckets = Path(folder), modality, n_buckets
        self.folder.mkdir(parents=True, exist_ok=True)
        self._flush_bytes = max(256 * 1024, buffer_bytes // n_buckets)
        self._pending: dict[int, tuple[list, list, list]] = {}  # bucket -> clips, values, [bytes]
        self._writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
        self._sinks: dict[int, pa.NativeFile] = {}

    def add(self, clip: str, value: dict[str, np.ndarray] | np.ndarray) -> None:
        b = bucket_of(clip, self.n_buckets)
        clips, values, size = self._pending.setdefault(b, ([], [], [0]))
        clips.append(clip)
        values.append(value)
        size[0] += _nbytes(value)
        if len(clips) >= MAX_BATCH_CLIPS or size[0] >= self._flush_bytes:
            self._flush(b)

    def _flush(self, b: int) -> None:
        clips, values, _ = self._pending.pop(b)
        if self.modality == "audio":
            batch = audio_batch(clips, values)
        else:
            batch = detections_batch(self.modality, clips, values)
        if b not in self._writers:
            sink = pa.OSFile(str(spill_path(self.folder, self.modality, b)), "wb")
            self._sinks[b] = sink
            self._writers[b] = pa.ipc.new_stream(sink, batch.schema)
        self._writers[b].write_batch(batch)

    def close(self, flush: bool = True) -> None:
        """Write out pending rows (unless `flush` is False: after an error) and close files."""
        for b in list(self._pending) if flush else ():
            self._flush(b)
        self._pending.clear()
        for b, w in self._writers.items():
            w.close()
            self._sinks[b].close()
        self._writers.clear()
        self._sinks.clear()

    def __enter__(self) -> "SpillWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(flush=exc_type is None)


def spill_path(folder: Path, modality: str, bucket: int) -> Path:
    return Path(folder) / f"{modality}-{bucket:05d}.arrow"


def read_bucket(folder: Path, modality: str, bucket: int) -> list[pa.RecordBatch]:
    """All spilled record batches of one modality in one bucket (none if it has no rows)."""
    path = spill_path(folder, modality, bucket)
    if not path.exists():
        return []
    with pa.OSFile(str(path), "rb") as f:
        return list(pa.ipc.open_stream(f))


def _empty_row(modality: str) -> pa.RecordBatch:
    """One row with no detections: what a clip absent from a modality's pickle gets."""
    cols = [pa.array([""], pa.string())]
    for f in MODALITY_FIELDS[modality]:
        empty = 0 if f.type == pa.int32() else b"" if pa.types.is_large_binary(f.type) else []
        cols.append(pa.array([empty], f.type))
    return pa.RecordBatch.from_arrays(cols, schema=spill_schema(modality))


def _check_unique(table: pa.Table, file: Path) -> None:
    if pc.count_distinct(table["clip"]).as_py() == table.num_rows:
        return
    counts = pc.value_counts(table["clip"])
    dup = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
    raise BadClipError(file, dup, "key", "listed more than once in the file")


class JoinedBucket:
    """The clips of one bucket with all modalities joined on clip, sorted by clip name.

    parts: modality -> spilled batches (`read_bucket`; the list is emptied to free them as
    they are combined), or a callable modality -> batches, called for one modality at a
    time so that only one modality's batches exist beside the combined tables; files:
    modality -> pickle path (for errors); labels: {clip: id} of the split's gt; ranks:
    {clip: strat_rank} (train/val); skipped: clip names to leave out.
    `rows(start, stop)` builds dataset rows lazily so only one row group is materialised
    beyond the bucket itself.
    """

    def __init__(self, split: str,
                 parts: dict[str, list[pa.RecordBatch]] | Callable[[str], list[pa.RecordBatch]],
                 files: dict[str, Path], labels: dict[str, int], ranks: dict[str, int],
                 skipped: set[str]):
        load = parts if callable(parts) else parts.__getitem__
        self.tables = {}
        for m in MODALITIES:
            # The empty row goes last: clips absent from this modality point at it. One
            # chunk per column, because take() over many chunks concatenates them per call.
            batches = load(m)
            self.tables[m] = pa.Table.from_batches(batches + [_empty_row(m)]).combine_chunks()
            batches.clear()
            del batches
            pa.default_memory_pool().release_unused()  # mimalloc keeps freed batches resident
        spilled = {m: t["clip"].chunk(0).slice(0, t.num_rows - 1) for m, t in self.tables.items()}
        names = pc.unique(pa.chunked_array(list(spilled.values()), pa.string()))
        if skipped and len(names):
            drop = pc.is_in(names, value_set=pa.array(list(skipped), pa.string()))
            names = names.filter(pc.invert(drop))
        self.names = names.take(pc.array_sort_indices(names))
        self.num_rows = len(self.names)
        clips = self.names.to_pylist()
        self.split = pa.array([split] * self.num_rows, pa.string())
        if split in LABELLED_SPLITS:
            self.label = pa.array([labels.get(c, NOISE_LABEL) for c in clips], pa.int32())
            self.rank = pa.array([ranks[c] for c in clips], pa.int32())
        else:
            self.label = self.rank = pa.nulls(self.num_rows, pa.int32())
        self.index = {}
        for m, table in self.tables.items():
            n = table.num_rows - 1
            _check_unique(table.slice(0, n), files[m])
            idx = pc.index_in(self.names, value_set=spilled[m])
            self.index[m] = pc.fill_null(idx, n)

    def row_groups(self, max_rows: int, max_bytes: int) -> list[tuple[int, int]]:
        """[start, stop) ranges of at most max_rows clips and about max_bytes of data each.

        A Parquet writer needs several times a row group's size while it encodes it, so a
        row group is cut by bytes too: clips with hundreds of faces would make 1k-clip row
        groups huge.
        """
        size = np.zeros(self.num_rows, np.float64)
        for m, table in self.tables.items():
            if m == "audio":
                size += table.nbytes / table.num_rows
                continue
            count = table[MODALITY_FIELDS[m][0].name]  # n_faces, n_heads, n_bodies
            per_detection = table.nbytes / max(1, pc.sum(count).as_py() or 0)
            per_clip = count.chunk(0).take(self.index[m]).to_numpy(zero_copy_only=False)
            size += per_clip * per_detection
        ranges, start, cum = [], 0, np.cumsum(size)
        while start < self.num_rows:
            base = cum[start - 1] if start else 0
            stop = int(np.searchsorted(cum, base + max_bytes, side="right"))
            stop = min(max(stop, start + 1), start + max_rows, self.num_rows)
            ranges.append((start, stop))
            start = stop
        return ranges

    def rows(self, start: int, stop: int) -> pa.Table:
        """Dataset rows [start, stop) in `schema.DATASET_SCHEMA`."""
        n = stop - start
        cols = [self.names.slice(start, n), self.split.slice(start, n),
                self.label.slice(start, n), self.rank.slice(start, n)]
        for m in MODALITIES:
            taken = self.tables[m].take(self.index[m].slice(start, n))
            cols += [taken[f.name] for f in MODALITY_FIELDS[m]]
        return pa.Table.from_arrays(cols, schema=DATASET_SCHEMA)
