"""Tests of rayvid.infer.person_index: the numpy core (top-k merge, threshold calibration), then the
person-search index built and updated with Ray Data on a simulated dataset, against a
brute-force in-process computation (every score, full sorts). The run is a copy of
conftest's `trained_run` (calibration writes its `serving.json`).

    pytest tests/test_index.py            # ~1 minute, most of it Ray Data start-up
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TRAINED_WEIGHTING, TRAINED_WEIGHTS

from rayvid.core import fusion
from rayvid.release import schema
from rayvid.release.schema import read_meta
from rayvid.model.ensemble import Ensemble
from rayvid.model.run_folder import read_serving
from rayvid.infer.person_index import (INDEX_SCHEMA, SearchIndexError, build_index, calibrate, load_index,
                          merge_top_k, read_index_table, threshold_for, update_index)

ROOT = Path(__file__).resolve().parents[1]
K = 7


# ------------------------------------------------------------------ numpy core


def _rows(rows: list[tuple[int, str, float]]) -> pa.Table:
    ident, clip, score = zip(*rows)
    n = len(rows)
    return pa.table({"identity": list(ident), "clip": list(clip), "score": list(score),
                     "frame_min": [0] * n, "frame_max": [9] * n}, schema=INDEX_SCHEMA)


def test_merge_top_k_keeps_best_old_first_on_ties_and_replaces_reindexed_clips():
    old = _rows([(1, "a", 0.9), (1, "b", 0.5), (2, "c", 0.4), (2, "f", 0.3)])
    new = _rows([(1, "d", 0.5), (1, "e", 0.7), (2, "a", 0.35), (2, "g", 0.1)])
    got = merge_top_k(old, new, 3)
    # "a" was indexed again: its old (1, a, 0.9) is gone; on the 0.5 tie old b precedes new d
    assert list(zip(got["identity"].to_pylist(), got["clip"].to_pylist())) == [
        (1, "e"), (1, "b"), (1, "d"), (2, "c"), (2, "a"), (2, "f")]
    assert merge_top_k(old, INDEX_SCHEMA.empty_table(), 5).num_rows == 4


def test_threshold_max_f1_and_target_far():
    best = np.array([0.9, 0.8, 0.7, 0.6, -np.inf])
    known = np.array([True, True, False, False, True])
    r = threshold_for(best, known)
    assert r["threshold"] == pytest.approx(0.75)  # accept 2: F1 = 4/5
    assert (r["tpr"], r["far"], r["known"], r["noise"]) == (pytest.approx(2 / 3), 0.0, 3, 2)
    assert r["f1"] == pytest.approx(0.8)
    r = threshold_for(best, known, target_far=0.5)
    assert r["threshold"] == pytest.approx(0.65) and r["far"] == 0.5
    r = threshold_for(best, known, target_far=1.0)  # accepts every finite score
    assert r["threshold"] == pytest.approx(0.3)
    assert threshold_for(best, np.ones(5, bool)) is None


def test_threshold_accepting_nothing_sits_just_above_the_best():
    r = threshold_for(np.array([0.9, 0.2]), np.array([False, True]))
    assert r["threshold"] == pytest.approx(0.1)  # accept both (F1 2/3): half the lowest
    r = threshold_for(np.array([0.9, 0.8]), np.array([False, True]), target_far=0.0)
    assert 0.9 < r["threshold"] < 0.9 + 1e-6 and r["tpr"] == 0.0


# ------------------------------------------------------------------ Ray Data


def _brute_force(ds: Path, run: Path, splits: list[str], k: int) -> dict[int, list]:
    """Per identity: [(clip, score, frame_min, frame_max)] best first, ties by stream order."""
    table = pa.concat_tables([pq.read_table(sorted((ds / s).glob("*.parquet"))) for s in splits])
    feat, det, quality, offsets = schema.face_arrays(table)
    x, _ = fusion.qff(feat, det, quality, offsets, fusion.Weighting.from_dict(TRAINED_WEIGHTING))
    scores = Ensemble.from_run(run).scores(x) / np.float32(sum(TRAINED_WEIGHTS))
    frames = table["face_frame"].to_pylist()
    names = table["clip"].to_pylist()
    out = {}
    for c in range(1, scores.shape[1]):
        order = np.lexsort((np.arange(len(names)), -scores[:, c]))[:k]
        out[c] = [(names[i], float(scores[i, c]), min(frames[i], default=-1),
                   max(frames[i], default=-1)) for i in order]
    return out


def _as_dict(table: pa.Table) -> dict[int, list]:
    out: dict[int, list] = {}
    for r in table.to_pylist():
        out.setdefault(r["identity"], []).append((r["clip"], r["score"], r["frame_min"], r["frame_max"]))
    return out


def _assert_same(got: dict[int, list], want: dict[int, list]) -> None:
    assert sorted(got) == sorted(want)
    for c in want:
        assert [g[0] for g in got[c]] == [w[0] for w in want[c]], c
        assert [g[2:] for g in got[c]] == [w[2:] for w in want[c]], c
        np.testing.assert_allclose([g[1] for g in got[c]], [w[1] for w in want[c]], rtol=1e-5)


@pytest.fixture(scope="module")
def run_dir(trained_run, tmp_path_factory):
    return Path(shutil.copytree(trained_run, tmp_path_factory.mktemp("index") / "run"))


@pytest.mark.ray
def test_build_then_update_equals_a_full_brute_force(ray_local, sim_dataset, run_dir, tmp_path):
    out = tmp_path / "index"
    m = build_index(run_dir, sim_dataset, "test", out, k=K, batch_size=64, num_actors=1)
    assert m["version"] == 1 and m["rows"] == read_index_table(out).num_rows
    _assert_same(_as_dict(read_index_table(out)), _brute_force(sim_dataset, run_dir, ["test"], K))
    assert pq.read_table(out).num_rows == m["rows"]  # the folder reads as a Parquet dataset

    m = update_index(out, sim_dataset, "val", batch_size=64, num_actors=1)
    n_val = read_meta(sim_dataset)["splits"]["val"]["clips"]
    assert m["version"] == 2 and [s["split"] for s in m["sources"]] == ["test", "val"]
    assert m["sources"][1]["clips"] == n_val  # only the new clips were scored
    _assert_same(_as_dict(read_index_table(out)),
                 _brute_force(sim_dataset, run_dir, ["test", "val"], K))
    assert sorted(p.name for p in out.parent.iterdir()) == ["index"]  # no temp folders left

    idx = load_index(out)
    assert idx.manifest["version"] == 2 and idx.num_classes == m["num_classes"]
    assert [h["clip"] for h in idx.top(3, 2)] == [r[0] for r in _as_dict(read_index_table(out))[3][:2]]
    with pytest.raises(SearchIndexError, match="already in"):
        update_index(out, sim_dataset, "val")


@pytest.mark.ray
def test_calibrate_scores_val_and_writes_serving_json(ray_local, sim_dataset, run_dir):
    result = calibrate(run_dir, sim_dataset, "val", batch_size=64, num_actors=1)
    assert result == json.loads((run_dir / "serving.json").read_text())
    assert read_serving(run_dir).to_json() == result
    cal = result["calibration"]
    meta = read_meta(sim_dataset)["splits"]["val"]
    assert cal["noise"] == meta["noise"] > 0 and cal["known"] + cal["noise"] == meta["clips"]
    assert 0.0 <= result["unknown_threshold"] <= 1.0 + 1e-6 and cal["method"] == "max_f1"


def test_cli_missing_run_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "index.py"), "--run", str(tmp_path / "nope"),
         "--dataset", str(tmp_path), "--out", str(tmp_path / "idx")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"index: error: run folder {tmp_path / 'nope'} does not exist"]
