"""Tests of rayvid.infer.predict and jobs/predict.py: the numpy core, then batch prediction on a
real local Ray against a brute-force in-memory computation (all scores, full sorts). The
run is conftest's `trained_run`; the dataset is hand-written here (clips with no face, or
with no usable face, and 3 part files).

    pytest tests/test_predict.py            # ~40 s, most of it Ray and actor start-up
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TRAINED_WEIGHTING

from rayvid.core import fusion, metrics
from rayvid.release import schema
from rayvid.config import from_dict
from rayvid.model.ensemble import Ensemble
from rayvid.infer.predict import (PredictError, batch_candidates, find_gt, predict_split, read_run,
                            top_classes)
from rayvid.core.submission import TopKPerIdentity
from rayvid.train.config import FusionSection

ROOT = Path(__file__).resolve().parents[1]
PARTS = (70, 90, 77)  # val clips per Parquet part file: 237 clips


# ------------------------------------------------------------------ numpy core


def _tied_scores(seed: int, n: int, c: int) -> np.ndarray:
    s = np.random.default_rng(seed).random((n, c)).astype(np.float32)
    s[:, ::2] = np.round(s[:, ::2] * 4) / 4  # coarse columns: many exact ties
    return s


def test_top_classes_match_full_sort():
    s = _tied_scores(0, 40, 9)
    ids, vals = top_classes(s, 4)
    for i in range(len(s)):
        order = np.lexsort((np.arange(9), -s[i]))[:4]  # score desc, ties by lower class
        assert ids[i].tolist() == order.tolist()
        assert vals[i].tolist() == s[i, order].tolist()
    assert ids.dtype == np.int32 and vals.dtype == np.float32


@pytest.mark.parametrize("n,k", [(50, 7), (5, 7)])
def test_candidates_then_sparse_update_equal_dense_update(n, k):
    dense, sparse = TopKPerIdentity(9, k), TopKPerIdentity(9, k)
    base = 0
    for seed in range(4):  # a stream of batches; the candidates prune when n > k
        s = _tied_scores(seed, n, 9)
        rows, ids, vals = batch_candidates(s, k)
        assert len(rows) == 8 * min(k, n) and (np.diff(rows) >= 0).all()
        np.testing.assert_array_equal(vals, s[rows, ids])
        sparse.update_sparse(base + rows, ids, vals)
        dense.update(np.arange(base, base + n), s)
        base += n
    assert sparse.ranked() == dense.ranked()


def test_update_sparse_rejects_class_zero():
    with pytest.raises(ValueError, match="class ids"):
        TopKPerIdentity(4, 3).update_sparse(np.array([0]), np.array([0]), np.array([1.0]))


# ------------------------------------------------------------------ fixtures


def _clip_rows(rng: np.random.Generator, start: int, n: int, num_classes: int) -> pa.Table:
    """n clips in the dataset schema (design.md section 2): faces only, no heads/bodies/audio."""
    n_faces = rng.integers(0, 5, n).astype(np.int32)
    n_faces[::17] = 0  # no face: ok False
    quality = [rng.uniform(-10, 60, f).astype(np.float32) for f in n_faces]
    for i in range(5, n, 23):
        quality[i][:] = -5.0  # all faces weigh 0 under W(q): ok False, plain-mean fallback
    label = rng.integers(0, num_classes, n).astype(np.int32)
    empty_i, empty_f, no_feat = [[] for _ in range(n)], [[] for _ in range(n)], [b""] * n
    cols = {
        "clip": [f"IQIYI_VID_VAL_{start + i + 1:07d}" for i in range(n)], "split": ["val"] * n,
        "label": label, "strat_rank": np.zeros(n, np.int32), "n_faces": n_faces,
        "face_frame": [list(range(f)) for f in n_faces],
        "face_bbox": [[0, 0, 10, 10] * f for f in n_faces],
        "face_det": [rng.uniform(0.5, 1, f).astype(np.float32) for f in n_faces],
        "face_quality": quality,
        "face_feat": schema.feat_blobs([rng.normal(size=(f, 512)).astype(np.float16)
                                        for f in n_faces]),
        "n_heads": np.zeros(n, np.int32), "head_frame": empty_i, "head_bbox": empty_i,
        "head_det": empty_f, "head_feat": no_feat, "n_bodies": np.zeros(n, np.int32),
        "body_frame": empty_i, "body_bbox": empty_i, "body_feat": no_feat, "audio_feat": no_feat,
    }
    return pa.table(cols, schema=schema.DATASET_SCHEMA)


def _write_dataset(root: Path, num_classes: int) -> tuple[Path, Path]:
    """A prepared dataset with a val split (3 part files) and its release's val_gt.txt."""
    rng = np.random.default_rng(0)
    ds, release = root / "ds", root / "release"
    (ds / "val").mkdir(parents=True)
    release.mkdir()
    tables, start = [], 0
    for i, n in enumerate(PARTS):
        tables.append(_clip_rows(rng, start, n, num_classes))
        pq.write_table(tables[-1], ds / "val" / f"part-{i:05d}.parquet")
        start += n
    val = pa.concat_tables(tables)
    by_id: dict[int, list[str]] = {}
    for clip, label in zip(val["clip"].to_pylist(), val["label"].to_pylist()):
        if label > 0:
            by_id.setdefault(label, []).append(clip + ".mp4")
    (release / "val_gt.txt").write_text("".join(f"{i} {' '.join(c)}\n" for i, c in sorted(by_id.items())))
    meta = {"format": schema.FORMAT_NAME, "version": schema.FORMAT_VERSION,
            "source": str(release), "splits": {"val": {"clips": start}},
            "dims": {"face": 512}, "num_classes": num_classes}
    (ds / schema.META_FILE).write_text(json.dumps(meta))
    return ds, release


