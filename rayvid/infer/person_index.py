"""Person-search index: every identity's top clips in a clip library, as Parquet, and the
calibrated "other/unknown" threshold that `/identify` uses.

    build_index("runs/exp1", "data/ds", "test", "index/")        # Ray Data batch inference
    update_index("index/", "data/new-clips", "test")              # scores only the new clips
    idx = load_index("index/"); idx.top(identity=12, k=100)       # what GET /search reads
    calibrate("runs/exp1")                                        # -> runs/exp1/serving.json

Scoring reuses `rayvid.infer.predict` (qFF by `ClipTransform`, `EnsembleScorer` actors, the
per-batch candidates folded into a running `TopKPerIdentity`), so no (clips x classes)
matrix is ever held. Scores are the ensemble's weighted mean of sigmoids in [0, 1]
(`rayvid.model.run_folder.weighted_mean` of the `Ensemble.scores` sum), the units of
`/identify`. The run's `ensemble.json` and `serving.json` are read and written by
`rayvid.model.run_folder`.

    INDEX/
      part-00000.parquet   # identity int32, clip string, score float32, frame_min, frame_max
      _manifest.json       # written last: version, run, k, num_classes, sources, rows

Rows are sorted by identity, then score descending, ties in the order clips were indexed
(earlier sources first, then stream order). An update merges the stored top-k with the
new clips' own top-k per identity (a clip in the union's top-k is in its part's top-k),
writes the new version beside the old and swaps the folders, so a reader sees either.
A clip indexed again (same name) replaces its old rows.

Job: `python jobs/index.py --run RUN --dataset DS --split test --out INDEX [--update]`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rayvid.data import pipeline as data
from rayvid.infer import predict
from rayvid.release import schema
from rayvid.model import run_folder
from rayvid.model.run_folder import read_serving  # noqa: F401  (jobs call index.read_serving)
from rayvid.core.atomic import atomic_path, write_json
from rayvid.core.fusion import offsets_from_counts
from rayvid.core.metrics import top_keys, unpack_rank_keys
from rayvid.core.submission import TopKPerIdentity

log = logging.getLogger(__name__)

INDEX_SCHEMA = pa.schema([("identity", pa.int32()), ("clip", pa.string()),
                          ("score", pa.float32()), ("frame_min", pa.int32()),
                          ("frame_max", pa.int32())])
MANIFEST_FILE = "_manifest.json"
DEFAULT_K = 100
FORMAT_NAME = "rayvid-index"


class SearchIndexError(ValueError):
    """A missing, malformed or mismatched index, run or dataset."""


# ------------------------------------------------------------------ numpy core


def merge_top_k(old: pa.Table, new: pa.Table, k: int) -> pa.Table:
    """The top-k rows per identity of `old` + `new` (`INDEX_SCHEMA` tables), sorted by
    identity, score descending; ties keep old before new. Rows of `old` whose clip is in
    `new` are dropped first (the clip was re-indexed)."""
    if old.num_rows and new.num_rows:
        old = old.filter(pc.invert(pc.is_in(old["clip"], value_set=pc.unique(new["clip"]))))
    both = pa.concat_tables([old.cast(INDEX_SCHEMA), new.cast(INDEX_SCHEMA)])
    ident = both["identity"].to_numpy()
    score = both["score"].to_numpy()
    order = np.lexsort((-score.astype(np.float64), ident))  # stable: ties keep row order
    ident = ident[order]
    start = np.searchsorted(ident, ident, side="left")  # first row of each row's identity
    keep = order[np.arange(len(order)) - start < k]
    return both.take(pa.array(keep))


def threshold_for(best: np.ndarray, known: np.ndarray,
                  target_far: float | None = None) -> dict[str, Any] | None:
    """The score threshold that best separates known clips from noise (label 0).

    best: (n,) best identity score per clip in [0, 1] (-inf: no usable face, never
    accepted); known: (n,) bool. A clip is accepted when best >= threshold. target_far
    None: the threshold of max F1 of "known" among accepted clips; else the lowest whose
    false-accept rate (noise accepted / noise) is <= target_far. It lies midway between the
    last accepted and the first rejected score. None when either class is empty.
    """
    best, known = np.asarray(best, np.float64), np.asarray(known, bool)
    n_known, n_noise = int(known.sum()), int((~known).sum())
    if n_known == 0 or n_noise == 0:
        return None
    order = np.argsort(-best, kind="stable")
    s, k = best[order], known[order]
    nf = int(np.isfinite(s).sum())
    accept = np.unique(np.concatenate([[0], np.flatnonzero(s[:nf - 1] > s[1:nf]) + 1, [nf]]))
    tp = np.concatenate([[0], np.cumsum(k)])[accept]
    fp = accept - tp
    f1 = 2 * tp / (n_known + tp + fp)
    i = int(np.argmax(f1)) if target_far is None else int(np.flatnonzero(fp <= target_far * n_noise)[-1])
    m = int(accept[i])
    if m == 0:  # accept nothing: just above the best score
        t = float(np.nextafter(np.float32(s[0] if nf else 1.0), np.float32(np.inf)))
    else:
        t = float((s[m - 1] + (s[m] if m < nf else 0.0)) / 2)
    return {"threshold": t, "f1": float(f1[i]), "tpr": float(tp[i] / n_known),
            "far": float(fp[i] / n_noise), "known": n_known, "noise": n_noise,
            "method": "max_f1" if target_far is None else f"far<={target_far}"}


# ------------------------------------------------------------------ Ray adapter


def _scored(spec: predict.RunSpec, dataset: str | os.PathLike, split: str, *, top_k_clip: int,
            k: int, batch_size: int, num_actors: int | None):
    """The split's scored clips (`predict.SCORED_SCHEMA` pyarrow batches, dataset order)."""
    use_gpu, actors = predict.resources(None, num_actors)
    ds = predict.scored_dataset(spec, dataset, split, top_k_clip=top_k_clip, top_k_identity=k,
                                batch_size=batch_size, num_actors=actors, use_gpu=use_gpu)
    return ds.iter_batches(batch_size=None, batch_format="pyarrow")


