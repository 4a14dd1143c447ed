"""Release -> Parquet dataset (rayvid.release.prepare, rayvid.release.bucketing, rayvid.release.schema, jobs/prepare.py).

The round trip compares every value of the dataset with the pickles as the streaming reader
returns them, and every label with the gt files as `rayvid.core.formats` reads them.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayvid.release import schema
from rayvid.core.formats import GroundTruthError, read_gt, read_train_gt
from rayvid.data import pipeline as rdata
from rayvid.release.prepare import DatasetExistsError, FeatureDimError, prepare_release
from rayvid.release.schema import read_meta
from rayvid.release.pickle_reader import PickleFormatError, UnsafePickleError, iter_dict_items
from rayvid.release.py2_writer import write_dict
from rayvid.release.layout import BadClipError, Release

REPO = Path(__file__).resolve().parents[1]
DIMS = {"face": 512, "head": 16, "body": 8, "audio": 12}
SIZES = {"train": 8, "val": 8, "test": 5}


# --- a small hand-made release -----------------------------------------------------------

def clip(split: str, i: int) -> str:
    return f"IQIYI_VID_{split.upper()}_{i + 1:07d}"


def detections(modality: str, rng, n: int, as_tuple: bool) -> list:
    items = []
    for j in range(n):
        x = int(rng.integers(0, 500))
        item = [b"%d" % (3 * j), [x, x + 1, x + 40, x + 50]]
        if modality in ("face", "head"):
            item.append(float(np.round(rng.uniform(0.3, 1), 5)))
        if modality == "face":
            item.append(float(np.round(rng.normal(40, 30), 4)))
        item.append(rng.standard_normal(DIMS[modality]).astype(np.float16))
        items.append(tuple(item) if as_tuple else item)
    return items


def make_release(root: Path, *, test: bool = True, face_test: str = "face_test.pickle",
                 values: dict | None = None, train_gt_extra: str = "",
                 val_gt: str | None = None) -> Path:
    """Train 8 clips (ids 1..3), val 8 (5 labelled, 3 noise), test 5. In every split clip 1
    has an empty face list, clip 2 is in no face pickle, odd clips use tuples, and the
    modalities are written in different key orders. values[(split, modality)][clip] replaces
    a clip's value (None removes it)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test") if test else ("train", "val"):
        names = [clip(split, i) for i in range(SIZES[split])]
        for k, modality in enumerate(schema.MODALITIES):
            items = {}
            for i, c in enumerate(names):
                if modality == "audio":
                    if i != 3:  # clip 3 has no audio
                        items[c] = rng.standard_normal(DIMS["audio"]).astype(np.float16)
                elif not (modality == "face" and i == 2):
                    items[c] = detections(modality, rng, 0 if modality == "face" and i == 1 else
                                          1 + (i * 7 + k) % 5, as_tuple=i % 2 == 1)
            for c, v in (values or {}).get((split, modality), {}).items():
                items[c] = v
                if v is None:
                    del items[c]
            order = list(items)[::-1] if k % 2 else list(items)
            name = {"face": {"train": "face_train_v2.pickle", "val": "face_val_v2.pickle",
                             "test": face_test}[split]}.get(modality, f"{modality}_{split}.pickle")
            write_dict(root / name, ((c.encode(), items[c]) for c in order))
    train = [f"{clip('train', i)}.mp4 {i % 3 + 1}\n" for i in range(SIZES["train"])]
    (root / "train_gt.txt").write_text("".join(train) + train_gt_extra)
    v = [f"{clip('val', i)}.mp4" for i in range(SIZES["val"])]
    (root / "val_gt.txt").write_text(val_gt if val_gt is not None else
                                     f"1 {v[0]} {v[4]}\n2 {v[1]}\n7 {v[2]} {v[3]}\n")
    return root


# --- reading back ------------------------------------------------------------------------

