"""Convert an official release into the Parquet dataset of design.md section 2, in bounded memory.

    summary = prepare_release("/data/iqiyi", "/data/iqiyi-ds", on_bad_clip="fail")

An external hash join, because each of the four modality pickles of a split may be larger
than memory and they list clips in different orders:

1. stream each pickle (`pickle_reader.iter_dict_items`), validate each clip
   (`release.parse_detections` / `parse_audio`) and append it to spill bucket
   `crc32(clip) % P` (`rayvid.bucketing`), P chosen so that a bucket is ~`bucket_bytes`;
2. per bucket, join the face/head/body/audio rows on clip, attach label and `strat_rank`
   and write `SPLIT/part-XXXXX.parquet`, in row groups of at most 1024 clips and ~16 MiB
   (pyarrow's writer needs ~3.3x a row group of list<float16> while it encodes it).

Memory is O(bucket + batch of clips) plus the clip names of train/val (for noise labels and
`strat_rank`), independent of the release size. Everything is written to
`OUT.tmp-<pid>`; `_rayvid_dataset.json` is written last and the folder renamed to OUT.
Jobs: `jobs/prepare.py --release DIR --out DATASET`.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rayvid import bucketing
from rayvid.pickle_reader import iter_dict_items
from rayvid.release import (NUM_IDENTITIES, BadClipError, Release, clip_name, parse_audio,
                            parse_detections)
from rayvid.schema import (COUNT_COLUMN, DATASET_SCHEMA, FACE_DIM, FORMAT_NAME, FORMAT_VERSION,
                           LABELLED_SPLITS, META_FILE, MODALITIES)
from rayvid.strat import strat_ranks

log = logging.getLogger(__name__)

ON_BAD_CLIP = ("fail", "skip")
ROW_GROUP_CLIPS = 1024
ROW_GROUP_BYTES = 16 * bucketing.MiB  # the Parquet writer peaks at ~3.3x a row group
MAX_REPORTED_SKIPS = 20
PROGRESS_SECONDS = 30.0
Progress = Callable[[dict], None]


class DatasetExistsError(FileExistsError):
    """OUT exists and is not a dataset of this release that a re-run may leave alone."""


def read_meta(dataset: str | Path) -> dict | None:
    """The meta of a complete prepared dataset, or None if `dataset` is not one."""
    path = Path(dataset) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT_NAME else None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prepare_release(release_dir: str | Path, out_dir: str | Path, *, on_bad_clip: str = "fail",
                    force: bool = False, bucket_bytes: int = bucketing.DEFAULT_BUCKET_BYTES,
                    num_ids: int = NUM_IDENTITIES, progress: Progress | None = None) -> dict:
    """Write the dataset of `release_dir` to `out_dir`; returns the meta (a summary).

    A complete dataset already at out_dir, prepared from the same release, is left alone
    (the summary has `"already_prepared": True`) unless `force`. on_bad_clip: "fail" raises
    the first `BadClipError`; "skip" leaves bad clips out and lists them in the meta.
    Raises ReleaseFormatError subclasses for bad input, DatasetExistsError for an OUT that
    is not a dataset of this release; on any error nothing is left at out_dir or in temp.
    """
    if on_bad_clip not in ON_BAD_CLIP:
        raise ValueError(f"on_bad_clip must be one of {ON_BAD_CLIP}, got {on_bad_clip!r}")
    out, source = Path(out_dir), str(Path(release_dir).resolve())
    meta = read_meta(out)
    if meta is not None and not force:
        if meta.get("source") != source:
            raise DatasetExistsError(f"{out} was prepared from {meta.get('source')}, not "
                                     f"{source}; use --force to replace it")
        return {**meta, "already_prepared": True}
    if meta is None and out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise DatasetExistsError(f"{out} exists and is not a prepared dataset; use --force "
                                 "to replace it")
    release = Release.discover(release_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        meta = _Converter(release, tmp, on_bad_clip, bucket_bytes, num_ids, progress).run()
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename tmp to out; an old out is moved aside first and removed only afterwards."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()


class _Converter:
    """One run of the two passes into `tmp`; `run()` returns the meta."""

    def __init__(self, release: Release, tmp: Path, on_bad_clip: str, bucket_bytes: int,
                 num_ids: int, progress: Progress | None):
        self.release, self.tmp, self.on_bad_clip = release, tmp, on_bad_clip
        self.num_ids, self.progress = num_ids, progress or (lambda event: None)
        self.spill = tmp / "_spill"
        self.n_buckets = {s: bucketing.choose_n_buckets(release.split_bytes(s), bucket_bytes)
                          for s in release.splits}
        self.dims: dict[str, int | None] = {"face": FACE_DIM, "head": None, "body": None,
                                            "audio": None}
        self.present = {s: set() for s in LABELLED_SPLITS}  # clip names seen in any pickle
        self.skipped: dict[str, set[str]] = {s: set() for s in release.splits}
        self.skip_log: list[dict] = []
        self.items: dict[str, int] = {}

    def run(self) -> dict:
        t0 = time.perf_counter()
        labels = {s: self.release.labels(s, self.num_ids) for s in self.release.splits}
        for split in self.release.splits:
            for modality in MODALITIES:
                self._spill_file(split, modality)
        for split in LABELLED_SPLITS:
            self._check_gt_coverage(split, labels[split])
        ranks = strat_ranks({s: (self.present[s] - self.skipped[s], labels[s])
                             for s in LABELLED_SPLITS})
        splits = {s: self._write_split(s, labels[s], ranks) for s in self.release.splits}
        shutil.rmtree(self.spill)
        return self._meta(splits, labels, time.perf_counter() - t0)

    def _skip(self, split: str, e: BadClipError) -> None:
        if self.on_bad_clip == "fail":
            raise e
        if e.clip not in self.skipped[split]:
            self.skipped[split].add(e.clip)
            self.skip_log.append({"split": split, "clip": e.clip, "file": e.file,
                                  "field": e.field, "reason": e.reason})
            if len(self.skip_log) <= MAX_REPORTED_SKIPS:
                log.warning("skipping bad clip: %s", e)

    def _spill_file(self, split: str, modality: str) -> None:
        path = self.release.pickles[split][modality]
        folder = self.spill / split
        t0 = last = time.perf_counter()
        n = 0
        present = self.present.get(split)
        with bucketing.SpillWriter(folder, modality, self.n_buckets[split]) as writer:
            for key, value in iter_dict_items(path):
                n += 1
                try:
                    clip = clip_name(key, path)
                    if modality == "audio":
                        arrays = parse_audio(value, file=path, clip=clip,
                                             feat_dim=self.dims["audio"])
                        dim = arrays.shape[0]
                    else:
                        arrays = parse_detections(value, modality, file=path, clip=clip,
                                                  feat_dim=self.dims[modality])
                        dim = arrays["feat"].shape[1] if len(arrays["feat"]) else None
                except BadClipError as e:
                    self._skip(split, e)
                    continue
                if self.dims[modality] is None and dim:
                    self.dims[modality] = dim
                writer.add(clip, arrays)
                if present is not None:
                    present.add(clip)
                if n % 1000 == 0 and time.perf_counter() - last > PROGRESS_SECONDS:
                    last = time.perf_counter()
                    self._file_event(split, modality, path, n, last - t0, done=False)
        self.items[path.name] = n
        self._file_event(split, modality, path, n, time.perf_counter() - t0, done=True)

    def _file_event(self, split, modality, path, items, seconds, done) -> None:
        self.progress({"event": "file", "split": split, "modality": modality, "file": str(path),
                       "items": items, "seconds": seconds, "done": done,
                       "peak_rss_bytes": peak_rss_bytes()})

    def _check_gt_coverage(self, split: str, labels: dict[str, int]) -> None:
        """A gt clip that no pickle of its split has is a bad clip (or skipped)."""
        missing = sorted(c for c in labels if c not in self.present[split]
                         and c not in self.skipped[split])
        gt = self.release.gt[split]
        for clip in missing:
            more = f" ({len(missing)} such clips)" if len(missing) > 1 else ""
            self._skip(split, BadClipError(gt, clip, "gt",
                                           f"listed in the gt file but in no {split} pickle{more}"))
            del labels[clip]
        for clip in self.skipped[split]:
            labels.pop(clip, None)

    def _write_split(self, split: str, labels: dict[str, int], ranks: dict[str, int]) -> dict:
        t0 = time.perf_counter()
        folder = self.tmp / split
        folder.mkdir()
        files = self.release.pickles[split]
        stats = {"clips": 0, "faces": 0, "heads": 0, "bodies": 0, "audio": 0, "labelled": 0,
                 "noise": 0, "no_faces": 0, "files": 0, "skipped": len(self.skipped[split])}
        spill = self.spill / split
        for b in range(self.n_buckets[split]):
            parts = {m: bucketing.read_bucket(spill, m, b) for m in MODALITIES}
            joined = bucketing.JoinedBucket(split, parts, files, labels, ranks, self.skipped[split])
            del parts
            pa.default_memory_pool().release_unused()
            if joined.num_rows:
                _write_part(joined, folder / f"part-{stats['files']:05d}.parquet", stats)
                stats["files"] += 1
            del joined
            for m in MODALITIES:
                bucketing.spill_path(spill, m, b).unlink(missing_ok=True)
        self.progress({"event": "split", "split": split, "clips": stats["clips"],
                       "faces": stats["faces"], "buckets": self.n_buckets[split],
                       "seconds": time.perf_counter() - t0, "peak_rss_bytes": peak_rss_bytes()})
        return stats

    def _meta(self, splits: dict[str, dict], labels: dict[str, dict], seconds: float) -> dict:
        max_id = max((max(lab.values(), default=0) for lab in labels.values()), default=0)
        return {
            "format": FORMAT_NAME, "version": FORMAT_VERSION,
            "source": str(self.release.root.resolve()),
            "files": {s: {m: p.name for m, p in ms.items()}
                      for s, ms in self.release.pickles.items()},
            "items": self.items,
            "splits": splits,
            "dims": self.dims,
            "num_classes": max_id + 1,
            "on_bad_clip": self.on_bad_clip,
            "skipped": {"count": len(self.skip_log), "first": self.skip_log[:MAX_REPORTED_SKIPS]},
            "buckets": self.n_buckets,
            "peak_rss_bytes": peak_rss_bytes(),
            "seconds": round(seconds, 3),
        }


# Features are float16 noise to a compressor: store them plain (compressing and dictionary
# encoding them made writing ~5x slower for <1% of size); snappy for the small columns.
_COMPRESSION = {f.name: "none" if f.name.endswith("_feat") else "snappy" for f in DATASET_SCHEMA}
_STATISTICS = ["clip", "split", "label", "strat_rank", *COUNT_COLUMN.values()]


def _write_part(joined: bucketing.JoinedBucket, path: Path, stats: dict) -> None:
    """Write one bucket as a Parquet file, a row group at a time."""
    with pq.ParquetWriter(path, DATASET_SCHEMA, compression=_COMPRESSION, use_dictionary=["split"],
                          write_statistics=_STATISTICS) as writer:
        for start, stop in joined.row_groups(ROW_GROUP_CLIPS, ROW_GROUP_BYTES):
            table = joined.rows(start, stop)
            writer.write_table(table, row_group_size=stop - start)
            _add_stats(stats, table)
            del table
            # mimalloc (pyarrow's default pool) otherwise keeps the encoder's peak resident.
            pa.default_memory_pool().release_unused()


def _add_stats(stats: dict, table: pa.Table) -> None:
    stats["clips"] += table.num_rows
    stats["faces"] += pc.sum(table["n_faces"]).as_py() or 0
    stats["heads"] += pc.sum(table["n_heads"]).as_py() or 0
    stats["bodies"] += pc.sum(table["n_bodies"]).as_py() or 0
    stats["audio"] += pc.sum(pc.greater(pc.list_value_length(table["audio_feat"]), 0)).as_py() or 0
    stats["labelled"] += pc.sum(pc.greater(table["label"], 0)).as_py() or 0
    stats["noise"] += pc.sum(pc.equal(table["label"], 0)).as_py() or 0
    stats["no_faces"] += pc.sum(pc.equal(table["n_faces"], 0)).as_py() or 0