def _frame_ranges(batch: pa.RecordBatch, wanted: pa.Array) -> pa.Table:
    """(clip, frame_min, frame_max) of the clips of `batch` in `wanted`; -1: no face."""
    batch = batch.filter(pc.is_in(batch["clip"], value_set=wanted))
    offsets = offsets_from_counts(schema.counts(batch, "n_faces"))
    frames = schema.list_values(batch, "face_frame").astype(np.int32)
    lo, hi = np.full(batch.num_rows, -1, np.int32), np.full(batch.num_rows, -1, np.int32)
    has = np.diff(offsets) > 0
    if has.any():
        lo[has] = np.minimum.reduceat(frames, offsets[:-1][has])
        hi[has] = np.maximum.reduceat(frames, offsets[:-1][has])
    return pa.table({"clip": batch["clip"], "frame_min": lo, "frame_max": hi})


def _frame_columns(dataset: str | os.PathLike, split: str,
                   clips: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(frame_min, frame_max) (n,) int32 of the named clips. Streams only the clip names
    and face frames of the split's files (a few bytes per face; no features)."""
    wanted = pa.array(np.unique(clips).tolist(), pa.string())
    found = [_frame_ranges(b, wanted) for path in data.split_paths(dataset, [split])
             for b in pq.ParquetFile(path).iter_batches(columns=["clip", "n_faces", "face_frame"])]
    found = pa.concat_tables([INDEX_SCHEMA.empty_table().select(["clip", "frame_min", "frame_max"]),
                              *found])
    at = pc.index_in(pa.array(clips, pa.string()), value_set=found["clip"])
    at = at.to_numpy(zero_copy_only=False).astype(np.int64)
    return found["frame_min"].to_numpy()[at], found["frame_max"].to_numpy()[at]


def score_library(run_dir: str | os.PathLike, dataset: str | os.PathLike, split: str, *,
                  k: int = DEFAULT_K, batch_size: int = 4096,
                  num_actors: int | None = None) -> tuple[pa.Table, int]:
    """Every identity's top-k clips of one split -> (`INDEX_SCHEMA` table, clips scored).

    Ray Data batch inference as `rayvid.infer.predict`: each batch yields only the (clip,
    identity, score) triples that can enter a top-k; the driver keeps a running top-k.
    """
    spec = predict.read_run(run_dir)
    predict.check_split(dataset, split)
    acc = TopKPerIdentity(spec.num_classes, k)
    names, _ = predict.fold_stream(_scored(spec, dataset, split, top_k_clip=1, k=k,
                                           batch_size=batch_size, num_actors=num_actors), acc, None)
    keys = top_keys(acc.keys[1:], k)  # (C-1, k) best first; 0 = empty slot, sorted last
    filled = keys != 0
    index, score = unpack_rank_keys(keys)
    identity = np.broadcast_to(np.arange(1, spec.num_classes, dtype=np.int32)[:, None], keys.shape)
    clips = np.asarray(names, dtype=object)[index[filled]]
    frame_min, frame_max = _frame_columns(dataset, split, clips)
    table = pa.table({
        "identity": identity[filled], "clip": pa.array(clips, pa.string()),
        "score": run_folder.weighted_mean(score[filled], spec.ensemble.weights),
        "frame_min": frame_min, "frame_max": frame_max}, schema=INDEX_SCHEMA)
    return table, len(names)


# ------------------------------------------------------------------ the index on disk


def read_manifest(index_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(index_dir) / MANIFEST_FILE
    if not path.is_file():
        raise SearchIndexError(f"{index_dir} is not a complete rayvid index (no {MANIFEST_FILE})")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT_NAME:
        raise SearchIndexError(f"{path}: not a {FORMAT_NAME} manifest")
    return manifest


def read_index_table(index_dir: str | os.PathLike) -> pa.Table:
    """The stored rows, sorted by identity then score descending."""
    parts = sorted(Path(index_dir).glob("part-*.parquet"))
    if not parts:
        return INDEX_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(p, schema=INDEX_SCHEMA) for p in parts])