def dataset_rows(dataset: Path) -> dict[str, dict[str, dict]]:
    """split -> clip -> {column: value}, detections as numpy arrays, via the schema helpers."""
    meta = read_meta(dataset)
    out = {}
    for split in meta["splits"]:
        t = pq.read_table(dataset / split)
        assert t.schema.remove_metadata().equals(schema.DATASET_SCHEMA), t.schema
        dims = meta["dims"]
        arrays = {"face": schema.face_arrays(t), "head": schema.head_arrays(t, dims["head"]),
                  "body": schema.body_arrays(t, dims["body"])}
        audio, has_audio = schema.audio_arrays(t, dims["audio"])
        flat = {f"{m}_{f}": schema.list_values(t, f"{m}_{f}")
                for m in arrays for f in ("frame", "bbox")}
        keys = [t[k].to_pylist() for k in ("clip", "split", "label", "strat_rank")]
        rows = {}
        for i, (c, sp, label, rank) in enumerate(zip(*keys)):
            r = {"split": sp, "label": label, "strat_rank": rank,
                 "audio": audio[i] if has_audio[i] else None}
            for m, arr in arrays.items():
                a, b = arr.offsets[i], arr.offsets[i + 1]
                r[f"{m}_feat"] = arr.feat[a:b]
                r[f"{m}_frame"] = flat[f"{m}_frame"][a:b]
                r[f"{m}_bbox"] = flat[f"{m}_bbox"][4 * a:4 * b].reshape(-1, 4)
                for score in ("det", "quality"):
                    if hasattr(arr, score):
                        r[f"{m}_{score}"] = getattr(arr, score)[a:b]
            assert c not in rows
            rows[c] = r
        out[split] = rows
    return out


def bits(a) -> np.ndarray:
    return np.asarray(a, np.float16).view(np.uint16)


def assert_matches_release(release_dir: Path, dataset: Path,
                           skipped: set[str] = frozenset()) -> dict:
    """Every clip and value of the dataset equals the pickles'; labels equal the gt's."""
    release = Release.discover(release_dir)
    rows = dataset_rows(dataset)
    assert set(rows) == set(release.splits)
    train_gt = {c[:-4]: i for c, i in read_train_gt(release.gt["train"]).items()}
    val_gt = {c[:-4]: i for i, cs in read_gt(release.gt["val"]).items() for c in cs}
    for split in release.splits:
        seen = set()
        for modality, path in release.pickles[split].items():
            keys = set()
            for key, value in iter_dict_items(path):
                c = key.decode()
                keys.add(c)
                if c in skipped:
                    assert c not in rows[split]
                    continue
                r = rows[split][c]
                if modality == "audio":
                    assert np.array_equal(bits(r["audio"]), bits(value)), (split, c)
                    continue
                assert len(r[f"{modality}_feat"]) == len(value), (split, modality, c)
                if not value:
                    continue
                cols = list(zip(*value))
                assert r[f"{modality}_frame"].tolist() == [int(f) for f in cols[0]]
                assert r[f"{modality}_bbox"].tolist() == [list(b) for b in cols[1]]
                assert np.array_equal(bits(r[f"{modality}_feat"]), bits(np.stack(cols[-1])))
                if modality in ("face", "head"):
                    assert np.array_equal(r[f"{modality}_det"], np.float32(cols[2]))
                if modality == "face":
                    assert np.array_equal(r["face_quality"], np.float32(cols[3]))
            for c in set(rows[split]) - keys:  # absent from this pickle: no detections
                if modality == "audio":
                    assert rows[split][c]["audio"] is None
                else:
                    assert len(rows[split][c][f"{modality}_feat"]) == 0
            seen |= keys
        assert set(rows[split]) == seen - skipped
        gt = {"train": train_gt, "val": val_gt}.get(split, {})
        for c, r in rows[split].items():
            assert r["split"] == split
            if split == "test":
                assert r["label"] is None and r["strat_rank"] is None
            else:
                assert r["label"] == gt.get(c, 0), (split, c)
                assert r["strat_rank"] is not None
    return rows


# --- simulated releases (shared per module) ---------------------------------------------

