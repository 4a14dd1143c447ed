"""Ray Data pipelines over a prepared dataset: read -> fold filter -> gate -> model inputs.

Thin adapter over the numpy core (`rayvid.core.fusion`): one `map_batches` UDF per batch of
clips, on the flat pyarrow layout, with no Python loop per clip or per face.

- Training (`mode="qfda"`): keep the clips of the training folds, gate their faces, drop
  clips the model cannot use (a face model: no face left; a multimodal one: no modality),
  emit `repeats` fresh samples per clip of the model's input kind (`rayvid.core.inputs`).
  Ray Data re-executes the pipeline every epoch, so the draws are fresh every epoch.
- Evaluation / prediction (`mode="qff"`): all faces, no gate (the 4th place's test-time
  rule), every requested input kind per clip, with its name and an `ok` flag.

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

from rayvid.core import fusion, inputs
from rayvid.release import schema, strat
from rayvid.release.memory import release_memory

log = logging.getLogger(__name__)

FACE_COLUMNS = ["n_faces", "face_det", "face_quality", "face_feat"]
KEY_COLUMNS = ["label", "strat_rank"]
# The Parquet columns each modality of a multimodal input reads.
MODALITY_COLUMNS = {"head": ["n_heads", "head_det", "head_feat"],
                    "body": ["n_bodies", "body_feat"], "audio": ["audio_feat"]}


@dataclass(frozen=True)
class ClipTransform:
    """The per-batch UDF: picklable config + `__call__(pa.Table) -> dict of numpy`.

    The columns it emits are `rayvid.core.inputs.COLUMNS` of each of `kinds` (built by
    `rayvid.core.inputs.build`, the same code prediction and serving run), plus `y`
    (label, -1 for none) and, when not training, `ok` (and `clip` with `with_clip`).

    mode: the face vector: "qfda" (a fresh augmentation draw) or "qff" (quality-weighted
        fusion; what evaluation uses, and training with qFDA off).
    train: training: face sets are random draws, modality dropout applies, and each clip
        gives `repeats` samples, shuffled; clips `kinds[0]` cannot train on are dropped
        with `drop_empty`.
    folds: (k, fold, keep) with keep "train" (fold != f), "heldout" (fold == f) or None
        (all clips of the split). Test clips (null label) never match a fold filter.
    gate: (det_min, quality_min) applied to faces before anything else, or None.
    noise: keep the noise clips (label 0, val/test clips without a gt line) that the fold
        filter selects; False drops them (training without an open-set recipe).
    val_part: of the val clips, keep only the "seen" or the "unseen" part
        (`rayvid.release.strat.unseen_mask` with `unseen_fraction`), or all (None). Rows
        of other splits are not affected.
    val_labels: of the (remaining) val clips, keep "all" or only the "noise" ones (an
        open-set recipe that adds val's noise clips to the train folds).
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
    kinds: tuple[str, ...] = ("clip_vector",)
    face_set_size: int = 16
    modalities: tuple[str, ...] = inputs.MODALITIES
    modality_dropout: float = 0.0
    dims: tuple[int, int, int] = (512, 512, 512)
    train: bool | None = None  # None: training when drop_empty is set (as before kinds)
    noise: bool = True
    val_part: str | None = None
    unseen_fraction: float = 0.5
    val_labels: str = "all"

    def __post_init__(self) -> None:
        if self.mode not in ("qfda", "qff"):
            raise ValueError(f"mode must be qfda or qff, got {self.mode!r}")
        if self.val_part not in (None, "seen", "unseen"):
            raise ValueError(f"val_part must be seen, unseen or None, got {self.val_part!r}")
        if self.val_labels not in ("all", "noise"):
            raise ValueError(f"val_labels must be all or noise, got {self.val_labels!r}")
        self.spec  # InputSpec's own checks, when the pipeline is built

    @property
    def spec(self) -> inputs.InputSpec:
        return inputs.InputSpec(self.kinds, self.weighting, self.face_set_size,
                                self.modalities, self.modality_dropout, self.dims)

    @property
    def training(self) -> bool:
        return self.drop_empty if self.train is None else self.train

    def columns(self) -> list[str]:
        """The Parquet columns this transform reads."""
        cols = KEY_COLUMNS + FACE_COLUMNS
        if self.val_part is not None or self.val_labels != "all":
            cols += ["split"]
        if self.with_clip or self.val_part is not None:
            cols += ["clip"]
        if "multimodal" in self.kinds:
            for m in self.modalities:
                cols += MODALITY_COLUMNS.get(m, [])
        return cols

    def parts(self, batch: pa.Table) -> inputs.ClipParts:
        """The batch's detections, flat, of the modalities the kinds need."""
        f = schema.face_arrays(batch)
        heads = bodies = audio = None
        if "multimodal" in self.kinds:
            hd, bd, ad = self.dims
            if "head" in self.modalities:
                heads = inputs.HeadParts(*schema.head_arrays(batch, hd))
            if "body" in self.modalities:
                bodies = inputs.BodyParts(*schema.body_arrays(batch, bd))
            if "audio" in self.modalities:
                audio = inputs.AudioParts(*schema.audio_arrays(batch, ad))
        return inputs.ClipParts(inputs.FaceParts(f.feat, f.det, f.quality, f.offsets),
                                heads, bodies, audio)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        try:
            return self._transform(batch)
        finally:  # a map worker runs thousands of batches: keep its heap from growing
            release_memory()

    def _transform(self, batch: pa.Table) -> dict[str, np.ndarray]:
        batch = self.select_rows(batch)
        parts = self.parts(batch)
        labels = pc.fill_null(batch.column("label"), -1).to_numpy().astype(np.int64)
        clips = batch.column("clip").to_numpy(zero_copy_only=False) if self.with_clip else None
        spec = self.spec
        if self.gate is not None:
            parts = parts.gate_faces(*self.gate)
        if self.drop_empty:
            alive = inputs.trainable(self.kinds[0], parts, spec)
            if not alive.all():  # a training clip the model cannot use is dropped (their rule)
                parts, labels = parts.take(alive), labels[alive]
                clips = clips[alive] if clips is not None else None
        if not self.training:
            out = inputs.build(parts, spec)
            out["y"] = labels
            if clips is not None:
                out["clip"] = clips
            return out
        rng = np.random.default_rng(self.seed)
        qfda = dict(n_draws=self.n_draws, sizes=self.sizes, mix=self.mix) \
            if self.mode == "qfda" else None
        keep = [c for k in self.kinds for c in inputs.COLUMNS[k]]
        if len(labels) == 0:
            empty = inputs.build(parts, spec)
            return {**{c: empty[c] for c in keep}, "y": labels}
        draws = [inputs.build(parts, spec, rng, qfda) for _ in range(self.repeats)]
        order = rng.permutation(len(labels) * self.repeats)
        out = {c: np.concatenate([d[c] for d in draws])[order] for c in keep}
        out["y"] = np.tile(labels, self.repeats)[order]
        return out

    def select_rows(self, batch: pa.Table) -> pa.Table:
        """The rows this transform keeps: the val part and labels, the noise rule, the fold."""
        keep = np.ones(batch.num_rows, bool)
        label = pc.fill_null(batch.column("label"), -1).to_numpy()
        if self.val_part is not None or self.val_labels != "all":
            is_val = pc.equal(batch.column("split"), "val").to_numpy(zero_copy_only=False)
            if self.val_part is not None:
                unseen = strat.unseen_mask(batch.column("clip").to_numpy(zero_copy_only=False),
                                           self.unseen_fraction)
                keep &= ~is_val | (unseen if self.val_part == "unseen" else ~unseen)
            if self.val_labels == "noise":
                keep &= ~is_val | (label == 0)
        if not self.noise:
            keep &= label != 0
        if self.folds is not None:
            k, fold, which = self.folds
            rank = pc.fill_null(batch.column("strat_rank"), 0).to_numpy()
            f = schema.fold_of(label, rank, k)
            keep &= ((f == fold) if which == "heldout" else (f != fold)) & (label >= 0)
        return batch if keep.all() else batch.filter(pa.array(keep))


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

    ds = ray.data.read_parquet(split_paths(dataset_dir, splits),
                               shuffle="files" if shuffle else None
                               ).select_columns(transform.columns())
    compute = ray.data.TaskPoolStrategy(size=concurrency) if concurrency else None
    return ds.map_batches(transform, batch_format="pyarrow", batch_size=batch_size,
                          zero_copy_batch=True, compute=compute)


def count_training_clips(dataset_dir: str | Path, splits: tuple[str, ...] | list[str],
                         transform: ClipTransform) -> int:
    """Clips that survive the row filters and the gate (one cheap pass, no features)."""
    return training_counts(dataset_dir, splits, transform)["clips"]


def training_counts(dataset_dir: str | Path, splits: tuple[str, ...] | list[str],
                    transform: ClipTransform) -> dict[str, int]:
    """{"clips", "noise"}: the clips that survive the row filters and the gate, and how
    many of them are noise (label 0). One cheap pass over the keys and detections."""
    import ray.data

    def count(batch: pa.Table) -> dict[str, np.ndarray]:
        batch = transform.select_rows(batch)
        parts = transform.parts(batch)
        if transform.gate:
            parts = parts.gate_faces(*transform.gate)
        alive = inputs.trainable(transform.kinds[0], parts, transform.spec)
        label = pc.fill_null(batch.column("label"), -1).to_numpy()
        return {"n": np.array([int(alive.sum())]),
                "noise": np.array([int((alive & (label == 0)).sum())])}

    # select_columns, not read_parquet(columns=...) (deprecated in Ray 2.60): projected
    # at read time all the same
    ds = ray.data.read_parquet(split_paths(dataset_dir, splits)).select_columns(
        transform.columns())
    rows = ds.map_batches(count, batch_format="pyarrow", batch_size=4096).take_all()
    return {"clips": sum(int(r["n"]) for r in rows), "noise": sum(int(r["noise"]) for r in rows)}
