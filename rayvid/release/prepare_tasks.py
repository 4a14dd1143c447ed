"""The two kinds of task `rayvid.release.prepare` runs, each in this process or in a worker process.

- `spill_file(SpillTask, ctx) -> SpillResult`: stream one modality pickle of a split
  (`pickle_reader.iter_dict_items`), validate each clip (`clip_values.parse_detections` /
  `parse_audio`) and append it to the split's spill buckets (`bucketing.SpillWriter`,
  files `SPILL/<split>/<modality>-XXXXX.arrow`).
- `write_bucket(WriteTask, ctx) -> WriteResult`: join one bucket's face/head/body/audio
  rows (`bucketing.JoinedBucket`) and write them as one Parquet file, in row groups of at
  most ROW_GROUP_CLIPS clips and about ROW_GROUP_BYTES.

Tasks and results are plain picklable dataclasses; a task touches only its own files, so
any number run side by side. A bad clip raises `BadClipError` (on_bad_clip "fail") or is
returned in `SpillResult.skipped` ("skip"); the caller decides what the run does with it.
`ctx` is a `task_pool.TaskContext` (progress events, cancellation).
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rayvid.release import bucketing
from rayvid.release.memory import release_memory
from rayvid.release.clip_values import BadClipError, clip_name, parse_audio, parse_detections
from rayvid.release.pickle_reader import iter_dict_items
from rayvid.release.schema import COUNT_COLUMN, DATASET_SCHEMA, MODALITIES
from rayvid.release.task_pool import TaskContext

# The reader's errors take (path, offset, ...) in __init__; carry them across processes.

ROW_GROUP_CLIPS = 1024
ROW_GROUP_BYTES = 16 * bucketing.MiB  # the Parquet writer needs a few times a row group
PROGRESS_SECONDS = 30.0
CANCEL_CHECK_ITEMS = 256


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass(frozen=True)
class SpillTask:
    """One pickle to spill: `path` holds `modality` of `split`; buckets go to `folder`.

    feat_dim: the required feature length (faces: 512) or None to take the first clip's
    (then checked across the file's clips). present: return the spilled clip names.
    """

    split: str
    modality: str
    path: Path
    folder: Path
    n_buckets: int
    on_bad_clip: str
    feat_dim: int | None
    present: bool


@dataclass
class SpillResult:
    """items: dict items read; dim: feature length found (None: no detection in the file);
    present: spilled clip names (if asked); skipped: bad clips as
    {"split", "clip", "file", "field", "reason"} in file order ("skip" only)."""

    task: SpillTask
    items: int
    dim: int | None
    present: list[str]
    skipped: list[dict]
    seconds: float
    peak_rss_bytes: int


def _file_event(task: SpillTask, items: int, seconds: float, done: bool) -> dict:
    return {"event": "file", "split": task.split, "modality": task.modality,
            "file": str(task.path), "items": items, "seconds": seconds, "done": done,
            "peak_rss_bytes": peak_rss_bytes()}


def spill_file(task: SpillTask, ctx: TaskContext) -> SpillResult:
    """Pass 1 for one pickle (see the module docstring)."""
    path, modality = task.path, task.modality
    t0 = last = time.perf_counter()
    n, dim = 0, task.feat_dim
    present: list[str] = []
    skipped: list[dict] = []
    with bucketing.SpillWriter(task.folder, modality, task.n_buckets) as writer:
        for key, value in iter_dict_items(path):
            n += 1
            try:
                clip = clip_name(key, path)
                if modality == "audio":
                    arrays = parse_audio(value, file=path, clip=clip, feat_dim=dim)
                    found = arrays.shape[0]
                else:
                    arrays = parse_detections(value, modality, file=path, clip=clip,
                                              feat_dim=dim)
                    found = arrays["feat"].shape[1] if len(arrays["feat"]) else None
            except BadClipError as e:
                if task.on_bad_clip == "fail":
                    raise
                skipped.append({"split": task.split, "clip": e.clip, "file": e.file,
                                "field": e.field, "reason": e.reason})
                continue
            if dim is None and found:
                dim = found
            writer.add(clip, arrays)
            if task.present:
                present.append(clip)
            if n % CANCEL_CHECK_ITEMS == 0:
                ctx.check_cancelled()
                if time.perf_counter() - last > PROGRESS_SECONDS:
                    last = time.perf_counter()
                    ctx.report(_file_event(task, n, last - t0, done=False))
    release_memory()
    return SpillResult(task, n, dim, present, skipped, time.perf_counter() - t0,
                       peak_rss_bytes())


@dataclass(frozen=True)
class WriteTask:
    """One bucket of `split` to join from `spill` and write to `path`.

    files: modality -> pickle (named in errors); labels: {clip: id} and ranks:
    {clip: strat_rank} of the bucket's clips (train/val; empty for test); skipped: clip
    names to leave out.
    """

    split: str
    bucket: int
    spill: Path
    path: Path
    files: dict[str, Path]
    labels: dict[str, int]
    ranks: dict[str, int]
    skipped: frozenset[str] = field(default_factory=frozenset)


STAT_KEYS = ("clips", "faces", "heads", "bodies", "audio", "labelled", "noise", "no_faces")


@dataclass
class WriteResult:
    """path: the file written, or None when the bucket has no clip; stats: STAT_KEYS counts."""

    task: WriteTask
    path: Path | None
    stats: dict[str, int]
    seconds: float
    peak_rss_bytes: int


def write_bucket(task: WriteTask, ctx: TaskContext) -> WriteResult:
    """Pass 2 for one bucket (see the module docstring); removes its spill files."""
    t0 = time.perf_counter()
    stats = dict.fromkeys(STAT_KEYS, 0)
    joined = bucketing.JoinedBucket(task.split,
                                    lambda m: bucketing.read_bucket(task.spill, m, task.bucket),
                                    task.files, task.labels, task.ranks, set(task.skipped))
    written = None
    if joined.num_rows:
        _write_part(joined, task.path, stats, ctx)
        written = task.path
    del joined
    for m in MODALITIES:
        bucketing.spill_path(task.spill, m, task.bucket).unlink(missing_ok=True)
    release_memory()
    return WriteResult(task, written, stats, time.perf_counter() - t0, peak_rss_bytes())


# Features are float16 noise to a compressor: store them plain (compressing and dictionary
# encoding them made writing ~5x slower for <1% of size); snappy for the small columns.
_COMPRESSION = {f.name: "none" if f.name.endswith("_feat") else "snappy" for f in DATASET_SCHEMA}
_STATISTICS = ["clip", "split", "label", "strat_rank", *COUNT_COLUMN.values()]


def _write_part(joined: bucketing.JoinedBucket, path: Path, stats: dict,
                ctx: TaskContext) -> None:
    """Write one bucket as a Parquet file, a row group at a time."""
    with pq.ParquetWriter(path, DATASET_SCHEMA, compression=_COMPRESSION, use_dictionary=["split"],
                          write_statistics=_STATISTICS) as writer:
        for start, stop in joined.row_groups(ROW_GROUP_CLIPS, ROW_GROUP_BYTES):
            ctx.check_cancelled()
            table = joined.rows(start, stop)
            writer.write_table(table, row_group_size=stop - start)
            _add_stats(stats, table)
            del table
            # mimalloc (pyarrow's default pool) otherwise keeps the encoder's peak resident.
            pa.default_memory_pool().release_unused()


def _sum(values) -> int:
    return pc.sum(values).as_py() or 0


def _add_stats(stats: dict, table: pa.Table) -> None:
    stats["clips"] += table.num_rows
    stats["faces"] += _sum(table["n_faces"])
    stats["heads"] += _sum(table["n_heads"])
    stats["bodies"] += _sum(table["n_bodies"])
    stats["audio"] += _sum(pc.greater(pc.binary_length(table["audio_feat"]), 0))
    stats["labelled"] += _sum(pc.greater(table["label"], 0))
    stats["noise"] += _sum(pc.equal(table["label"], 0))
    stats["no_faces"] += _sum(pc.equal(table["n_faces"], 0))
