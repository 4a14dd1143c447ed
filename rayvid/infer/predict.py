"""Batch prediction: stream a split through qFF and the ensemble, write the submission.

    summary = predict_split("runs/exp1", "data/iqiyi-ds", "test", "out/submission.txt",
                            per_clip_path="out/test_top5.parquet")

Ray Data reads the split, `rayvid.data.pipeline.ClipTransform(mode="qff")` fuses every clip's faces
with the weighting recorded in the run's `ensemble.json` (`rayvid.model.run_folder`), and `EnsembleScorer` actors (one
GPU each when the cluster has GPUs) score the clips with `rayvid.model.ensemble.Ensemble`. Per
batch an actor returns, per clip, its top-k classes and its *candidates*: the (identity,
score) pairs for which the clip is in the batch's own top-100 of that identity. No other
clip of the batch can enter an identity's global top-100, so the driver only folds those
into a running `TopKPerIdentity` and never holds an (n_clips, C) score matrix. Ranking is
`rayvid.core.metrics.rank_keys` everywhere: float32 score descending, ties by the lower clip
index, where the index is the clip's row in the per-clip Parquet (stream order).

`fusion="vote"` (the baseline qFF replaced, `rayvid.infer.vote`): the clip-vector members
score every face and average per clip; the other kinds keep their inputs. `VoteScorer`
actors then read the raw Parquet batches (the same `ClipTransform` rows and inputs, plus
the flat faces) and return the same `SCORED_SCHEMA` tables; the rest is unchanged.

Job: `python jobs/predict.py --run RUN --dataset DATASET --split test --out SUBMISSION`
(`--fusion vote` for voting).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rayvid.data import pipeline as data
from rayvid.release import schema
from rayvid.release.memory import release_memory
from rayvid.model import run_folder
from rayvid.core.fusion import Weighting, offsets_from_counts
from rayvid.core.formats import MAX_RANK, GroundTruthError, read_gt
from rayvid.core.metrics import rank_keys, score_files, score_rows, top_keys, unpack_rank_keys
from rayvid.core.submission import TopKPerIdentity, write_submission

log = logging.getLogger(__name__)

_CHUNK_BYTES = 32 << 20  # working set of one chunk of uint64 rank keys in an actor
_LIST_I32, _LIST_F32 = pa.list_(pa.int32()), pa.list_(pa.float32())
PER_CLIP_SCHEMA = pa.schema([("clip", pa.string()), ("ok", pa.bool_()),
                             ("top_ids", _LIST_I32), ("top_scores", _LIST_F32)])
SCORED_SCHEMA = pa.schema(list(PER_CLIP_SCHEMA) + [("cand_ids", _LIST_I32),
                                                   ("cand_scores", _LIST_F32)])
# How a clip-vector member sees a clip: "qff" one fused feature (the 4th place's method),
# "vote" every face, scores averaged (the baseline they compared it with).
Fusion = Literal["qff", "vote"]
FUSIONS: tuple[str, ...] = get_args(Fusion)


class PredictError(ValueError):
    """A missing or malformed input (run folder, ensemble.json, dataset, split, gt)."""


# ------------------------------------------------------------------ numpy core


def top_classes(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each clip's k best classes: scores (n, C) float32 -> ids (n, min(k, C)) int32 and
    their scores (n, min(k, C)) float32, best first, ties by the lower class id."""
    n, c = scores.shape
    k = min(k, c)
    ids, vals = np.empty((n, k), np.int32), np.empty((n, k), np.float32)
    step = max(1, _CHUNK_BYTES // (24 * c))
    for lo in range(0, n, step):
        keys = top_keys(rank_keys(scores[lo:lo + step], np.arange(c)), k)
        index, value = unpack_rank_keys(keys)
        ids[lo:lo + step], vals[lo:lo + step] = index, value
    return ids, vals


def batch_candidates(scores: np.ndarray, k: int = MAX_RANK
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (row, identity, score) triples of a batch that can enter a global top-k.

    For every identity column c >= 1, the rows in the batch's own top-k of c (float32 score
    descending, ties by lower row, which is the global tie rule since rows keep their order
    in the stream): a row outside it has k better rows in this batch alone.
    scores: (n, C) float32. Returns rows (m,) int64 ascending, ids (m,) int32, scores
    (m,) float32, with m = (C - 1) * min(k, n).
    """
    n, c = scores.shape
    step = max(1, _CHUNK_BYTES // (24 * max(n, 1)))
    parts = []
    for lo in range(1, c, step):
        hi = min(lo + step, c)
        keys = top_keys(rank_keys(scores[:, lo:hi].T, np.arange(n)), k, sort=False)
        rows, vals = unpack_rank_keys(keys)  # (hi - lo, min(k, n)) each
        ids = np.broadcast_to(np.arange(lo, hi, dtype=np.int32)[:, None], rows.shape)
        parts.append((rows.ravel(), ids.ravel(), vals.ravel()))
    rows, ids, vals = (np.concatenate(p) for p in zip(*parts))
    order = np.argsort(rows, kind="stable")
    return rows[order], ids[order], vals[order]


def _list_column(values: np.ndarray, counts: np.ndarray, type_: pa.DataType) -> pa.ListArray:
    offsets = offsets_from_counts(counts).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.ravel()), type=type_)


def score_table(clips: np.ndarray, ok: np.ndarray, scores: np.ndarray, top_k_clip: int,
                top_k_identity: int) -> pa.Table:
    """One scored batch as a `SCORED_SCHEMA` table (one row per clip).

    clips: (n,) names; ok: (n,) bool; scores: (n, C) float32 ensemble scores.
    """
    n = len(clips)
    ids, vals = top_classes(scores, top_k_clip)
    rows, cand_ids, cand_scores = batch_candidates(scores, top_k_identity)
    return _scored(clips, ok, ids, vals, rows, cand_ids, cand_scores)


def score_table_chunked(clips: np.ndarray, ok: np.ndarray, score_fn, n: int, num_classes: int,
                        top_k_clip: int, top_k_identity: int, rows: int | None = None) -> pa.Table:
    """`score_table` of a batch whose (n, C) score matrix is never held whole: `score_fn(lo,
    hi)` scores rows lo:hi, `rows` at a time (default `score_rows(C)`, a 32 MiB block), and
    each identity's top-k rows of the batch are kept as a running (C, k) array of rank keys
    between the steps. The same table as `score_table(clips, ok, score_fn(0, n), ...)`."""
    from rayvid.core.submission import TopKPerIdentity

    step = rows or score_rows(num_classes)
    if n <= step or num_classes < 2:
        return score_table(clips, ok, score_fn(0, n), top_k_clip, top_k_identity)
    k_clip = min(top_k_clip, num_classes)
    ids, vals = np.empty((n, k_clip), np.int32), np.empty((n, k_clip), np.float32)
    best = TopKPerIdentity(num_classes, min(top_k_identity, n))
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        block = np.asarray(score_fn(lo, hi), np.float32)
        ids[lo:hi], vals[lo:hi] = top_classes(block, top_k_clip)
        best.update(np.arange(lo, hi, dtype=np.int64), block)
        del block
    keys = best.keys[1:]  # (C - 1, k): identity c's best rows; column 0 is never ranked
    row, score = unpack_rank_keys(keys)
    cand = np.broadcast_to(np.arange(1, num_classes, dtype=np.int32)[:, None], keys.shape)
    filled = keys != 0
    row, cand, score = row[filled], cand[filled], score[filled]
    order = np.lexsort((cand, row))  # by row, then identity: what batch_candidates gives
    return _scored(clips, ok, ids, vals, row[order], cand[order], score[order])


def _scored(clips, ok, ids, vals, rows, cand_ids, cand_scores) -> pa.Table:
    n = len(clips)
    per_clip = np.full(n, ids.shape[1], np.int64)
    cand_counts = np.bincount(rows, minlength=n)
    return pa.Table.from_arrays([
        pa.array(np.asarray(clips, dtype=object), pa.string()), pa.array(np.asarray(ok, bool)),
        _list_column(ids, per_clip, _LIST_I32), _list_column(vals, per_clip, _LIST_F32),
        _list_column(cand_ids, cand_counts, _LIST_I32),
        _list_column(cand_scores, cand_counts, _LIST_F32)], schema=SCORED_SCHEMA)


# ------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class RunSpec:
    """What prediction needs from a run folder: its `ensemble.json`, checked."""

    run_dir: Path
    num_classes: int
    members: int
    weighting: Weighting
    ensemble: run_folder.EnsembleSpec


def read_run(run_dir: str | os.PathLike) -> RunSpec:
    """Check `run_dir/ensemble.json` and its members' configs without loading weights."""
    from rayvid.model.architectures import input_kind_of  # torch: not at import (infer.api)
    from rayvid.model.checkpoints import read_model_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PredictError(f"run folder {run_dir} does not exist")
    try:
        ens = run_folder.read_ensemble(run_dir)
    except run_folder.RunFolderError as e:
        raise PredictError(str(e)) from None
    try:
        configs = [read_model_config(p) for p in ens.member_dirs(run_dir)]
        classes = {int(c["num_classes"]) for c in configs}
        kinds = {input_kind_of(c["arch"]) for c in configs}
    except FileNotFoundError as e:
        raise PredictError(f"run {run_dir}: {e}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise PredictError(f"run {run_dir}: a member's model config is malformed: "
                           f"{type(e).__name__}: {e}") from None
    if len(classes) != 1 or ens.num_classes not in (None, *classes):
        raise PredictError(f"run {run_dir}: {run_folder.ENSEMBLE_FILE} needs members that all "
                           f"have the same num_classes (members: {sorted(classes)}, "
                           f"file: {ens.num_classes})")
    missing = sorted(kinds - set(ens.input_spec().kinds))
    if missing:
        raise PredictError(f"run {run_dir}: members take {missing} inputs but "
                           f"{run_folder.ENSEMBLE_FILE} inputs.kinds lists "
                           f"{list(ens.input_spec().kinds)}")
    weighting = ens.weighting
    if weighting is None:
        log.warning("run %s: %s records no weighting; using the default", run_dir,
                    run_folder.ENSEMBLE_FILE)
        weighting = Weighting()
    return RunSpec(run_dir, classes.pop(), len(ens.members), weighting, ens)


def check_split(dataset_dir: str | os.PathLike, split: str) -> dict[str, Any]:
    """The dataset's meta, after checking that `split` exists and has Parquet files."""
    if not Path(dataset_dir).is_dir():
        raise PredictError(f"dataset {dataset_dir} does not exist")
    try:
        meta = schema.read_meta(dataset_dir)
        paths = data.split_paths(dataset_dir, [split])
    except (FileNotFoundError, ValueError) as e:
        raise PredictError(str(e)) from None
    if split not in meta.get("splits", {}) or not paths:
        raise PredictError(f"dataset {dataset_dir} has no split {split!r} "
                           f"(it has: {', '.join(meta.get('splits', {})) or 'none'})")
    return meta


def check_fusion(fusion: str) -> str:
    """`fusion`, checked: one of `FUSIONS`."""
    if fusion not in FUSIONS:
        raise PredictError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
    return fusion


def find_gt(meta: dict[str, Any], split: str, gt_path: str | os.PathLike | None) -> Path | None:
    """The gt file to score against, checked: `gt_path`, else for split val the release's
    `val_gt.txt` when it is still at the dataset meta's `source`."""
    if gt_path is None and split == "val" and meta.get("source"):
        from rayvid.release.layout import GT_FILES  # the official file names

        found = Path(meta["source"]) / GT_FILES["val"]
        gt_path = found if found.is_file() else None
    if gt_path is None:
        return None
    try:
        read_gt(gt_path)
    except GroundTruthError as e:  # its message starts with the file and line
        raise PredictError(f"gt file: {e}") from None
    except OSError as e:
        raise PredictError(f"gt file {gt_path}: {e}") from None
    return Path(gt_path)


# ------------------------------------------------------------------ Ray adapter


class EnsembleScorer:
    """Ray Data actor UDF: loads the run's ensemble once, then scores batches of clips.

    In: the inputs of every member's kind (`rayvid.core.inputs.build`: "x" (n, 512) qFF
    features, "faces"/"face_mask", "mm"/"mm_mask"), "ok" and "clip" (n,) str.
    Out: a `SCORED_SCHEMA` table (see `score_table`).
    """

    def __init__(self, run_dir: str, top_k_clip: int, top_k_identity: int, use_gpu: bool):
        import torch

        from rayvid.model.ensemble import Ensemble  # torch is imported in the actor only

        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        if use_gpu and device == "cpu":
            log.warning("EnsembleScorer got a GPU from Ray but torch sees no CUDA: using the CPU")
        self.ensemble = Ensemble.from_run(run_dir, device=device)
        self.top_k_clip, self.top_k_identity = top_k_clip, top_k_identity

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from rayvid.core.inputs import answerable

        # ok: some member answers for the clip (the endpoint's `usable`, same rule)
        ok = answerable(self.ensemble.input_kinds, batch)
        n = len(batch["clip"])
        # scored a block of rows at a time: with 10,035 identities a 4096-clip batch's whole
        # score matrix (and its rank keys) would be ~0.5 GB in every actor
        table = score_table_chunked(
            batch["clip"], ok, lambda lo, hi: self.ensemble.scores(
                {c: v[lo:hi] for c, v in batch.items()}),
            n, self.ensemble.num_classes, self.top_k_clip, self.top_k_identity)
        release_memory()  # the blocks' freed arrays back to the OS: flat over a whole split
        return table


class VoteScorer(EnsembleScorer):
    """Ray Data actor UDF for `fusion="vote"`: per-frame voting (`rayvid.infer.vote`).

    In: a raw pyarrow batch of the dataset (`transform.columns()`); `transform` (the
    `ClipTransform` of qFF mode) keeps its rows (`select_rows`) and builds the non-voting
    members' inputs and `ok` (`rayvid.core.inputs.build`, as its `__call__` does), and
    the voting members see the batch's faces. Out: a `SCORED_SCHEMA` table, as
    `EnsembleScorer`; `ok` is the same rule on the same inputs (`answerable`), so both
    modes report the same clips as unknown.
    """

    def __init__(self, run_dir: str, top_k_clip: int, top_k_identity: int, use_gpu: bool,
                 transform: data.ClipTransform):
        from rayvid.infer.vote import VotingEnsemble

        super().__init__(run_dir, top_k_clip, top_k_identity, use_gpu)
        self.transform, self.voting = transform, VotingEnsemble(self.ensemble)

    def __call__(self, batch: pa.Table) -> pa.Table:  # type: ignore[override]
        from rayvid.core.inputs import answerable, build

        batch = self.transform.select_rows(batch)
        if batch.num_rows == 0:
            return SCORED_SCHEMA.empty_table()
        parts = self.transform.parts(batch)
        built = build(parts, self.transform.spec)
        scores = self.voting.scores(built, parts.faces)
        release_memory()
        ok = answerable(self.ensemble.input_kinds, built)
        clips = batch.column("clip").to_numpy(zero_copy_only=False)
        return score_table(clips, ok, scores, self.top_k_clip, self.top_k_identity)


def _vote_dataset(spec: RunSpec, dataset_dir: str | os.PathLike, split: str,
                  transform: data.ClipTransform, *, top_k_clip: int, top_k_identity: int,
                  batch_size: int, num_actors: int, use_gpu: bool):
    """`scored_dataset` for fusion "vote": the actors read the Parquet columns themselves
    (the faces, which `transform` would fuse away)."""
    import ray.data

    ds = ray.data.read_parquet(data.split_paths(dataset_dir, [split])).select_columns(
        transform.columns())
    ds = ds.map_batches(
        VoteScorer, batch_format="pyarrow", batch_size=batch_size, zero_copy_batch=True,
        fn_constructor_args=(str(spec.run_dir), top_k_clip, top_k_identity, use_gpu, transform),
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_gpus=1 if use_gpu else 0, num_cpus=1)
    ds.context.execution_options.preserve_order = True  # deterministic clip index -> ties
    return ds


def scored_dataset(spec: RunSpec, dataset_dir: str | os.PathLike, split: str, *,
                   top_k_clip: int, top_k_identity: int, batch_size: int, num_actors: int,
                   use_gpu: bool, fusion: str = "qff", part: str | None = None,
                   unseen_fraction: float = 0.5):
    """The lazy Ray Dataset of scored clips, in dataset order (`SCORED_SCHEMA` blocks).
    fusion: "qff" (default) or "vote" (see the module docstring).
    part: "seen" / "unseen" keeps that part of val's clips (`ClipTransform.val_part`)."""
    import ray.data

    check_fusion(fusion)
    inputs = spec.ensemble.input_spec()
    transform = data.ClipTransform(mode="qff", weighting=spec.weighting, with_clip=True,
                                   kinds=inputs.kinds, face_set_size=inputs.face_set_size,
                                   modalities=inputs.modalities, dims=inputs.dims,
                                   val_part=part, unseen_fraction=unseen_fraction)
    if fusion == "vote":
        return _vote_dataset(spec, dataset_dir, split, transform, top_k_clip=top_k_clip,
                             top_k_identity=top_k_identity, batch_size=batch_size,
                             num_actors=num_actors, use_gpu=use_gpu)
    ds = data.clip_dataset(dataset_dir, [split], transform, batch_size=batch_size)
    ds = ds.map_batches(
        EnsembleScorer, batch_format="numpy", batch_size=batch_size,
        fn_constructor_args=(str(spec.run_dir), top_k_clip, top_k_identity, use_gpu),
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_gpus=1 if use_gpu else 0, num_cpus=1)
    ds.context.execution_options.preserve_order = True  # deterministic clip index -> ties
    return ds


@contextlib.contextmanager
def _atomic_parquet(path: str | os.PathLike | None, table_schema: pa.Schema
                    ) -> Iterator[pq.ParquetWriter | None]:
    """A ParquetWriter on a temp name in the target folder, renamed to `path` on success."""
    if path is None:
        yield None
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with pq.ParquetWriter(tmp, table_schema) as writer:
            yield writer
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fold_stream(batches: Iterable[pa.Table], acc: TopKPerIdentity,
                writer: pq.ParquetWriter | None, progress_s: float = 10.0
                ) -> tuple[list[str], int]:
    """Fold scored batches into `acc` (running clip index = arrival order) and write their
    per-clip columns. Returns (clip names by index, clips with ok False)."""
    names: list[str] = []
    not_ok, t0 = 0, time.perf_counter()
    last = t0
    for table in batches:
        n, base = table.num_rows, len(names)
        names.extend(table.column("clip").to_pylist())
        not_ok += n - int(pc.sum(table.column("ok")).as_py() or 0)
        counts = pc.list_value_length(table.column("cand_ids")).to_numpy(zero_copy_only=False)
        rows = np.repeat(np.arange(base, base + n, dtype=np.int64), counts)
        ids, scores = schema.list_values(table, "cand_ids"), schema.list_values(table, "cand_scores")
        step = 1 << 18  # candidates folded per call: ~20 MB of temporaries at any size
        for lo in range(0, len(rows), step):
            acc.update_sparse(rows[lo:lo + step], ids[lo:lo + step], scores[lo:lo + step])
        if writer is not None:
            writer.write_table(table.select(PER_CLIP_SCHEMA.names))
        release_memory()
        if time.perf_counter() - last >= progress_s:
            last = time.perf_counter()
            log.info("predict: %d clips, %.0f clips/s", len(names), len(names) / (last - t0))
    log.info("predict: %d clips done in %.1f s", len(names), time.perf_counter() - t0)
    return names, not_ok


def resources(use_gpu: bool | None, num_actors: int | None) -> tuple[bool, int]:
    """(use_gpu, scoring actors) for batch inference on the current Ray cluster: GPU when
    it has one (unless use_gpu says otherwise), one actor per GPU, else half the CPUs
    (at most 4). Raises PredictError when use_gpu is asked for and there is no GPU."""
    import ray

    cluster = ray.cluster_resources()
    gpus, cpus = cluster.get("GPU", 0), cluster.get("CPU", 2)
    if use_gpu is None:
        use_gpu = gpus > 0
    if use_gpu and gpus < 1:
        raise PredictError("use_gpu was asked for but the Ray cluster has no GPU")
    if num_actors is None:  # CPU: leave half the CPUs to read + qFF; cap the model copies
        num_actors = int(gpus) if use_gpu else min(4, int(cpus) // 2)
    return use_gpu, max(1, num_actors)


def predict_split(run_dir: str | os.PathLike, dataset_dir: str | os.PathLike, split: str,
                  out_path: str | os.PathLike, *, per_clip_path: str | os.PathLike | None = None,
                  top_k_clip: int = 5, top_k_identity: int = MAX_RANK, batch_size: int = 4096,
                  num_actors: int | None = None, use_gpu: bool | None = None,
                  gt_path: str | os.PathLike | None = None, fusion: str = "qff",
                  part: str | None = None, unseen_fraction: float | None = None
                  ) -> dict[str, Any]:
    """Predict `split` of a prepared dataset with the run's ensemble; write the submission.

    out_path: the submission (top `top_k_identity` clips per identity, ids ascending).
    per_clip_path: optional Parquet with clip, ok, top_ids (k,) int32, top_scores (k,) float32.
    use_gpu / num_actors: default from `ray.cluster_resources()` (one actor per GPU).
    gt_path: score the submission (default for val: the release's val_gt.txt, if found).
    fusion: "qff" (one fused feature per clip) or "vote" (clip-vector members score every
        face and average; `rayvid.infer.vote`).
    part: predict (and score) only the "seen" or "unseen" part of val
        (`rayvid.release.strat.unseen_mask` with `unseen_fraction`, default the run's own
        from `ensemble.json` `trained_on`, else 0.5): the honest score of a run whose
        open-set recipe trained on val's other part.
    Returns a summary dict (clips, not_ok, seconds, clips_per_s, paths, fusion, part, map if
    scored).
    Raises PredictError for a missing or malformed input, before anything runs.
    """
    check_fusion(fusion)
    if part is not None and (split != "val" or part not in ("seen", "unseen")):
        raise PredictError(f"part {part!r} of split {split!r}: only val has a seen and an "
                           "unseen part")
    spec = read_run(run_dir)
    meta = check_split(dataset_dir, split)
    gt = find_gt(meta, split, gt_path)
    trained = spec.ensemble.extra.get("trained_on") or {}
    if unseen_fraction is None:
        unseen_fraction = float(trained.get("unseen_fraction", 0.5))
    if split in trained.get("splits", ()) and part != "unseen":
        log.warning("run %s trained on clips of %s (%s): its %s mAP is not an honest score%s",
                    run_dir, split, trained, "seen part's" if part else "whole split's",
                    "; predict part=unseen (jobs/predict.py --part unseen)"
                    if "unseen_fraction" in trained else "")
    use_gpu, num_actors = resources(use_gpu, num_actors)
    log.info("predict %s/%s with %d members (C=%d) on %d %s actor(s), weighting %s", dataset_dir,
             split, spec.members, spec.num_classes, num_actors, "GPU" if use_gpu else "CPU",
             spec.weighting)
    if fusion == "vote":
        log.info("predict: per-frame voting: clip-vector members score every face")
    ds = scored_dataset(spec, dataset_dir, split, top_k_clip=top_k_clip,
                        top_k_identity=top_k_identity, batch_size=batch_size,
                        num_actors=num_actors, use_gpu=use_gpu, fusion=fusion, part=part,
                        unseen_fraction=unseen_fraction)
    acc, t0 = TopKPerIdentity(spec.num_classes, top_k_identity), time.perf_counter()
    with _atomic_parquet(per_clip_path, PER_CLIP_SCHEMA) as writer:
        # Driver batches the size of the actors' keep <= 2 x top_k candidates per identity.
        batches = ds.iter_batches(batch_size=batch_size, batch_format="pyarrow")
        names, not_ok = fold_stream(batches, acc, writer)
    write_submission(out_path, acc.iter_ranked_clips(names), top_k_identity)
    seconds = time.perf_counter() - t0
    summary = {"split": split, "clips": len(names), "not_ok": not_ok, "seconds": round(seconds, 3),
               "clips_per_s": round(len(names) / max(seconds, 1e-9), 1),
               "submission": str(out_path), "per_clip": str(per_clip_path) if per_clip_path else None,
               "num_classes": spec.num_classes, "members": spec.members, "num_actors": num_actors,
               "use_gpu": use_gpu, "weighting": asdict(spec.weighting), "gt": str(gt) if gt else None,
               "fusion": fusion, "part": part}
    if part is not None:
        summary["unseen_fraction"] = unseen_fraction
    if gt is not None:
        summary["map"] = score_files(gt, out_path, clips=set(names) if part else None)
    return summary