@pytest.fixture(scope="module", params=[40, pytest.param(300, marks=pytest.mark.slow)],
                ids=lambda n: f"{n}ids")
def sim(request, tmp_path_factory):
    """conftest's 40-identity release (fast) or a 300-identity one (slow: 15-40 s to
    simulate), prepared with 1 MiB buckets so that the join runs over many of them."""
    ids = request.param
    root = tmp_path_factory.mktemp(f"sim{ids}")
    if ids == 40:
        release = request.getfixturevalue("sim_release")
    else:
        from rayvid.release.simulator import simulate_release

        release = root / "release"
        try:  # OpenBLAS threads spinning on a busy 2-core box make the simulator ~50x slower
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover
            from contextlib import nullcontext as threadpool_limits
        with threadpool_limits(1):
            simulate_release(release, ids=ids, seed=0, faces_per_clip=6)
    events = []
    meta = prepare_release(release, root / "dataset", bucket_bytes=1 << 20, num_ids=ids,
                           progress=events.append)
    return ids, release, root / "dataset", meta, events


def test_round_trip_simulated(sim):
    ids, release, dataset, meta, events = sim
    rows = assert_matches_release(release, dataset)
    assert meta["num_classes"] == ids + 1 and meta["dims"] == {m: 512 for m in schema.MODALITIES}
    assert min(meta["buckets"].values()) > 1  # the multi-bucket join is exercised
    for split, rs in rows.items():
        s = meta["splits"][split]
        assert s["clips"] == len(rs)
        assert s["faces"] == sum(len(r["face_feat"]) for r in rs.values())
        assert s["no_faces"] > 0  # clips absent from the face pickle or with an empty list
        assert s["noise"] == sum(r["label"] == 0 for r in rs.values())
    assert meta["splits"]["val"]["noise"] > 0 and meta["splits"]["train"]["noise"] == 0
    files = [Path(e["file"]).name for e in events if e["event"] == "file" and e["done"]]
    sizes = [(Path(release) / f).stat().st_size for f in files]
    assert len(files) == 12 and sizes == sorted(sizes, reverse=True)  # largest first
    assert not list(dataset.parent.glob("*.tmp-*")) and not (dataset / "_spill").exists()


