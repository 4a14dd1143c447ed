"""The Ray Data pipeline: per-batch transform (no Ray) and the pipeline on a real local Ray."""

import glob

import numpy as np
import pyarrow.parquet as pq
import pytest

from rayvid.data import pipeline as rdata
from rayvid.core import fusion
from rayvid.release import schema


def _table(dataset, split):
    return pq.read_table(glob.glob(f"{dataset}/{split}/*.parquet"))


def _labels(table):
    return np.nan_to_num(table.column("label").to_numpy(zero_copy_only=False).astype(float),
                         nan=-1).astype(np.int64)


def test_qff_transform_equals_the_numpy_core(sim_dataset):
    table = _table(sim_dataset, "val")
    out = rdata.ClipTransform(mode="qff", with_clip=True)(table)
    fa = schema.face_arrays(table)
    ref, ok = fusion.qff(fa.feat, fa.det, fa.quality, fa.offsets)
    np.testing.assert_array_equal(out["x"], ref)
    np.testing.assert_array_equal(out["ok"], ok)
    assert out["clip"].tolist() == table.column("clip").to_pylist()
    assert (out["y"] == _labels(table)).all()


def test_folds_partition_the_labelled_clips(sim_dataset):
    table = _table(sim_dataset, "train")
    k = 3
    sizes = []
    for fold in range(k):
        train = rdata.ClipTransform(mode="qff", folds=(k, fold, "train"))(table)
        held = rdata.ClipTransform(mode="qff", folds=(k, fold, "heldout"))(table)
        assert len(train["y"]) + len(held["y"]) == table.num_rows
        sizes.append(len(held["y"]))
    assert sum(sizes) == table.num_rows and max(sizes) - min(sizes) <= table.num_rows * 0.1


def test_training_transform_gates_drops_empty_and_repeats(sim_dataset):
    table = _table(sim_dataset, "train")
    fa = schema.face_arrays(table)
    keep = fusion.gate_mask(fa.det, fa.quality, 0.7, 25.0)
    alive = fusion.segment_sum(keep.astype(np.int64), fa.offsets) > 0
    tf = rdata.ClipTransform(mode="qfda", gate=(0.7, 25.0), drop_empty=True, repeats=3, seed=1)
    out = tf(table)
    assert len(out["y"]) == 3 * alive.sum() < 3 * table.num_rows
    assert sorted(out["y"].tolist()) == sorted(np.tile(_labels(table)[alive], 3).tolist())
    assert out["x"].dtype == np.float32 and np.isfinite(out["x"]).all()


def test_training_without_qfda_repeats_the_fused_clips(sim_dataset):
    """qfda.enabled=false trains on qFF vectors; `repeats` keeps the optimizer steps the
    schedule was planned for (one row per clip per epoch trained 1/30 of the steps)."""
    table = _table(sim_dataset, "train")
    once = rdata.ClipTransform(mode="qff", gate=(0.7, 25.0), drop_empty=True)(table)
    tf = rdata.ClipTransform(mode="qff", gate=(0.7, 25.0), drop_empty=True, repeats=3, seed=1)
    out = tf(table)
    assert len(out["y"]) == 3 * len(once["y"])
    rows = {tuple(np.round(x, 5)) + (y,) for x, y in zip(once["x"], once["y"])}
    assert {tuple(np.round(x, 5)) + (y,) for x, y in zip(out["x"], out["y"])} == rows
    assert not (out["y"][: len(once["y"])] == once["y"]).all()  # shuffled, not stacked


def test_test_split_never_enters_a_fold(sim_dataset):
    table = _table(sim_dataset, "test")
    out = rdata.ClipTransform(mode="qff", folds=(5, 0, "train"))(table)
    assert len(out["y"]) == 0


@pytest.mark.ray
def test_pipeline_streams_fresh_qfda_draws_each_epoch(ray_local, sim_dataset):
    tf = rdata.ClipTransform(mode="qfda", gate=(0.7, 25.0), folds=(3, 0, "train"),
                             drop_empty=True, repeats=2)
    ds = rdata.clip_dataset(sim_dataset, ["train"], tf, shuffle=True, batch_size=64)
    epochs = []
    for _ in range(2):
        batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
        epochs.append((np.concatenate([b["x"] for b in batches]),
                       np.sort(np.concatenate([b["y"] for b in batches]))))
    (x0, y0), (x1, y1) = epochs
    assert (y0 == y1).all() and len(y0) == rdata.count_training_clips(sim_dataset, ["train"], tf) * 2
    assert not np.array_equal(np.sort(x0, axis=0), np.sort(x1, axis=0))  # fresh draws


@pytest.mark.ray
def test_missing_dataset_and_split_give_clear_errors(ray_local, tmp_path, sim_dataset):
    with pytest.raises(FileNotFoundError, match="not a complete rayvid dataset"):
        schema.read_meta(tmp_path)
    with pytest.raises(FileNotFoundError, match="no split 'nope'"):
        rdata.clip_dataset(sim_dataset, ["nope"], rdata.ClipTransform())
