"""Unit tests of rayvid.core.metrics (the official mAP), rayvid.core.formats (the gt and
submission files) and jobs/evaluate.py."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from rayvid.core import formats
from rayvid.core.formats import GroundTruthError, SubmissionError, read_gt, read_submission, read_train_gt
from rayvid.core.metrics import (
    average_precision,
    map_from_scores,
    mean_average_precision,
    rank_keys,
    score_arrays,
    score_files,
    score_identities,
    unpack_rank_keys,
)
from rayvid.core.submission import write_submission

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _clips(n: int, prefix: str = "c") -> list[str]:
    return [f"{prefix}{i:04d}.mp4" for i in range(n)]


def _brute_ranking(scores: np.ndarray, column: int, top_k: int) -> np.ndarray:
    """Full sort: float32 score descending, ties by lower clip index."""
    s = scores[:, column].astype(np.float32)
    return np.lexsort((np.arange(len(s)), -s))[:top_k]


# --------------------------------------------------------------------- hand-computed AP


def test_ap_hits_at_ranks_1_and_3():
    assert average_precision(["a", "x", "b"], {"a", "b"}) == pytest.approx((1 / 1 + 2 / 3) / 2)


def test_ap_denominator_is_not_capped_at_100():
    relevant = set(_clips(150))
    assert average_precision(_clips(100), relevant) == pytest.approx(100 / 150)


def test_ap_no_hit_and_repeats_dropped():
    assert average_precision(["x", "y"], {"a"}) == 0.0
    assert average_precision(["x", "x", "a"], {"a"}) == pytest.approx(1 / 2)
    with pytest.raises(ValueError):
        average_precision(["a"], set())


def test_missing_identity_scores_zero_but_counts_and_extra_ids_ignored():
    gt = {1: ["a.mp4"], 2: ["b.mp4", "c.mp4"]}
    sub = {1: ["a.mp4"], 99: ["b.mp4"]}
    result = score_identities(gt, sub)
    assert result.per_id == {1: 1.0, 2: 0.0}
    assert result.map == mean_average_precision(gt, sub) == pytest.approx(0.5)
    assert result.worst(1) == [(2, 0.0)]


def test_in_memory_ranking_over_100_distinct_is_rejected():
    with pytest.raises(SubmissionError, match="identity 1 has 101"):
        score_identities({1: ["a.mp4"]}, {1: _clips(101)})


# --------------------------------------------------------------------------- gt files


def test_read_gt_and_train_gt(tmp_path):
    gt = read_gt(_write(tmp_path / "val_gt.txt", "3 a.mp4 b.mp4\n\n1 c.mp4\r\n"))
    assert gt == {3: ["a.mp4", "b.mp4"], 1: ["c.mp4"]}
    train = read_train_gt(_write(tmp_path / "train_gt.txt", "a.mp4 10034\nb.mp4 7\n"))
    assert train == {"a.mp4": 10034, "b.mp4": 7}


@pytest.mark.parametrize(
    "text, message",
    [
        ("1 a.mp4\nx b.mp4\n", "id 'x' is not an integer"),
        ("1 a.mp4\n10035 b.mp4\n", r"id '10035' is not an integer in 1\.\.10034"),
        ("1 a.mp4\n0 b.mp4\n", r"id '0' is not an integer in 1\.\.10034"),
        ("1 a.mp4\n2 b\n", r"'b' is not a <clip>\.mp4 name"),
        ("1 a.mp4\n1 b.mp4\n", r"id 1 listed twice \(first at .*val_gt.txt:1\)"),
        ("1 a.mp4\n2\n", "has no clips"),
        ("1 a.mp4\n2 b.mp4 b.mp4\n", r"clip b.mp4 listed twice \(first at .*val_gt.txt:2\)"),
        ("1 a.mp4\n2 b.mp4 a.mp4\n", r"clip a.mp4 listed twice \(first at .*val_gt.txt:1\)"),
    ],
)
def test_read_gt_errors_name_file_and_line(tmp_path, text, message):
    path = _write(tmp_path / "val_gt.txt", text)
    with pytest.raises(GroundTruthError, match=message) as info:
        read_gt(path)
    assert f"{path}:2:" in str(info.value)


def test_read_gt_max_id_and_empty(tmp_path):
    assert read_gt(_write(tmp_path / "g.txt", "20000 a.mp4\n"), max_id=20000) == {20000: ["a.mp4"]}
    with pytest.raises(GroundTruthError, match="no identity lines"):
        read_gt(_write(tmp_path / "empty.txt", "\n"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("a.mp4 1\nb.mp4\n", "got 1 fields"),
        ("a.mp4 1\nb 2\n", r"'b' is not a <clip>\.mp4 name"),
        ("a.mp4 1\nb.mp4 two\n", "not an integer"),
        ("a.mp4 1\nb.mp4 0\n", r"not an integer in 1\.\.10034"),
        ("a.mp4 1\nb.mp4 ²\n", r"not an integer in 1\.\.10034"),
        ("a.mp4 1\na.mp4 2\n", r"clip a.mp4 listed twice \(first at .*:1\)"),
    ],
)
def test_read_train_gt_errors(tmp_path, text, message):
    path = _write(tmp_path / "train_gt.txt", text)
    with pytest.raises(GroundTruthError, match=message) as info:
        read_train_gt(path)
    assert f"{path}:2:" in str(info.value)


# ------------------------------------------------------------------- submission files


def test_submission_duplicates_dropped_before_the_100_check(tmp_path):
    clips = _clips(100)
    path = _write(tmp_path / "sub.txt", "5 " + " ".join(clips + [clips[3]]) + "\n")
    assert read_submission(path) == {5: clips}


def test_submission_101_distinct_fails(tmp_path):
    path = _write(tmp_path / "sub.txt", "1 a.mp4\n7 " + " ".join(_clips(101)) + "\n")
    with pytest.raises(SubmissionError) as info:
        read_submission(path)
    message = str(info.value)
    assert f"{path}:2:" in message and "identity 7" in message and "101" in message


@pytest.mark.parametrize(
    "text, message",
    [("1 a.mp4\nseven a.mp4\n", "not an integer"), ("1 a.mp4\n1 b.mp4\n", "id 1 listed twice")],
)
def test_submission_errors(tmp_path, text, message):
    path = _write(tmp_path / "sub.txt", text)
    with pytest.raises(SubmissionError, match=message) as info:
        read_submission(path)
    assert f"{path}:2:" in str(info.value)


def test_score_files(tmp_path):
    gt = _write(tmp_path / "gt.txt", "1 a.mp4 b.mp4\n2 c.mp4\n3 d.mp4\n")
    sub = _write(tmp_path / "sub.txt", "1 a.mp4 x.mp4 b.mp4\n2 x.mp4 c.mp4\n99 d.mp4\n")
    assert score_files(gt, sub) == pytest.approx(((1 + 2 / 3) / 2 + 1 / 2 + 0) / 3)


# ---------------------------------------------------------------- cross-check: sklearn


@pytest.mark.parametrize("seed", range(5))
def test_ap_equals_sklearn_on_full_ranking_without_ties(seed):
    rng = np.random.default_rng(seed)
    n = 300
    scores = rng.permutation(n).astype(np.float64)  # distinct: no ties
    y = np.zeros(n, bool)
    y[rng.choice(n, rng.integers(1, 40), replace=False)] = True
    names = np.array(_clips(n))
    ranked = names[np.argsort(-scores)]
    ours = average_precision(list(ranked), set(names[y]))
    assert ours == pytest.approx(average_precision_score(y, scores), rel=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_map_from_scores_equals_sklearn_when_all_relevant_in_top_100(seed):
    rng = np.random.default_rng(seed)
    n, c = 400, 8
    labels = rng.integers(0, c, n)
    scores = rng.random((n, c)).astype(np.float32)  # ties have probability ~0
    for j in range(1, c):  # lift G_j and some misses above the rest: hits stay in the top 100
        band = (labels == j) | (rng.random(n) < 0.07)
        assert band.sum() <= 100
        scores[band, j] += 1.0
    expected = [average_precision_score(labels == j, scores[:, j]) for j in range(1, c)]
    assert map_from_scores(scores, labels) == pytest.approx(np.mean(expected), rel=1e-12)


# ------------------------------------------------------------ array version vs. files


def _scores_with_ties(rng: np.random.Generator, n: int, c: int) -> np.ndarray:
    scores = rng.random((n, c)).astype(np.float32)
    scores[:, ::2] = np.round(scores[:, ::2] * 4) / 4  # coarse columns: many exact ties
    return scores


@pytest.mark.parametrize("top_k, chunk_size", [(100, None), (7, 3), (1000, 1)])
def test_map_from_scores_equals_file_scorer(tmp_path, top_k, chunk_size):
    rng = np.random.default_rng(top_k)
    n, c = 500, 25
    labels = rng.integers(0, c, n)
    labels[rng.random(n) < 0.4] = 0  # noise
    labels[labels == 3] = 0  # an identity absent from this fold
    scores = _scores_with_ties(rng, n, c)
    names = _clips(n)
    ids = sorted(set(labels.tolist()) - {0})
    gt_path = tmp_path / "gt.txt"
    gt_lines = [" ".join([str(i), *(names[k] for k in np.flatnonzero(labels == i))]) for i in ids]
    gt_path.write_text("\n".join(gt_lines) + "\n")
    sub_path = tmp_path / "sub.txt"
    ranked = {i: [names[k] for k in _brute_ranking(scores, i, top_k)] for i in ids}
    write_submission(sub_path, ranked, top_k=top_k)
    gt = read_gt(gt_path, max_id=c)
    expected = score_identities(gt, read_submission(sub_path, max_rank=top_k), max_rank=top_k)
    result = score_arrays(scores, labels, top_k, chunk_size=chunk_size)
    assert result.per_id.keys() == expected.per_id.keys()
    for i in ids:
        assert result.per_id[i] == pytest.approx(expected.per_id[i], rel=1e-12, abs=1e-15)
    assert map_from_scores(scores, labels, top_k, chunk_size=chunk_size) == pytest.approx(
        expected.map, rel=1e-12
    )
    if top_k == 100:
        assert expected.map == pytest.approx(score_files(gt_path, sub_path, max_id=c))


def test_map_from_scores_hand_case_and_errors():
    # identity 1: clips 0, 2; column 1 ranks 0 > 1 > 2 -> hits at ranks 1 and 3
    scores = np.array([[0, 0.9, 0], [0, 0.5, 0], [0, 0.1, 0]], np.float32)
    assert map_from_scores(scores, np.array([1, 0, 1])) == pytest.approx((1 + 2 / 3) / 2)
    # top_k=1 keeps one hit of |G|=2
    assert map_from_scores(scores, np.array([1, 0, 1]), top_k=1) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no identity"):
        map_from_scores(scores, np.zeros(3, int))
    with pytest.raises(ValueError, match="labels must lie"):
        map_from_scores(scores, np.array([1, 3, 0]))
    with pytest.raises(ValueError, match="NaN"):
        map_from_scores(np.full((3, 3), np.nan, np.float32), np.array([1, 0, 2]))


def test_rank_keys_order_and_round_trip():
    values = np.array([-np.inf, -3.5, -0.0, 0.0, 1e-30, 2.0, np.inf, 2.0], np.float32)
    index = np.array([7, 6, 5, 4, 3, 2, 1, 0])
    keys = rank_keys(values, index)
    assert (keys != 0).all()
    back_index, back_values = unpack_rank_keys(keys)
    np.testing.assert_array_equal(back_index, index)
    np.testing.assert_array_equal(back_values, values + np.float32(0))
    order = np.argsort(keys)[::-1]  # best first
    np.testing.assert_array_equal(index[order], [1, 0, 2, 3, 4, 5, 6, 7])  # 0.0 == -0.0 tie


# ------------------------------------------------------------------ jobs/evaluate.py


def _run_job(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "jobs" / "evaluate.py"), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)


def test_evaluate_job_prints_map_and_writes_csv(tmp_path):
    gt = _write(tmp_path / "gt.txt", "1 a.mp4 b.mp4\n2 c.mp4\n3 d.mp4\n")
    sub = _write(tmp_path / "sub.txt", "1 a.mp4 x.mp4 b.mp4\n2 x.mp4 c.mp4\n")
    csv_path = tmp_path / "ap.csv"
    out = _run_job("--gt", str(gt), "--submission", str(sub), "--per-id-csv", str(csv_path))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"mAP {((1 + 2 / 3) / 2 + 0.5) / 3:.4f} over 3 identities"
    assert "id 3" in lines[1]  # the worst: missing from the submission
    csv_lines = csv_path.read_text().splitlines()
    assert csv_lines[0] == "id,ap,n_relevant" and csv_lines[3] == "3,0.000000,1"


def test_evaluate_job_malformed_submission_exits_2(tmp_path):
    gt = _write(tmp_path / "gt.txt", "1 a.mp4\n")
    sub = _write(tmp_path / "sub.txt", "1 " + " ".join(_clips(101)) + "\n")
    out = _run_job("--gt", str(gt), "--submission", str(sub))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert f"{sub}:1:" in out.stderr and "101" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    missing = _run_job("--gt", str(tmp_path / "nope.txt"), "--submission", str(sub))
    assert missing.returncode == 2 and "nope.txt" in missing.stderr


def test_constants():
    assert formats.NUM_IDENTITIES == 10034 and formats.MAX_RANK == 100


def test_score_files_on_a_part_of_the_split_drops_the_other_clips(tmp_path):
    """The unseen part of val: the gt keeps the part's clips (identities with none of them
    drop out) and the AP is computed over the submission of that part, by hand."""
    gt = _write(tmp_path / "gt.txt", "1 a.mp4 b.mp4 c.mp4\n2 d.mp4\n3 e.mp4 f.mp4\n")
    sub = _write(tmp_path / "sub.txt", "1 b.mp4 x.mp4 c.mp4\n3 y.mp4 f.mp4\n")
    part = {"b", "c", "x", "y", "f"}  # a, d, e are in the other part: identity 2 drops out
    expected = ((1 / 1 + 2 / 3) / 2 + (1 / 2) / 1) / 2
    assert score_files(gt, sub, clips=part) == pytest.approx(expected)
    assert score_files(gt, sub, clips={c + ".mp4" for c in part}) == pytest.approx(expected)
    assert score_files(gt, sub) == pytest.approx(((1 + 2 / 3) / 3 + 0 + (1 / 2) / 2) / 3)