def test_workers_write_the_same_dataset(sim, tmp_path):
    ids, release, dataset, meta, _ = sim
    events = []
    meta2 = prepare_release(release, tmp_path / "d", bucket_bytes=1 << 20, num_ids=ids,
                            workers=2, progress=events.append)
    varying = ("seconds", "workers", "peak_rss_bytes", "peak_rss_parent_bytes",
               "peak_rss_children_bytes")
    assert {k: v for k, v in meta2.items() if k not in varying} == \
        {k: v for k, v in meta.items() if k not in varying}
    assert meta2["workers"] == 2 and meta["workers"] == 1
    assert meta2["peak_rss_children_bytes"] > 0 and meta2["peak_rss_bytes"] >= \
        meta2["peak_rss_parent_bytes"]
    for split in meta["splits"]:
        names = sorted(p.name for p in (dataset / split).iterdir())
        assert names == sorted(p.name for p in (tmp_path / "d" / split).iterdir())
        for name in names:
            a, b = pq.read_table(dataset / split / name), pq.read_table(tmp_path / "d" / split / name)
            assert a.equals(b), (split, name)
    files = [Path(e["file"]).name for e in events if e["event"] == "file" and e["done"]]
    assert sorted(files) == sorted(meta["items"])
    assert sorted(e["split"] for e in events if e["event"] == "split") == sorted(meta["splits"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


@pytest.mark.parametrize("k", [2, 3, 5, 7])
def test_strat_rank_gives_balanced_folds(sim, k):
    dataset = sim[2]
    t = pa.concat_tables([pq.read_table(dataset / s, columns=["clip", "label", "strat_rank"])
                          for s in ("train", "val")])
    label, rank = t["label"].to_numpy(), t["strat_rank"].to_numpy()
    fold = schema.fold_of(label, rank, k)
    per_label = defaultdict(Counter)
    for lab, f in zip(label.tolist(), fold.tolist()):
        per_label[lab][f] += 1
    for lab, counts in per_label.items():
        sizes = [counts.get(f, 0) for f in range(k)]
        assert max(sizes) - min(sizes) <= 1, (lab, sizes)
    for lab in (0, int(label[0])):  # ranks are dense within a label
        assert sorted(rank[label == lab].tolist()) == list(range(int((label == lab).sum())))
    totals = np.bincount(fold, minlength=k)
    assert totals.max() - totals.min() <= 0.1 * totals.mean()  # labels stagger their remainders


def _modality_arrays(t, dims: dict) -> dict:
    """modality -> (feat (n, dim) float16, offsets (rows + 1,)) through the schema helpers."""
    audio, present = schema.audio_arrays(t, dims["audio"])
    out = {"face": schema.face_arrays(t), "head": schema.head_arrays(t, dims["head"]),
           "body": schema.body_arrays(t, dims["body"])}
    out = {m: (a.feat, a.offsets) for m, a in out.items()}
    out["audio"] = (audio, np.arange(t.num_rows + 1))
    out["audio_present"] = (present, None)
    return out


def test_blob_accessors_respect_slices_and_chunks(sim):
    dataset, meta = sim[2], sim[3]
    t = pq.read_table(dataset / "val")
    whole = _modality_arrays(t, meta["dims"])
    # slices, a two-chunk table, a sliced record batch: rows 5..24, 3..6 + 7..15, 5..24
    for part, first in ((t.slice(5, 20), 5), (pa.concat_tables([t.slice(3, 4), t.slice(7, 9)]), 3),
                        (t.slice(5, 20).to_batches()[0], 5)):
        assert part.num_rows == 20 or part.column("face_feat").num_chunks == 2
        got = _modality_arrays(part, meta["dims"])
        for m, (feat, offsets) in got.items():
            if offsets is None:  # audio presence flags
                assert np.array_equal(feat, whole[m][0][first:first + part.num_rows]), m
                continue
            o = whole[m][1]
            assert offsets[0] == 0 and len(offsets) == part.num_rows + 1, m
            expected = whole[m][0][o[first]:o[first + part.num_rows]]
            assert len(expected) > 0, m
            assert np.array_equal(bits(feat), bits(expected)), m
    fa = schema.face_arrays(t.slice(5, 20))
    assert np.array_equal(fa.det, schema.face_arrays(t).det[whole["face"][1][5]:whole["face"][1][25]])
    for m in ("face", "head", "body"):
        assert whole[m][0].dtype == np.float16 and whole[m][0].shape[1] == meta["dims"][m]
        assert not whole[m][0].flags.writeable  # a view of the Arrow buffer, not a copy
    ht = schema.head_arrays(t.slice(0, 0), 512)
    assert ht.feat.shape == (0, 512) and ht.offsets.tolist() == [0]


def test_blob_lengths_are_checked_naming_the_column(sim):
    t = pq.read_table(sim[2] / "val").slice(0, 10)
    head = t["head_feat"].to_pylist()
    i = next(k for k, b in enumerate(head) if b)
    head[i] = head[i][:-2]  # one half short
    bad = t.set_column(t.schema.get_field_index("head_feat"), "head_feat",
                       pa.array(head, pa.large_binary()))
    with pytest.raises(ValueError, match=f"head_feat: row {i} \\(clip {t['clip'][i]}\\)"):
        schema.head_arrays(bad, sim[3]["dims"]["head"])
    with pytest.raises(ValueError, match="head_feat"):
        schema.head_arrays(bad)  # inferred dim: the total is no longer whole rows
    audio = t["audio_feat"].to_pylist()
    audio[0] = b"\0\0" * 3
    bad = t.set_column(t.schema.get_field_index("audio_feat"), "audio_feat",
                       pa.array(audio, pa.large_binary()))
    with pytest.raises(ValueError, match="audio_feat: row 0"):
        schema.audio_arrays(bad, sim[3]["dims"]["audio"])


def test_read_meta_names_the_folder_and_find_meta_returns_none(tmp_path):
    for folder in (tmp_path / "absent", tmp_path):
        assert schema.find_meta(folder) is None
        with pytest.raises(FileNotFoundError, match=f"{folder} is not a complete rayvid dataset"):
            schema.read_meta(folder)
    meta_path = tmp_path / schema.META_FILE
    for text in ("{half", '{"format": "something-else"}', "[1]"):
        meta_path.write_text(text)
        assert schema.find_meta(tmp_path) is None
        with pytest.raises(schema.DatasetFormatError, match=schema.META_FILE):
            schema.read_meta(tmp_path)
    meta_path.write_text(json.dumps({"format": schema.FORMAT_NAME, "version": 1}))
    assert schema.find_meta(tmp_path)["version"] == 1  # prepare decides what to do with it


def test_format_1_datasets_are_refused(tmp_path):
    release = make_release(tmp_path / "r")
    out = tmp_path / "d"
    meta = prepare_release(release, out)
    (out / schema.META_FILE).write_text(json.dumps({**meta, "version": 1}))
    with pytest.raises(schema.DatasetFormatError, match="format version 1.*re-run "
                       "jobs/prepare.py .*--force"):
        schema.read_meta(out)
    with pytest.raises(schema.DatasetFormatError, match="re-run jobs/prepare.py"):
        rdata.split_paths(out, ["val"])
    with pytest.raises(DatasetExistsError, match="format version 1.*--force"):
        prepare_release(release, out)
    assert prepare_release(release, out, force=True)["version"] == schema.FORMAT_VERSION
    assert schema.read_meta(out)["version"] == schema.FORMAT_VERSION
    # a v1 column read directly (jobs/serve.py, benches): list<float16> features
    t = pq.read_table(out / "val")
    v1 = t.set_column(t.schema.get_field_index("face_feat"), "face_feat",
                      pa.array([[]] * t.num_rows, pa.list_(pa.float16())))
    with pytest.raises(schema.DatasetFormatError, match="face_feat is list<.*format-1.*--force"):
        schema.face_arrays(v1)


# --- hand-made releases: layout variants -------------------------------------------------

def test_small_release_round_trip_any_bucket_count(tmp_path):
    release = make_release(tmp_path / "r")
    one = prepare_release(release, tmp_path / "one")
    many = prepare_release(release, tmp_path / "many", bucket_bytes=2000)
    assert one["buckets"]["train"] == 1 and many["buckets"]["train"] > 4
    rows = assert_matches_release(release, tmp_path / "one")
    assert dataset_keys(tmp_path / "one") == dataset_keys(tmp_path / "many")
    assert_matches_release(release, tmp_path / "many")
    train, val = rows["train"], rows["val"]
    assert len(train[clip("train", 1)]["face_feat"]) == 0  # empty face list
    assert len(train[clip("train", 2)]["face_feat"]) == 0  # absent from the face pickle ...
    assert len(train[clip("train", 2)]["head_feat"]) > 0   # ... but has heads
    assert train[clip("train", 3)]["audio"] is None
    assert [val[clip("val", i)]["label"] for i in range(8)] == [1, 2, 7, 7, 1, 0, 0, 0]
    assert one["dims"] == DIMS and one["num_classes"] == 8
    assert one["splits"]["val"]["noise"] == 3 and one["splits"]["test"]["labelled"] == 0


def dataset_keys(dataset: Path) -> dict:
    return {s: sorted(pq.read_table(dataset / s, columns=["clip", "label", "strat_rank", "n_faces"])
                      .to_pylist(), key=lambda r: r["clip"]) for s in read_meta(dataset)["splits"]}


def test_face_test_v2_and_no_test_split(tmp_path):
    make_release(tmp_path / "r", face_test="face_test_v2.pickle")
    meta = prepare_release(tmp_path / "r", tmp_path / "d")
    assert meta["files"]["test"]["face"] == "face_test_v2.pickle"
    assert meta["splits"]["test"]["clips"] == SIZES["test"]
    make_release(tmp_path / "r2", test=False)
    meta = prepare_release(tmp_path / "r2", tmp_path / "d2")
    assert set(meta["splits"]) == {"train", "val"} and not (tmp_path / "d2" / "test").exists()


# --- bad input ---------------------------------------------------------------------------

def bad_value(kind: str):
    rng = np.random.default_rng(5)
    if kind == "shape":
        v = detections("face", rng, 2, False)
        v[1][4] = v[1][4][:500]
    elif kind == "nan":
        v = detections("head", rng, 3, True)
        v[2][3][9] = np.nan
    else:
        v = detections("body", rng, 2, False)
        v[0][1] = [1, 2, 3]
    return v


BAD = {  # case -> (make_release kwargs, file named in the error, clip named, field)
    "shape": ({"values": {("val", "face"): {clip("val", 4): bad_value("shape")}}},
              "face_val_v2.pickle", clip("val", 4), "face[1].feat"),
    "nan": ({"values": {("train", "head"): {clip("train", 5): bad_value("nan")}}},
            "head_train.pickle", clip("train", 5), "head[2].feat"),
    "bbox": ({"values": {("test", "body"): {clip("test", 0): bad_value("bbox")}}},
             "body_test.pickle", clip("test", 0), "body[0].bbox"),
    "gt clip in no pickle": ({"train_gt_extra": "IQIYI_VID_TRAIN_0000099.mp4 2\n"},
                             "train_gt.txt", "IQIYI_VID_TRAIN_0000099", "gt"),
}


def assert_nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_clip_fails_naming_file_and_clip(tmp_path, case, workers):
    kwargs, file, bad_clip, field = BAD[case]
    make_release(tmp_path / "r", **kwargs)
    with pytest.raises(BadClipError) as e:
        prepare_release(tmp_path / "r", tmp_path / "d", workers=workers)
    assert Path(e.value.file).name == file and e.value.clip == bad_clip and e.value.field == field
    assert file in str(e.value) and bad_clip in str(e.value)
    assert_nothing_written(tmp_path, tmp_path / "d")


@pytest.mark.parametrize("workers", [1, 2])
def test_skip_counts_and_reports_bad_clips(tmp_path, workers):
    values, extra = {}, ""
    for kwargs, *_ in BAD.values():
        for key, v in kwargs.get("values", {}).items():
            values[key] = v
        extra += kwargs.get("train_gt_extra", "")
    release = make_release(tmp_path / "r", values=values, train_gt_extra=extra)
    meta = prepare_release(release, tmp_path / "d", on_bad_clip="skip", workers=workers)
    expected = {c for _, _, c, _ in BAD.values()}
    assert meta["skipped"]["count"] == 4 and meta["on_bad_clip"] == "skip"
    assert {s["clip"] for s in meta["skipped"]["first"]} == expected
    files = {Path(s["file"]).name for s in meta["skipped"]["first"]}
    assert files == {f for _, f, _, _ in BAD.values()}
    assert meta["splits"]["val"]["skipped"] == 1 and meta["splits"]["train"]["skipped"] == 2
    rows = assert_matches_release(release, tmp_path / "d", skipped=expected)
    assert len(rows["val"]) == SIZES["val"] - 1 and len(rows["test"]) == SIZES["test"] - 1
    assert read_meta(tmp_path / "d")["skipped"] == meta["skipped"]


def test_unparsable_gt_line_fails_even_with_skip(tmp_path):
    make_release(tmp_path / "r", val_gt="1 IQIYI_VID_VAL_0000001.mp4\none B.mp4")
    for policy in ("fail", "skip"):
        with pytest.raises(GroundTruthError, match=r"val_gt.txt:2: id 'one'"):
            prepare_release(tmp_path / "r", tmp_path / "d", on_bad_clip=policy)
    assert_nothing_written(tmp_path, tmp_path / "d")


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.mark.parametrize("workers", [1, 2])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, workers):
    make_release(tmp_path / "r")
    marker = tmp_path / "pwned"
    with open(tmp_path / "r" / "head_val.pickle", "wb") as f:
        pickle.dump({clip("val", 0).encode(): _Payload(marker)}, f, protocol=2)
    with pytest.raises(UnsafePickleError, match="head_val.pickle") as e:
        prepare_release(tmp_path / "r", tmp_path / "d", on_bad_clip="skip", workers=workers)
    assert "exec" in str(e.value) and "exec" in e.value.global_name and e.value.offset > 0
    assert not marker.exists()
    assert_nothing_written(tmp_path, tmp_path / "d")


@pytest.mark.parametrize("workers", [1, 2])
def test_truncated_pickle_fails_naming_file_and_offset(tmp_path, workers):
    make_release(tmp_path / "r")
    path = tmp_path / "r" / "body_train.pickle"
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(PickleFormatError, match="body_train.pickle: byte ") as e:
        prepare_release(tmp_path / "r", tmp_path / "d", on_bad_clip="skip", workers=workers)
    assert e.value.path == str(path) and e.value.offset > 0
    assert_nothing_written(tmp_path, tmp_path / "d")


def test_feature_dims_must_agree_across_files(tmp_path):
    rng = np.random.default_rng(1)
    release = make_release(tmp_path / "r")
    items = [(clip("val", i).encode(), [[b"1", [0, 0, 2, 2], 0.9,
                                         rng.standard_normal(32).astype(np.float16)]])
             for i in range(SIZES["val"])]
    write_dict(release / "head_val.pickle", items)  # 32 values; train and test have 16
    with pytest.raises(FeatureDimError, match="head features have 16 values in .*head_"
                       r"\w+.pickle but 32 in .*head_val.pickle"):
        prepare_release(release, tmp_path / "d", on_bad_clip="skip")
    assert_nothing_written(tmp_path, tmp_path / "d")


# --- re-runs -----------------------------------------------------------------------------

def test_rerun_is_a_noop_unless_force(tmp_path):
    release = make_release(tmp_path / "r")
    out = tmp_path / "d"
    first = prepare_release(release, out)
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = prepare_release(release, out)
    assert again["already_prepared"] and again["seconds"] == first["seconds"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamp
    forced = prepare_release(release, out, force=True)
    assert "already_prepared" not in forced
    assert (out / schema.META_FILE).stat().st_mtime_ns != stamp[out / schema.META_FILE]
    assert_matches_release(release, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "r"]


def test_refuses_to_overwrite_what_it_did_not_write(tmp_path):
    make_release(tmp_path / "r")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(DatasetExistsError, match="not a prepared dataset"):
        prepare_release(tmp_path / "r", tmp_path / "d")
    assert (tmp_path / "d" / "notes.txt").read_text() == "mine"
    prepare_release(tmp_path / "r", tmp_path / "d2")
    make_release(tmp_path / "other")
    with pytest.raises(DatasetExistsError, match="was prepared from"):
        prepare_release(tmp_path / "other", tmp_path / "d2")


# --- the job -----------------------------------------------------------------------------

def run_job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / "prepare.py"), *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_job_reports_and_exits_2_on_bad_input(tmp_path):
    make_release(tmp_path / "r")
    p = run_job("--release", str(tmp_path / "r"), "--out", str(tmp_path / "d"))
    assert p.returncode == 0, p.stderr
    assert "faces/s" in p.stdout and "peak RSS" in p.stdout and "items/s" in p.stderr
    assert "face_val_v2.pickle" in p.stderr  # one progress line per file
    p = run_job("--release", str(tmp_path / "r"), "--out", str(tmp_path / "d"))
    assert p.returncode == 0 and "already prepared" in p.stdout
    (tmp_path / "r" / "val_gt.txt").write_text("x y\n")
    p = run_job("--release", str(tmp_path / "r"), "--out", str(tmp_path / "d3"))
    assert p.returncode == 2
    assert p.stderr.strip().startswith("prepare: error:") and "val_gt.txt:1" in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
