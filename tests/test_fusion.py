"""Unit tests of the numpy fusion core: hand-computed cases and properties."""

import numpy as np
import pytest

from rayvid.core import fusion
from rayvid.core.fusion import Weighting, offsets_from_counts


def _batch(rng, counts, dim=8, dtype=np.float16):
    offsets = offsets_from_counts(np.asarray(counts))
    n = int(offsets[-1])
    feat = rng.standard_normal((n, dim)).astype(dtype)
    det = rng.uniform(0.5, 1.0, n).astype(np.float32)
    quality = rng.uniform(-10, 120, n).astype(np.float32)
    return feat, det, quality, offsets


def test_band_weights_match_the_4th_place_bands():
    q = np.array([-5, 0, 19.9, 20, 29, 30, 39.9, 40, 250], np.float32)
    assert fusion.band_weights(q).tolist() == pytest.approx(
        [0, 0.2, 0.2, 0.3, 0.3, 0.6, 0.6, 1.0, 1.0])


def test_gate_mask_thresholds_are_inclusive():
    det = np.array([0.7, 0.69, 0.9, 0.9], np.float32)
    q = np.array([25, 30, 24.9, 25], np.float32)
    assert fusion.gate_mask(det, q).tolist() == [True, False, False, True]


def test_qff_hand_computed():
    # clip 0: faces q=50 (W=1), q=10 (W=0.2); clip 1: one face
    feat = np.array([[1, 0], [0, 1], [2, 2]], np.float16)
    det = np.array([1.0, 0.5, 0.9], np.float32)
    q = np.array([50, 10, 35], np.float32)
    fused, ok = fusion.qff(feat, det, q, np.array([0, 2, 3]))
    w0, w1 = 50 * 1.0 * 1.0, 10 * 0.5 * 0.2
    np.testing.assert_allclose(fused[0], [w0 / (w0 + w1), w1 / (w0 + w1)], rtol=1e-6)
    np.testing.assert_allclose(fused[1], [2, 2])
    assert ok.tolist() == [True, True]


def test_qff_empty_and_zero_weight_clips_are_defined():
    feat = np.array([[1, 3], [3, 5]], np.float16)
    det = np.ones(2, np.float32)
    q = np.array([-1, -2], np.float32)  # W(q < 0) = 0: total weight 0
    fused, ok = fusion.qff(feat, det, q, np.array([0, 0, 2, 2]))
    assert not np.isnan(fused).any()
    np.testing.assert_array_equal(fused[0], [0, 0])       # no face: zeros
    np.testing.assert_array_equal(fused[1], [2, 4])       # zero weight: plain mean
    np.testing.assert_array_equal(fused[2], [0, 0])
    assert ok.tolist() == [False, False, False]


def test_qff_is_bit_identical_to_exact_float32_conversion():
    rng = np.random.default_rng(1)
    feat, det, q, offsets = _batch(rng, rng.integers(0, 40, 300), dim=512)
    feat[0, :4] = np.array([6e-8, -6e-8, -0.0, 65504], np.float16)  # subnormals, max
    fused, _ = fusion.qff(feat, det, q, offsets)
    ref, _ = fusion.qff(feat.astype(np.float32), det, q, offsets)
    np.testing.assert_array_equal(fused, ref)
    np.testing.assert_array_equal(fusion.as_float32(feat), feat.astype(np.float32))


def test_qff_matches_a_float64_loop():
    rng = np.random.default_rng(2)
    feat, det, q, offsets = _batch(rng, rng.integers(1, 30, 50))
    w = fusion.fusion_weights(det, q, Weighting()).astype(np.float64)
    fused, ok = fusion.qff(feat, det, q, offsets)
    for c in np.flatnonzero(ok):
        a, b = offsets[c], offsets[c + 1]
        ref = (w[a:b, None] * feat[a:b]).sum(0) / w[a:b].sum()
        np.testing.assert_allclose(fused[c], ref, rtol=1e-5, atol=1e-6)


def test_qff_is_permutation_invariant_within_a_clip():
    rng = np.random.default_rng(3)
    feat, det, q, offsets = _batch(rng, [7, 5, 9])
    perm = np.concatenate([offsets[c] + rng.permutation(offsets[c + 1] - offsets[c])
                           for c in range(3)])
    a, _ = fusion.qff(feat, det, q, offsets)
    b, _ = fusion.qff(feat[perm], det[perm], q[perm], offsets)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("weighting", [Weighting(), Weighting("power", power=2.0)])