# Ray: the session-wide `ray_local` fixture from conftest.py (one ray.init per session).


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, trained_run):
    root = tmp_path_factory.mktemp("predict")
    num_classes = json.loads((trained_run / "ensemble.json").read_text())["num_classes"]
    ds, release = _write_dataset(root, num_classes)
    return root, ds, release, trained_run


def _brute_force(ds: Path, run: Path) -> tuple[dict[str, np.ndarray], dict[str, bool], dict[str, int]]:
    """Every clip's (C,) scores, ok flag and label, computed in one process from the files."""
    val = pq.read_table(sorted((ds / "val").glob("*.parquet")))
    feat, det, quality, offsets = schema.face_arrays(val)
    weighting = from_dict(FusionSection, TRAINED_WEIGHTING).weighting  # the run's, not the default
    x, ok = fusion.qff(feat, det, quality, offsets, weighting)
    scores = Ensemble.from_run(run).scores(x)
    names = val["clip"].to_pylist()
    return (dict(zip(names, scores)), dict(zip(names, ok.tolist())),
            dict(zip(names, val["label"].to_pylist())))


# ------------------------------------------------------------------ Ray


@pytest.mark.ray
def test_predict_matches_brute_force(ray_local, inputs):
    root, ds, release, run = inputs
    out, per_clip = root / "out" / "submission.txt", root / "out" / "val_top5.parquet"
    out.parent.mkdir()
    summary = predict_split(run, ds, "val", out, per_clip_path=per_clip, batch_size=128,
                            num_actors=1)
    scores, ok, labels = _brute_force(ds, run)
    table = pq.read_table(per_clip)
    names = table["clip"].to_pylist()  # row = running clip index: the tie order
    assert sorted(names) == sorted(scores) and summary["clips"] == len(names) == sum(PARTS)
    assert summary["not_ok"] == sum(not v for v in ok.values()) > 0
    assert table["ok"].to_pylist() == [ok[n] for n in names]
    s = np.stack([scores[n] for n in names])  # (N, C) float32, in index order
    c_all = s.shape[1]

    top = np.lexsort((np.broadcast_to(np.arange(c_all), s.shape), -s), axis=1)[:, :5]
    np.testing.assert_array_equal(np.array(table["top_ids"].to_pylist()), top)
    np.testing.assert_allclose(np.array(table["top_scores"].to_pylist()),
                               np.take_along_axis(s, top, 1), rtol=1e-6)

    expected = []
    for c in range(1, c_all):  # full sort per identity: score desc, ties by lower clip index
        order = np.lexsort((np.arange(len(names)), -s[:, c]))[:100]
        expected.append(" ".join([str(c)] + [names[i] + ".mp4" for i in order]))
    assert out.read_text().splitlines() == expected
    assert sorted(p.name for p in out.parent.iterdir()) == ["submission.txt", "val_top5.parquet"]

    y = np.array([labels[n] for n in names])
    assert summary["gt"] == str(release / "val_gt.txt")
    assert summary["map"] == pytest.approx(metrics.map_from_scores(s, y))


