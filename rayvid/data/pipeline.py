"""Ray Data pipelines over a prepared dataset: read -> fold filter -> gate -> qFDA | qFF.

Thin adapter over the numpy core (`rayvid.core.fusion`): one `map_batches` UDF per batch of
clips, on the flat pyarrow layout, with no Python loop per clip or per face.

- Training (`mode="qfda"`): keep the clips of the training folds, gate their faces, drop
  clips with no face left, emit `repeats` fresh qFDA samples per clip. Ray Data re-executes
  the pipeline every epoch, so the draws are fresh every epoch.
- Evaluation / prediction (`mode="qff"`): all faces, no gate (the 4th place's test-time
  rule), one quality-weighted feature per clip, with its name and an `ok` flag.

Shuffling is cheap and bounded: file order is shuffled at read time and batches are
permuted locally; consumers add a local shuffle buffer (`iter_torch_batches`). Nothing
materialises the dataset, so memory is bounded by Ray Data's streaming executor whatever
the dataset's size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rayvid.core import fusion
from rayvid.release import schema

log = logging.getLogger(__name__)

FACE_COLUMNS = ["n_faces", "face_det", "face_quality", "face_feat"]
KEY_COLUMNS = ["label", "strat_rank"]


@dataclass(frozen=True)
class ClipTransform:
    """The per-batch UDF: picklable config + `__call__(pa.Table) -> dict of numpy`.

    mode: "qfda" (`repeats` augmented samples per clip) or "qff" (one fused feature per
        clip; training without qFDA uses it with the gate and `drop_empty`).
    folds: (k, fold, keep) with keep "train" (fold != f), "heldout" (fold == f) or None
        (all clips of the split). Test clips (null label) never match a fold filter.
    gate: (det_min, quality_min) applied before fusion, or None.
    """

    mode: str = "qff"
    weighting: fusion.Weighting = field(default_factory=fusion.Weighting)
    gate: tuple[float, float] | None = None
    folds: tuple[int, int, str] | None = None
    n_draws: int = 5
    sizes: tuple[int, ...] = (1, 3, 5)
    mix: tuple[float, ...] = (0.25, 0.65, 0.10)
    repeats: int = 1
    seed: int | None = None  # None: fresh entropy per batch (fresh every epoch)
    drop_empty: bool = False  # training: drop clips with no (gated) face
    with_clip: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("qfda", "qff"):
            raise ValueError(f"mode must be qfda or qff, got {self.mode!r}")

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        batch = self._filter_folds(batch)
        feat, det, quality, offsets = schema.face_arrays(batch)
        labels = pc.fill_null(batch.column("label"), -1).to_numpy().astype(np.int64)
        clips = batch.column("clip").to_numpy(zero_copy_only=False) if self.with_clip else None
        if self.gate is not None:
            keep = fusion.gate_mask(det, quality, *self.gate)
            feat, det, quality = feat[keep], det[keep], quality[keep]
            offsets = fusion.compress(keep, offsets)
        if self.drop_empty:
            counts = np.diff(offsets)
            alive = counts > 0  # a training clip with no face left is dropped (their rule)
            if not alive.all():
                faces = np.repeat(alive, counts)
                feat, det, quality = feat[faces], det[faces], quality[faces]
                offsets = fusion.offsets_from_counts(counts[alive])
                labels = labels[alive]
                clips = clips[alive] if clips is not None else None
        if self.mode == "qff":
            x, ok = fusion.qff(feat, det, quality, offsets, self.weighting)
            out = {"x": x, "y": labels, "ok": ok}
            if clips is not None:
                out["clip"] = clips
            if self.repeats > 1:  # training without qFDA: the planned number of steps
                order = np.random.default_rng(self.seed).permutation(len(labels) * self.repeats)
                out = {k: np.concatenate([v] * self.repeats)[order] for k, v in out.items()}
            return out
        return self._qfda(feat, det, quality, offsets, labels)

    def _filter_folds(self, batch: pa.Table) -> pa.Table:
        if self.folds is None:
            return batch
        k, fold, keep = self.folds
        label = pc.fill_null(batch.column("label"), -1).to_numpy()
        rank = pc.fill_null(batch.column("strat_rank"), 0).to_numpy()
        f = schema.fold_of(label, rank, k)
        mask = (f == fold) if keep == "heldout" else (f != fold)
        return batch.filter(pa.array(mask & (label >= 0)))

    def _qfda(self, feat, det, quality, offsets, labels) -> dict[str, np.ndarray]:
        if len(labels) == 0:
            return {"x": np.zeros((0, feat.shape[1]), np.float32), "y": labels}
        rng = np.random.default_rng(self.seed)
        xs = [fusion.qfda(feat, det, quality, offsets, rng, self.n_draws, self.sizes, self.mix)
              for _ in range(self.repeats)]
        order = rng.permutation(len(labels) * self.repeats)
        return {"x": np.concatenate(xs)[order], "y": np.tile(labels, self.repeats)[order]}


def split_paths(dataset_dir: str | Path, splits: tuple[str, ...] | list[str]) -> list[str]:
    """The Parquet files of `splits`, after checking the dataset (`schema.read_meta`)."""
    schema.read_meta(dataset_dir)
    paths = []
    for split in splits:
        part_dir = Path(dataset_dir) / split
        if not part_dir.is_dir():
            raise FileNotFoundError(f"{dataset_dir} has no split {split!r}")
        paths.extend(str(p) for p in sorted(part_dir.glob("*.parquet")))
    return paths


def clip_dataset(dataset_dir: str | Path, splits: tuple[str, ...] | list[str],
                 transform: ClipTransform, *, shuffle: bool = False,
                 batch_size: int = 512, concurrency: int | None = None):
    """A lazy Ray Dataset of transformed clips (see ClipTransform for the columns)."""
    import ray.data  # the numpy core above stays importable without Ray

    columns = KEY_COLUMNS + FACE_COLUMNS + (["clip"] if transform.with_clip else [])
    ds = ray.data.read_parquet(split_paths(dataset_dir, splits),
                               shuffle="files" if shuffle else None).select_columns(columns)
    compute = ray.data.TaskPoolStrategy(size=concurrency) if concurrency else None
    return ds.map_batches(transform, batch_format="pyarrow", batch_size=batch_size,
                          zero_copy_batch=True, compute=compute)


def count_training_clips(dataset_dir: str | Path, splits: tuple[str, ...] | list[str],
                         transform: ClipTransform) -> int:
    """Clips that survive the fold filter and the gate (one cheap pass, no features)."""
    import ray.data

    def count(batch: pa.Table) -> dict[str, np.ndarray]:
        batch = transform._filter_folds(batch)
        det = schema.list_values(batch, "face_det")
        quality = schema.list_values(batch, "face_quality")
        offsets = fusion.offsets_from_counts(schema.counts(batch, "n_faces"))
        keep = fusion.gate_mask(det, quality, *transform.gate) if transform.gate else \
            np.ones(len(det), bool)
        alive = fusion.segment_sum(keep.astype(np.int64), offsets) > 0
        return {"n": np.array([int(alive.sum())])}

    # select_columns, not read_parquet(columns=...) (deprecated in Ray 2.60): projected
    # at read time all the same
    ds = ray.data.read_parquet(split_paths(dataset_dir, splits)).select_columns(
        KEY_COLUMNS + ["n_faces", "face_det", "face_quality"])
    return int(ds.map_batches(count, batch_format="pyarrow", batch_size=4096).sum("n") or 0)