def test_a_zero_weight_face_changes_nothing(weighting):
    rng = np.random.default_rng(4)
    feat, det, q, offsets = _batch(rng, [4])
    q = np.maximum(q, 1.0)
    extra = rng.standard_normal((1, feat.shape[1])).astype(np.float16) * 100
    a, _ = fusion.qff(feat, det, q, offsets, weighting)
    b, _ = fusion.qff(np.vstack([feat, extra]), np.r_[det, 0.0].astype(np.float32),
                      np.r_[q, 50.0].astype(np.float32), np.array([0, 5]), weighting)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_power_one_is_plain_quality_times_det_and_mean_ignores_scores():
    rng = np.random.default_rng(5)
    feat, det, q, offsets = _batch(rng, [6, 3])
    q = np.abs(q) + 1
    w = fusion.fusion_weights(det, q, Weighting("power", power=1.0))
    np.testing.assert_allclose(w, q * det, rtol=1e-6)
    fused, _ = fusion.qff(feat, det, q, offsets, Weighting("mean"))
    np.testing.assert_allclose(fused[1], feat[6:9].astype(np.float32).mean(0), rtol=1e-5)


def test_qfda_is_reproducible_per_seed_and_fresh_otherwise():
    rng = np.random.default_rng(6)
    feat, det, q, offsets = _batch(rng, rng.integers(1, 20, 100))
    a = fusion.qfda(feat, det, q, offsets, np.random.default_rng(7))
    b = fusion.qfda(feat, det, q, offsets, np.random.default_rng(7))
    c = fusion.qfda(feat, det, q, offsets, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (100, feat.shape[1]) and a.dtype == np.float32


def test_qfda_single_face_clip_returns_that_face_and_output_is_a_convex_mix():
    rng = np.random.default_rng(9)
    feat, det, q, offsets = _batch(rng, [1, 12])
    q = np.abs(q) + 1
    out = fusion.qfda(feat, det, q, offsets, rng)
    np.testing.assert_array_equal(out[0], feat[0].astype(np.float32))
    lo, hi = feat[1:].astype(np.float32).min(0), feat[1:].astype(np.float32).max(0)
    assert np.all(out[1] >= lo - 1e-5) and np.all(out[1] <= hi + 1e-5)


def test_qfda_mix_frequencies_follow_the_configured_probabilities():
    # Clips of 5 distinct one-hot faces with equal weights: the number of distinct
    # faces used can't exceed k, and k=1 outputs are exactly one-hot.
    n = 4000
    feat = np.tile(np.eye(5, dtype=np.float16), (n, 1))
    offsets = offsets_from_counts(np.full(n, 5))
    ones = np.ones(5 * n, np.float32)
    out = fusion.qfda(feat, ones, ones, offsets, np.random.default_rng(10))
    single = np.isclose(out.max(axis=1), 1.0).mean()
    # P(one-hot) = P(k=1) + P(k=3 or 5 and all draws equal): 0.25 + 0.65/25 + 0.10/625
    assert single == pytest.approx(0.25 + 0.65 / 25 + 0.1 / 625, abs=0.03)


def test_qfda_rejects_empty_clips():
    with pytest.raises(ValueError, match="at least one face"):
        fusion.qfda(np.zeros((1, 4), np.float16), np.ones(1), np.ones(1), np.array([0, 1, 1]),
                    np.random.default_rng(0))


def test_compress_after_gate_keeps_counts_per_clip():
    det = np.array([0.9, 0.1, 0.9, 0.9, 0.2], np.float32)
    q = np.array([30, 30, 10, 40, 50], np.float32)
    mask = fusion.gate_mask(det, q)
    assert fusion.compress(mask, np.array([0, 2, 2, 5])).tolist() == [0, 1, 1, 2]


def test_vote_averages_face_scores_per_clip():
    scores = np.array([[0.2, 0.8], [0.6, 0.4], [1.0, 0.0]], np.float32)
    out = fusion.vote(scores, np.array([0, 2, 2, 3]))
    np.testing.assert_allclose(out, [[0.4, 0.6], [0, 0], [1.0, 0.0]], rtol=1e-6)


def test_weighting_validates_its_bands():
    with pytest.raises(ValueError):
        Weighting("bands", cuts=(0, 20), values=(0, 1))
    with pytest.raises(ValueError):
        Weighting("median")