@pytest.mark.ray
def test_missing_split_is_a_clear_error(ray_local, inputs):
    root, ds, _, run = inputs
    with pytest.raises(PredictError, match="has no split 'test'"):
        predict_split(run, ds, "test", root / "never.txt")
    assert not (root / "never.txt").exists()


def test_malformed_ensemble_json(tmp_path):
    (tmp_path / "ensemble.json").write_text('{"members": [{"weight": 1}]}')
    with pytest.raises(PredictError, match=r"ensemble.json: members\[0\].path: missing"):
        read_run(tmp_path)


def test_cli_missing_run_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "predict.py"), "--run", str(tmp_path / "nope"),
         "--dataset", str(tmp_path), "--split", "test", "--out", str(tmp_path / "s.txt")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"predict: error: run folder {tmp_path / 'nope'} does not exist"]


def test_gt_is_checked_before_running(tmp_path):
    (tmp_path / "gt.txt").write_text("1 a.mp4\n1 b.mp4\n")
    with pytest.raises(PredictError, match=r"gt\.txt:2: id 1 listed twice"):
        find_gt({}, "test", tmp_path / "gt.txt")
    with pytest.raises(PredictError, match="gt file"):
        find_gt({}, "val", tmp_path / "missing.txt")
    assert find_gt({"source": str(tmp_path)}, "val", None) is None  # no val_gt.txt there


# ------------------------------------------------------------------ memory at the release's size


def test_chunked_scoring_gives_score_table_exactly_with_bounded_blocks():
    """`score_table_chunked` (the actors' path) equals `score_table` of the whole matrix,
    ties included, and never asks for more than `rows` rows at once."""
    from rayvid.infer.predict import score_table, score_table_chunked

    rng = np.random.default_rng(3)
    for n, c, k, rows in [(50, 13, 5, 7), (30, 9, 100, 4), (64, 21, 10, 64), (5, 4, 3, 2)]:
        scores = rng.integers(0, 6, size=(n, c)).astype(np.float32) / 5  # many ties
        clips = np.array([f"c{i}" for i in range(n)], dtype=object)
        ok = rng.random(n) > 0.2
        asked = []

        def fn(lo, hi):
            asked.append(hi - lo)
            return scores[lo:hi]

        got = score_table_chunked(clips, ok, fn, n, c, 5, k, rows=rows)
        assert got.equals(score_table(clips, ok, scores, 5, k)), (n, c, k, rows)
        assert max(asked) <= rows


def test_scoring_a_batch_at_10035_identities_holds_a_bounded_block():
    """The case that did not scale (issue 14): a 4096-clip batch against 10,035 identities
    scored whole is a 164 MB score matrix plus its rank keys in every actor. Chunked, the
    peak of numpy's allocations (tracemalloc) stays near the 32 MiB block budget."""
    import tracemalloc

    from rayvid.infer.predict import score_table_chunked

    n, c = 4096, 10_035
    rng = np.random.default_rng(0)
    clips = np.array([f"c{i}" for i in range(n)], dtype=object)

    def fn(lo, hi):
        return rng.random((hi - lo, c), dtype=np.float32)

    tracemalloc.start()
    try:
        table = score_table_chunked(clips, np.ones(n, bool), fn, n, c, 5, 100)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert table.num_rows == n
    assert sum(len(x) for x in table.column("cand_ids").to_pylist()) == (c - 1) * 100
    assert peak < 160 << 20, f"peak {peak / 2**20:.0f} MiB"  # whole: > 500 MiB