def _write_index(index_dir: Path, table: pa.Table, manifest: dict[str, Any],
                 rows_per_part: int = 1 << 20) -> None:
    """Write a full version into a temp folder beside `index_dir`, then swap folders."""
    index_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(index_dir) as tmp:
        tmp.mkdir()
        for i, lo in enumerate(range(0, max(table.num_rows, 1), rows_per_part)):
            pq.write_table(table.slice(lo, rows_per_part), tmp / f"part-{i:05d}.parquet")
        write_json(tmp / MANIFEST_FILE, {**manifest, "rows": table.num_rows})


def _source(dataset: str | os.PathLike, split: str, clips: int, version: int) -> dict[str, Any]:
    return {"dataset": str(Path(dataset).resolve()), "split": split, "clips": clips,
            "version": version, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def build_index(run_dir: str | os.PathLike, dataset: str | os.PathLike, split: str,
                index_dir: str | os.PathLike, *, k: int = DEFAULT_K, batch_size: int = 4096,
                num_actors: int | None = None) -> dict[str, Any]:
    """Index one split from scratch (replacing `index_dir`); returns the manifest."""
    run_dir = Path(run_dir).resolve()
    table, n = score_library(run_dir, dataset, split, k=k, batch_size=batch_size,
                             num_actors=num_actors)
    spec = predict.read_run(run_dir)
    manifest = {"format": FORMAT_NAME, "version": 1, "run": str(run_dir), "k": k,
                "num_classes": spec.num_classes, "weights": spec.ensemble.weights,
                "sources": [_source(dataset, split, n, 1)]}
    _write_index(Path(index_dir), table, manifest)
    return {**manifest, "rows": table.num_rows}


def update_index(index_dir: str | os.PathLike, dataset: str | os.PathLike, split: str, *,
                 batch_size: int = 4096, num_actors: int | None = None) -> dict[str, Any]:
    """Add a split's clips to an index: score only them and merge with the stored top-k.

    Raises SearchIndexError when the source is already indexed or the run's ensemble
    changed since the index was built (its scores would not be comparable).
    """
    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir)
    run_dir = Path(manifest["run"])
    source = _source(dataset, split, 0, manifest["version"] + 1)
    if any((s["dataset"], s["split"]) == (source["dataset"], split) for s in manifest["sources"]):
        raise SearchIndexError(f"{source['dataset']} split {split!r} is already in {index_dir}; "
                               "build a new index to re-score it")
    if predict.read_run(run_dir).ensemble.weights != manifest["weights"]:
        raise SearchIndexError(f"run {run_dir}: ensemble weights changed since the index was built")
    new, n = score_library(run_dir, dataset, split, k=manifest["k"], batch_size=batch_size,
                           num_actors=num_actors)
    merged = merge_top_k(read_index_table(index_dir), new, manifest["k"])
    manifest = {**manifest, "version": source["version"],
                "sources": manifest["sources"] + [{**source, "clips": n}]}
    _write_index(index_dir, merged, manifest)
    return {**manifest, "rows": merged.num_rows}


