"""Convert an official release into the Parquet dataset of design.md section 2, in bounded memory.

    summary = prepare_release("/data/iqiyi", "/data/iqiyi-ds", on_bad_clip="fail", workers=4)

An external hash join, because each of the four modality pickles of a split may be larger
than memory and they list clips in different orders:

1. stream each pickle, validate each clip and append it to spill bucket
   `crc32(clip) % P` (`rayvid.release.bucketing`), P chosen so that a bucket is ~`bucket_bytes`;
   one task per pickle (`prepare_tasks.spill_file`), the largest first;
2. per bucket, join the face/head/body/audio rows on clip, attach label and `strat_rank`
   and write one `SPLIT/part-XXXXX.parquet` (`prepare_tasks.write_bucket`), one task per
   bucket, the largest first.

Tasks are independent: `workers=1` runs them in this process, `workers=N` in N spawned
processes (`rayvid.release.task_pool`); this process gathers what they found (clip names per split,
feature dims, bad clips, items per file) between the passes, and the dataset is the same
whatever N. Memory is O(bucket + batch of clips) per worker plus the clip names of
train/val in this process (for noise labels and `strat_rank`), independent of the release
size. Everything is written to a temporary folder next to OUT (`rayvid.core.atomic`);
`_rayvid_dataset.json` is written last and the folder renamed to OUT.
Jobs: `jobs/prepare.py --release DIR --out DATASET`.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from rayvid.core.atomic import atomic_path, write_json
from rayvid.core.formats import NUM_IDENTITIES
from rayvid.release import bucketing
from rayvid.release.pickle_reader import ReleaseFormatError
from rayvid.release.prepare_tasks import (STAT_KEYS, SpillResult, SpillTask, WriteResult, WriteTask,
                                  peak_rss_bytes, spill_file, write_bucket)
from rayvid.release.layout import BadClipError, Release
from rayvid.release.schema import (FACE_DIM, FORMAT_NAME, FORMAT_VERSION, LABELLED_SPLITS, META_FILE,
                           MODALITIES, find_meta)
from rayvid.release.strat import strat_ranks
from rayvid.release.task_pool import TaskPool

log = logging.getLogger(__name__)

ON_BAD_CLIP = ("fail", "skip")
MAX_REPORTED_SKIPS = 20
Progress = Callable[[dict], None]
__all__ = ["DatasetExistsError", "FeatureDimError", "default_workers", "peak_rss_bytes",
           "children_peak_rss_bytes", "prepare_release"]


class DatasetExistsError(FileExistsError):
    """OUT exists and is not a dataset of this release that a re-run may leave alone."""


class FeatureDimError(ReleaseFormatError):
    """Two pickles of one modality hold features of different lengths; names both files."""


def default_workers() -> int:
    """The job's default: one worker per CPU, at most 4."""
    return max(1, min(os.cpu_count() or 1, 4))


