"""Unit tests of rayvid.core.submission: the submission writer and the running top-k."""

import numpy as np
import pytest

from rayvid.core.formats import read_submission
from rayvid.core.submission import TopKPerIdentity, write_submission


def _brute_topk(clip_index: np.ndarray, scores: np.ndarray, k: int) -> dict[int, list]:
    """Full sort per identity: float32 score descending, ties by lower clip index."""
    s = scores.astype(np.float32)
    out = {}
    for j in range(1, s.shape[1]):
        order = np.lexsort((clip_index, -s[:, j]))[:k]
        out[j] = list(zip(clip_index[order].tolist(), s[order, j].tolist()))
    return out


def _random_stream(seed: int, n: int = 300, c: int = 12):
    rng = np.random.default_rng(seed)
    clip_index = rng.permutation(10 * n)[:n].astype(np.int64)  # sparse global numbers
    scores = rng.random((n, c)).astype(np.float32)
    scores[:, ::3] = np.round(scores[:, ::3] * 3) / 3  # coarse columns: exact ties
    return rng, clip_index, scores


def _feed(acc: TopKPerIdentity, clip_index, scores, cuts) -> TopKPerIdentity:
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        acc.update(clip_index[lo:hi], scores[lo:hi])
    return acc


# ---------------------------------------------------------------------- write_submission


def test_write_submission_format(tmp_path):
    path = tmp_path / "sub.txt"
    write_submission(path, {10: ["b", "a.mp4", "b"], 2: ["c.mp4"], 5: []}, top_k=100)
    assert path.read_text() == "2 c.mp4\n5\n10 b.mp4 a.mp4\n"
    assert read_submission(path) == {2: ["c.mp4"], 5: [], 10: ["b.mp4", "a.mp4"]}


def test_write_submission_top_k_and_atomic_replace(tmp_path):
    path = tmp_path / "sub.txt"
    path.write_text("old\n")
    write_submission(path, {1: [f"c{i}" for i in range(150)]})
    assert read_submission(path)[1] == [f"c{i}.mp4" for i in range(100)]
    write_submission(path, {1: ["x", "y", "z"]}, top_k=2)
    assert path.read_text() == "1 x.mp4 y.mp4\n"
    with pytest.raises(ValueError, match="whitespace"):
        write_submission(path, {1: ["bad name"]})
    assert path.read_text() == "1 x.mp4 y.mp4\n"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub.txt"]  # no temp left


# ----------------------------------------------------------------------- TopKPerIdentity


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [1, 10, 100, 400])
def test_topk_equals_brute_force_for_any_batch_split(seed, k):
    rng, clip_index, scores = _random_stream(seed)
    expected = _brute_topk(clip_index, scores, k)
    n = len(clip_index)
    cuts = [0, *sorted(rng.choice(np.arange(1, n), 6, replace=False)), n]
    acc = _feed(TopKPerIdentity(scores.shape[1], k, chunk_bytes=1), clip_index, scores, cuts)
    assert acc.ranked() == expected
    perm = rng.permutation(n)  # another order, one batch
    shuffled = _feed(TopKPerIdentity(scores.shape[1], k), clip_index[perm], scores[perm], [0, n])
    assert shuffled.ranked() == expected


def test_merge_of_two_halves_equals_one_pass():
    _, clip_index, scores = _random_stream(7)
    one = _feed(TopKPerIdentity(12, 20), clip_index, scores, [0, 100, 300])
    left = _feed(TopKPerIdentity(12, 20), clip_index, scores, [0, 50, 150])
    right = _feed(TopKPerIdentity(12, 20), clip_index, scores, [150, 300])
    left.merge(right)
    assert left.ranked() == one.ranked() == _brute_topk(clip_index, scores, 20)
    with pytest.raises(ValueError, match="differ"):
        left.merge(TopKPerIdentity(12, 5))


def test_topk_few_clips_column_zero_and_names():
    acc = TopKPerIdentity(num_classes=3, k=100)
    assert acc.ranked() == {1: [], 2: []}
    scores = np.array([[9.0, 0.1, -0.0], [9.0, 0.7, 0.0]], np.float32)
    acc.update(np.array([4, 2]), scores)
    ranked = acc.ranked()
    assert 0 not in ranked
    assert ranked[1] == [(2, pytest.approx(0.7)), (4, pytest.approx(0.1))]
    assert ranked[2] == [(2, 0.0), (4, 0.0)]  # -0.0 == 0.0: tie, lower clip index first
    names = ["c0", "c1", "c2", "c3", "c4"]
    assert acc.ranked_clips(names) == {1: ["c2", "c4"], 2: ["c2", "c4"]}


def test_topk_rejects_bad_input():
    acc = TopKPerIdentity(num_classes=3, k=2)
    with pytest.raises(ValueError, match="want clip_index"):
        acc.update(np.arange(2), np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        acc.update(np.arange(2), np.full((2, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match="clip indices"):
        acc.update(np.array([-1]), np.zeros((1, 3), np.float32))
    acc.update(np.zeros(0, np.int64), np.zeros((0, 3), np.float32))  # empty batch: no-op
    assert acc.ranked() == {1: [], 2: []}


def test_topk_to_submission_round_trip(tmp_path):
    _, clip_index, scores = _random_stream(3, n=150, c=5)
    names = [f"IQIYI_VID_TEST_{i:07d}" for i in range(clip_index.max() + 1)]
    acc = _feed(TopKPerIdentity(5, 100), clip_index, scores, [0, 64, 150])
    write_submission(tmp_path / "sub.txt", acc.ranked_clips(names))
    expected = _brute_topk(clip_index, scores, 100)
    assert read_submission(tmp_path / "sub.txt") == {
        j: [names[c] + ".mp4" for c, _ in pairs] for j, pairs in expected.items()
    }


def test_streamed_submission_at_10035_identities_matches_and_stays_small(tmp_path):
    """write_submission from `iter_ranked_clips` (predict's path) writes the same file as
    from `ranked_clips`, and score_files reads it a line at a time: at 10,035 identities
    x 100 clips neither builds the 1M-name ranking (tracemalloc peak, numpy and Python)."""
    import tracemalloc

    from rayvid.core.metrics import score_files

    c, n = 10_035, 20_000
    rng = np.random.default_rng(1)
    acc = TopKPerIdentity(c)
    for lo in range(0, n, 1000):
        acc.update(np.arange(lo, lo + 1000), rng.random((1000, c), dtype=np.float32))
    names = [f"clip{i:06d}" for i in range(n)]
    whole, streamed = tmp_path / "whole.txt", tmp_path / "streamed.txt"
    write_submission(whole, acc.ranked_clips(names))
    tracemalloc.start()
    try:
        write_submission(streamed, acc.iter_ranked_clips(names))
        _, write_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        gt = tmp_path / "gt.txt"
        gt.write_text("".join(f"{i} {names[2 * i - 2]}.mp4 {names[2 * i - 1]}.mp4\n" for i in range(1, 9001)))
        got = score_files(gt, streamed, max_id=c)
        _, score_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert streamed.read_bytes() == whole.read_bytes()
    assert 0.0 <= got <= 1.0
    assert write_peak < 40 << 20 and score_peak < 40 << 20, (write_peak >> 20, score_peak >> 20)