@dataclass(frozen=True)
class SearchIndex:
    """An index loaded for `/search`: rows sorted by identity with per-identity offsets."""

    manifest: dict[str, Any]
    offsets: np.ndarray  # (num_classes + 1,) int64: rows of identity i are offsets[i]:offsets[i+1]
    clip: np.ndarray     # (rows,) object
    score: np.ndarray    # (rows,) float32
    frame_min: np.ndarray
    frame_max: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.offsets) - 1

    def top(self, identity: int, k: int) -> list[dict[str, Any]]:
        """The best min(k, stored) clips of `identity` (1..num_classes-1), best first."""
        lo = int(self.offsets[identity])
        hi = min(int(self.offsets[identity + 1]), lo + k)
        return [{"clip": c, "score": float(s), "frame_min": int(a), "frame_max": int(b)}
                for c, s, a, b in zip(self.clip[lo:hi], self.score[lo:hi],
                                      self.frame_min[lo:hi], self.frame_max[lo:hi])]


def load_index(index_dir: str | os.PathLike) -> SearchIndex:
    """Read an index (manifest first: a folder without one is incomplete)."""
    manifest = read_manifest(index_dir)
    table = read_index_table(index_dir)
    ident = table["identity"].to_numpy()
    if len(ident) and (np.diff(ident) < 0).any():
        raise SearchIndexError(f"{index_dir}: rows are not sorted by identity")
    counts = np.bincount(ident, minlength=manifest["num_classes"])[:manifest["num_classes"]]
    return SearchIndex(manifest, offsets_from_counts(counts),
                       table["clip"].to_numpy(zero_copy_only=False), table["score"].to_numpy(),
                       table["frame_min"].to_numpy(), table["frame_max"].to_numpy())


# ------------------------------------------------------------------ calibration


def _per_clip(run_dir: Path, dataset: str | os.PathLike, split: str, batch_size: int,
              num_actors: int | None) -> pa.Table:
    """(clip, ok, top_ids, top_scores) of a split: the run's `per_clip_<split>.parquet`
    written by `jobs/train.py` when there is one, else scored with Ray Data."""
    path = run_dir / f"per_clip_{split}.parquet"
    if path.is_file():
        return pq.read_table(path, columns=predict.PER_CLIP_SCHEMA.names)
    batches = _scored(predict.read_run(run_dir), dataset, split, top_k_clip=2, k=1,
                      batch_size=batch_size, num_actors=num_actors)
    return pa.concat_tables([t.select(predict.PER_CLIP_SCHEMA.names) for t in batches])


def calibrate(run_dir: str | os.PathLike, dataset: str | os.PathLike | None = None,
              split: str = "val", *, target_far: float | None = None, batch_size: int = 4096,
              num_actors: int | None = None) -> dict[str, Any] | None:
    """Calibrate the unknown threshold on a labelled split with noise clips (label 0) and
    write `RUN/serving.json`. dataset: default `RUN/dataset` (the training job's). Returns
    what was written, or None (nothing written) when the split lacks known or noise clips.
    """
    run_dir = Path(run_dir).resolve()
    dataset = Path(dataset).resolve() if dataset else run_dir / "dataset"
    weights = predict.read_run(run_dir).ensemble.weights
    predict.check_split(dataset, split)
    scored = _per_clip(run_dir, dataset, split, batch_size, num_actors)
    labels = pq.read_table(data.split_paths(dataset, [split]), columns=["clip", "label"])
    at = pc.index_in(scored["clip"], value_set=labels["clip"]).to_numpy(zero_copy_only=False)
    label = pc.fill_null(labels["label"], -1).to_numpy()[at.astype(np.int64)]
    ids = np.array(scored["top_ids"].to_pylist(), dtype=np.int64)
    vals = np.array(scored["top_scores"].to_pylist(), dtype=np.float64)
    best = run_folder.weighted_mean(np.where(ids != 0, vals, -np.inf).max(axis=1), weights)
    best[~scored["ok"].to_numpy(zero_copy_only=False)] = -np.inf
    labelled = label >= 0
    result = threshold_for(best[labelled], label[labelled] > 0, target_far)
    if result is None:
        log.warning("calibrate: %s/%s has no known or no noise clips; %s not written",
                    dataset, split, run_folder.SERVING_FILE)
        return None
    serving = run_folder.ServingSpec(result.pop("threshold"), {
        **result, "dataset": str(dataset), "split": split, "clips": int(labelled.sum())})
    run_folder.write_serving(run_dir, serving)
    return serving.to_json()