def children_peak_rss_bytes() -> int:
    """Largest peak RSS of any child process of this one that has exited and been waited
    for (RUSAGE_CHILDREN; prepare's workers once the pool has closed)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def prepare_release(release_dir: str | Path, out_dir: str | Path, *, on_bad_clip: str = "fail",
                    force: bool = False, bucket_bytes: int = bucketing.DEFAULT_BUCKET_BYTES,
                    num_ids: int = NUM_IDENTITIES, progress: Progress | None = None,
                    workers: int = 1) -> dict:
    """Write the dataset of `release_dir` to `out_dir`; returns the meta (a summary).

    A complete dataset already at out_dir, prepared from the same release in this format
    version, is left alone (the summary has `"already_prepared": True`) unless `force`.
    on_bad_clip: "fail" raises the first `BadClipError`; "skip" leaves bad clips out and
    lists them in the meta. workers: processes that read pickles and write buckets side by
    side (1: all in this process). Raises ReleaseFormatError subclasses for bad input (the
    same type when raised in a worker), DatasetExistsError for an OUT that is not a dataset
    of this release or is of an older format; on any error nothing is left at out_dir or in
    temp.
    """
    if on_bad_clip not in ON_BAD_CLIP:
        raise ValueError(f"on_bad_clip must be one of {ON_BAD_CLIP}, got {on_bad_clip!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out, source = Path(out_dir), str(Path(release_dir).resolve())
    meta = find_meta(out)
    if meta is not None and not force:
        if meta.get("source") != source:
            raise DatasetExistsError(f"{out} was prepared from {meta.get('source')}, not "
                                     f"{source}; use --force to replace it")
        if meta.get("version") != FORMAT_VERSION:
            raise DatasetExistsError(
                f"{out} is a rayvid dataset of format version {meta.get('version')}; this "
                f"rayvid writes version {FORMAT_VERSION}: re-run jobs/prepare.py --force to "
                "rebuild it")
        return {**meta, "already_prepared": True}
    if meta is None and out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise DatasetExistsError(f"{out} exists and is not a prepared dataset; use --force "
                                 "to replace it")
    release = Release.discover(release_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:  # an old OUT (--force) is replaced only when tmp is complete
        tmp.mkdir()
        meta = _Converter(release, tmp, on_bad_clip, bucket_bytes, num_ids, progress,
                          workers).run()
        write_json(tmp / META_FILE, meta, indent=1)  # last: it marks the dataset complete
    return meta


class _Converter:
    """One run of the two passes into `tmp`; `run()` returns the meta."""

    def __init__(self, release: Release, tmp: Path, on_bad_clip: str, bucket_bytes: int,
                 num_ids: int, progress: Progress | None, workers: int):
        self.release, self.tmp, self.on_bad_clip = release, tmp, on_bad_clip
        self.num_ids, self.progress = num_ids, progress or (lambda event: None)
        self.workers = workers
        self.spill = tmp / "_spill"
        self.n_buckets = {s: bucketing.choose_n_buckets(release.split_bytes(s), bucket_bytes)
                          for s in release.splits}
        self.dims: dict[str, int | None] = {"face": FACE_DIM, "head": None, "body": None,
                                            "audio": None}
        self.present = {s: set() for s in LABELLED_SPLITS}  # clip names seen in any pickle
        self.skipped: dict[str, set[str]] = {s: set() for s in release.splits}
        self.skip_log: list[dict] = []
        self.items: dict[str, int] = {}
        self.worker_rss = 0  # largest peak RSS a task reported from a worker

    def run(self) -> dict:
        t0 = time.perf_counter()
        labels = {s: self.release.labels(s, self.num_ids) for s in self.release.splits}
        with TaskPool(self.workers, self.progress) as pool:
            self._spill_all(pool)
            for split in LABELLED_SPLITS:
                self._check_gt_coverage(split, labels[split])
            ranks = strat_ranks({s: (self.present[s] - self.skipped[s], labels[s])
                                 for s in LABELLED_SPLITS})
            splits = self._write_all(pool, labels, ranks)
        shutil.rmtree(self.spill)
        return self._meta(splits, labels, time.perf_counter() - t0)

    def _peak_rss(self) -> int:
        return max(peak_rss_bytes(), self.worker_rss)

    def _skip(self, split: str, e: BadClipError) -> None:
        if self.on_bad_clip == "fail":
            raise e
        self._record_skip({"split": split, "clip": e.clip, "file": e.file, "field": e.field,
                           "reason": e.reason})

    def _record_skip(self, entry: dict) -> None:
        split, clip = entry["split"], entry["clip"]
        if clip not in self.skipped[split]:
            self.skipped[split].add(clip)
            self.skip_log.append(entry)
            if len(self.skip_log) <= MAX_REPORTED_SKIPS:
                log.warning("skipping bad clip: %s: clip %s: %s: %s", entry["file"], clip,
                            entry["field"], entry["reason"])

    # --- pass 1: spill every pickle -----------------------------------------------------

    def _spill_all(self, pool: TaskPool) -> None:
        tasks = [SpillTask(split, m, self.release.pickles[split][m], self.spill / split,
                           self.n_buckets[split], self.on_bad_clip,
                           FACE_DIM if m == "face" else None, split in LABELLED_SPLITS)
                 for split in self.release.splits for m in MODALITIES]
        largest_first = sorted(tasks, key=lambda t: -t.path.stat().st_size)
        results: dict[tuple[str, str], SpillResult] = {}
        for task, result in pool.run(spill_file, largest_first):
            results[task.split, task.modality] = result
            self.worker_rss = max(self.worker_rss, result.peak_rss_bytes)
            self.progress({"event": "file", "split": task.split, "modality": task.modality,
                           "file": str(task.path), "items": result.items,
                           "seconds": result.seconds, "done": True,
                           "peak_rss_bytes": result.peak_rss_bytes})
        for task in tasks:  # release order, whatever order the tasks finished in
            result = results[task.split, task.modality]
            self.items[task.path.name] = result.items
            if task.present:
                self.present[task.split].update(result.present)
            for entry in result.skipped:
                self._record_skip(entry)
        self._reconcile_dims(tasks, results)

    def _reconcile_dims(self, tasks: list[SpillTask],
                        results: dict[tuple[str, str], SpillResult]) -> None:
        """Each pickle inferred its own feature length; a modality has one."""
        first: dict[str, SpillTask] = {}
        for task in tasks:
            dim = results[task.split, task.modality].dim
            if dim is None:
                continue
            m = task.modality
            if m in first and self.dims[m] != dim:
                raise FeatureDimError(
                    f"{m} features have {self.dims[m]} values in {first[m].path} but {dim} in "
                    f"{task.path}: one release has one {m} feature length")
            first.setdefault(m, task)
            self.dims[m] = dim

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

    # --- pass 2: join and write every bucket --------------------------------------------

    def _write_tasks(self, split: str, labels: dict[str, int],
                     ranks: dict[str, int]) -> list[WriteTask]:
        n = self.n_buckets[split]
        by_bucket = [({}, {}, set()) for _ in range(n)]
        for clip, label in labels.items():
            by_bucket[bucketing.bucket_of(clip, n)][0][clip] = label
        for clip in self.present.get(split, ()):
            if clip in ranks:
                by_bucket[bucketing.bucket_of(clip, n)][1][clip] = ranks[clip]
        for clip in self.skipped[split]:
            by_bucket[bucketing.bucket_of(clip, n)][2].add(clip)
        (self.tmp / split).mkdir()
        return [WriteTask(split, b, self.spill / split, self.tmp / split / f"_bucket-{b:05d}.parquet",
                          self.release.pickles[split], lab, rank, frozenset(skip))
                for b, (lab, rank, skip) in enumerate(by_bucket)]

    def _spilled_bytes(self, task: WriteTask) -> int:
        paths = (bucketing.spill_path(task.spill, m, task.bucket) for m in MODALITIES)
        return sum(p.stat().st_size for p in paths if p.exists())

    def _write_all(self, pool: TaskPool, labels: dict[str, dict],
                   ranks: dict[str, int]) -> dict[str, dict]:
        t0 = time.perf_counter()
        tasks = [t for s in self.release.splits for t in self._write_tasks(s, labels[s], ranks)]
        largest_first = sorted(tasks, key=lambda t: -self._spilled_bytes(t))
        left = {s: self.n_buckets[s] for s in self.release.splits}
        results: dict[str, dict[int, WriteResult]] = {s: {} for s in self.release.splits}
        splits = {}
        for task, result in pool.run(write_bucket, largest_first):
            self.worker_rss = max(self.worker_rss, result.peak_rss_bytes)
            results[task.split][task.bucket] = result
            left[task.split] -= 1
            if left[task.split] == 0:
                splits[task.split] = self._finish_split(task.split, results[task.split],
                                                        time.perf_counter() - t0)
        return {s: splits[s] for s in self.release.splits}

    def _finish_split(self, split: str, results: dict[int, WriteResult], seconds: float) -> dict:
        """Sum the buckets' counts, name the written files part-00000... in bucket order."""
        stats = dict.fromkeys(STAT_KEYS, 0)
        files = 0
        for b in sorted(results):
            r = results[b]
            for k in STAT_KEYS:
                stats[k] += r.stats[k]
            if r.path is not None:
                r.path.rename(r.path.with_name(f"part-{files:05d}.parquet"))
                files += 1
        stats.update(files=files, skipped=len(self.skipped[split]))
        self.progress({"event": "split", "split": split, "clips": stats["clips"],
                       "faces": stats["faces"], "buckets": self.n_buckets[split],
                       "seconds": seconds, "peak_rss_bytes": self._peak_rss()})
        return stats

    def _meta(self, splits: dict[str, dict], labels: dict[str, dict], seconds: float) -> dict:
        max_id = max((max(lab.values(), default=0) for lab in labels.values()), default=0)
        parent = peak_rss_bytes()
        children = max(children_peak_rss_bytes(), self.worker_rss) if self.workers > 1 else 0
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
            "workers": self.workers,
            "peak_rss_bytes": max(parent, children),
            "peak_rss_parent_bytes": parent,
            "peak_rss_children_bytes": children,
            "seconds": round(seconds, 3),
        }
