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


def _fnv1a_fmix(name: str) -> int:
    """The unseen-part key, one clip at a time from its definition (the oracle)."""
    h = 0xCBF29CE484222325
    for b in name.encode("utf-8"):
        h = ((h ^ b) * 0x100000001B3) % (1 << 64)
    for mult in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):
        h ^= h >> 33
        h = (h * mult) % (1 << 64)
    return h ^ (h >> 33)


def test_unseen_part_is_a_stable_hash_of_the_name():
    from rayvid.release.strat import name_hash, unseen_mask

    names = [f"IQIYI_VID_VAL_{i:07d}" for i in range(1, 3001)] + ["é名", "", "x" * 70]
    assert name_hash(names).tolist() == [_fnv1a_fmix(n) for n in names]
    part = unseen_mask(names, 0.3)
    assert 0.27 < part[:3000].mean() < 0.33  # neighbouring numbers do not share a part
    assert (unseen_mask(names[::-1], 0.3) == part[::-1]).all()  # no dependence on order
    assert not unseen_mask(names, 0.0).any() and (part <= unseen_mask(names, 0.6)).all()


def test_val_parts_and_noise_rows_select_what_they_say(sim_dataset):
    """select_rows against an independent per-row reading of the Parquet columns."""
    from rayvid.release.strat import unseen_mask

    table = _table(sim_dataset, "val")
    rows = table.select(["clip", "split", "label"]).to_pylist()
    unseen = dict(zip([r["clip"] for r in rows], unseen_mask([r["clip"] for r in rows], 0.4)))
    label = {r["clip"]: -1 if r["label"] is None else r["label"] for r in rows}
    assert any(v == 0 for v in label.values())  # the simulated val has noise clips

    def kept(**kw):
        return set(rdata.ClipTransform(mode="qff", with_clip=True, unseen_fraction=0.4,
                                       **kw)(table)["clip"].tolist())

    assert kept(val_part="unseen") == {c for c in unseen if unseen[c]}
    assert kept(val_part="seen") == {c for c in unseen if not unseen[c]}
    assert kept(val_part="seen", val_labels="noise") == \
        {c for c in unseen if not unseen[c] and label[c] == 0}
    assert kept(noise=False) == {c for c in label if label[c] != 0}
    train = _table(sim_dataset, "train")  # rows of other splits are not affected
    assert rdata.ClipTransform(val_part="unseen", val_labels="noise")(train)["y"].size == \
        train.num_rows
