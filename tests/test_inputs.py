"""Model inputs by kind (`rayvid.core.inputs`), checked against per-clip Python loops written
here from the docstring's definitions, and the Ray Data transform against it on real rows."""

from __future__ import annotations

import numpy as np
import pytest

from rayvid.core import fusion, inputs
from rayvid.core.inputs import AudioParts, BodyParts, ClipParts, FaceParts, HeadParts, InputSpec

D, HD, BD, AD = 512, 8, 6, 4


def _parts(rng: np.random.Generator, faces=(3, 0, 7, 1), heads=(2, 1, 0, 0),
           bodies=(1, 0, 0, 2), audio=(True, True, False, False)) -> ClipParts:
    def flat(counts, dim):
        offsets = fusion.offsets_from_counts(np.asarray(counts))
        return rng.standard_normal((int(offsets[-1]), dim)).astype(np.float16), offsets

    feat, off = flat(faces, D)
    f = FaceParts(feat, rng.uniform(0.5, 1, len(feat)).astype(np.float32),
                  rng.uniform(0, 80, len(feat)).astype(np.float32), off)
    hfeat, hoff = flat(heads, HD)
    h = HeadParts(hfeat, rng.uniform(0.1, 1, len(hfeat)).astype(np.float32), hoff)
    b = BodyParts(*flat(bodies, BD))
    a = AudioParts(rng.standard_normal((len(faces), AD)).astype(np.float16), np.array(audio))
    return ClipParts(f, h, b, a)


def _unit(v):
    v = np.asarray(v, np.float64)
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


SPEC = InputSpec(("clip_vector", "face_set", "multimodal"), face_set_size=4, dims=(HD, BD, AD))


def test_eval_inputs_match_a_per_clip_loop() -> None:
    parts = _parts(np.random.default_rng(0))
    out = inputs.build(parts, SPEC)
    x, ok = fusion.qff(*parts.faces, SPEC.weighting)
    np.testing.assert_array_equal(out["x"], x)
    np.testing.assert_array_equal(out["ok"], ok)
    f, h, b, a = parts.faces, parts.heads, parts.bodies, parts.audio
    w = fusion.fusion_weights(f.det, f.quality, SPEC.weighting)
    for c in range(parts.n):
        lo, hi = f.offsets[c], f.offsets[c + 1]
        # face set: the K best by qFF weight, best first; unit feature, quality/100, det
        order = sorted(range(lo, hi), key=lambda i: (-w[i], i))[:4]
        assert out["face_mask"][c].tolist() == [j < len(order) for j in range(4)]
        for slot, i in enumerate(order):
            np.testing.assert_allclose(out["faces"][c, slot, :D], _unit(f.feat[i]), atol=2e-3)
            np.testing.assert_allclose(out["faces"][c, slot, D:], [f.quality[i] / 100, f.det[i]],
                                       rtol=2e-3)
        assert not out["faces"][c, len(order):].any()
        # multimodal: unit face qFF, det-weighted head mean, body mean, audio; mask
        hl, hh = h.offsets[c], h.offsets[c + 1]
        bl, bh = b.offsets[c], b.offsets[c + 1]
        head = _unit(np.average(h.feat[hl:hh].astype(np.float64), axis=0, weights=h.det[hl:hh])) \
            if hh > hl else np.zeros(HD)
        body = _unit(b.feat[bl:bh].astype(np.float64).mean(axis=0)) if bh > bl else np.zeros(BD)
        audio = _unit(a.feat[c]) if a.present[c] else np.zeros(AD)
        want = np.concatenate([_unit(x[c]) if hi > lo else np.zeros(D), head, body, audio])
        np.testing.assert_allclose(out["mm"][c], want, atol=1e-5)
        assert out["mm_mask"][c].tolist() == [hi > lo, hh > hl, bh > bl, bool(a.present[c])]


def test_training_face_sets_are_fresh_random_subsets_of_the_clip() -> None:
    parts = _parts(np.random.default_rng(1), faces=(9, 2))
    spec = InputSpec(("face_set",), face_set_size=4)
    rng = np.random.default_rng(0)
    draws = [inputs.build(parts, spec, rng)["faces"] for _ in range(20)]
    own = _unit_rows_f16(parts.faces.feat[:9])
    for d in draws:  # every face of clip 0 is one of its own, no face twice
        got = d[0, :, :D].astype(np.float32)
        idx = [int(np.argmin(np.abs(own - g).sum(1))) for g in got]
        assert len(set(idx)) == 4
        assert np.abs(own[idx] - got).max() < 2e-3
    assert len({d[0].tobytes() for d in draws}) > 10  # fresh every call
    assert all(d[1, 2:].sum() == 0 for d in draws)  # a 2-face clip: 2 slots, padding zero


def _unit_rows_f16(feat):
    return inputs.unit_rows(feat.astype(np.float32)).astype(np.float16).astype(np.float32)


def test_modalities_switched_off_or_empty_are_masked_and_zero() -> None:
    parts = _parts(np.random.default_rng(2))
    spec = InputSpec(("multimodal",), modalities=("head", "audio"), dims=(HD, BD, AD))
    out = inputs.build(parts, spec)
    assert not out["mm_mask"][:, [0, 2]].any()
    assert not out["mm"][:, :D].any() and not out["mm"][:, D + HD:D + HD + BD].any()
    # an all-zero vector is absent, not a feature
    zero_audio = ClipParts(parts.faces, parts.heads, parts.bodies,
                           AudioParts(np.zeros_like(parts.audio.feat), parts.audio.present))
    assert not inputs.build(zero_audio, SPEC)["mm_mask"][:, 3].any()


def test_modality_dropout_never_masks_everything() -> None:
    parts = _parts(np.random.default_rng(3), faces=(2,) * 400, heads=(1,) * 400,
                   bodies=(0,) * 400, audio=(False,) * 400)
    spec = InputSpec(("multimodal",), modality_dropout=0.5, dims=(HD, BD, AD))
    out = inputs.build(parts, spec, np.random.default_rng(0))
    mask = out["mm_mask"]
    assert mask.any(axis=1).all()
    assert 0.3 < mask[:, 0].mean() < 0.9 and 0.3 < mask[:, 1].mean() < 0.9
    assert inputs.build(parts, spec)["mm_mask"][:, :2].all()  # evaluation: no dropout


def test_training_face_vector_is_a_qfda_draw_and_faceless_clips_keep_their_other_modalities() -> None:
    parts = _parts(np.random.default_rng(4))
    spec = InputSpec(("clip_vector", "multimodal"), dims=(HD, BD, AD))
    qfda = dict(n_draws=5, sizes=(1,), mix=(1.0,))  # one raw face per draw
    out = inputs.build(parts, spec, np.random.default_rng(0), qfda)
    f = parts.faces
    for c in (0, 2, 3):
        faces = f.feat[f.offsets[c]:f.offsets[c + 1]].astype(np.float32)
        assert np.abs(faces - out["x"][c]).sum(1).min() < 1e-3  # one of its own faces
    assert not out["x"][1].any() and not out["mm_mask"][1, 0]
    assert out["mm_mask"][1, 1]  # clip 1: no face, one head
    keep = inputs.trainable("multimodal", parts, spec)
    assert keep.tolist() == [True, True, True, True]
    assert inputs.trainable("clip_vector", parts, spec).tolist() == [True, False, True, True]


def test_take_keeps_every_modality_aligned() -> None:
    parts = _parts(np.random.default_rng(5))
    sub = parts.take(np.array([False, True, True, False]))
    whole = inputs.build(parts, SPEC)
    part = inputs.build(sub, SPEC)
    for k in ("x", "faces", "face_mask", "mm", "mm_mask"):
        np.testing.assert_array_equal(part[k], whole[k][1:3])
    empty = inputs.build(parts.take(np.zeros(4, bool)), SPEC)
    assert empty["mm"].shape == (0, SPEC.mm_dim) and empty["faces"].shape == (0, 4, D + 2)


def test_usable_per_kind() -> None:
    out = inputs.build(_parts(np.random.default_rng(6)), SPEC)
    assert inputs.usable("clip_vector", out).tolist() == [True, False, True, True]
    assert inputs.usable("face_set", out).tolist() == [True, False, True, True]
    assert inputs.usable("multimodal", out).tolist() == [True, True, True, True]
    with pytest.raises(ValueError, match="unknown input kind"):
        inputs.usable("video", out)


@pytest.mark.parametrize("kwargs, message", [
    ({"kinds": ("video",)}, "input kinds"), ({"kinds": ()}, "input kinds"),
    ({"face_set_size": 0}, "face_set_size"), ({"modalities": ("smell",)}, "modalities"),
    ({"modality_dropout": 1.0}, "modality_dropout"),
])
def test_bad_specs_are_refused(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        InputSpec(**kwargs)


def test_wrong_feature_length_names_the_modality() -> None:
    parts = _parts(np.random.default_rng(7))
    with pytest.raises(ValueError, match="head features have 8 values, expected 512"):
        inputs.build(parts, InputSpec(("multimodal",)))


def test_the_ray_data_transform_builds_the_same_inputs_from_parquet_rows(sim_dataset) -> None:
    """ClipTransform on real Parquet rows vs ClipParts assembled here from `to_pylist` rows
    (an independent read of the blobs): the same inputs, bit for bit."""
    import glob

    import pyarrow.parquet as pq

    from rayvid.data.pipeline import ClipTransform
    from rayvid.release.schema import read_meta

    meta = read_meta(sim_dataset)
    dims = tuple(int(meta["dims"][m]) for m in ("head", "body", "audio"))
    table = pq.read_table(sorted(glob.glob(f"{sim_dataset}/val/*.parquet"))[0])
    kinds = ("clip_vector", "face_set", "multimodal")
    out = ClipTransform(kinds=kinds, dims=dims, face_set_size=8)(table)
    rows = table.to_pylist()

    def blob(b, dim):
        return np.frombuffer(b, "<f2").reshape(-1, dim)

    def flat(key, dim):
        arrs = [blob(r[key], dim) for r in rows]
        return np.concatenate(arrs), fusion.offsets_from_counts(np.array([len(a) for a in arrs]))

    ff, fo = flat("face_feat", 512)
    hf, ho = flat("head_feat", dims[0])
    bf, bo = flat("body_feat", dims[1])
    parts = ClipParts(
        FaceParts(ff, np.concatenate([r["face_det"] for r in rows]).astype(np.float32),
                  np.concatenate([r["face_quality"] for r in rows]).astype(np.float32), fo),
        HeadParts(hf, np.concatenate([r["head_det"] for r in rows]).astype(np.float32), ho),
        BodyParts(bf, bo),
        AudioParts(np.stack([blob(r["audio_feat"], dims[2])[0] if r["audio_feat"]
                             else np.zeros(dims[2], np.float16) for r in rows]),
                   np.array([bool(r["audio_feat"]) for r in rows])))
    want = inputs.build(parts, InputSpec(kinds, face_set_size=8, dims=dims))
    for k in ("x", "ok", "faces", "face_mask", "mm", "mm_mask"):
        np.testing.assert_array_equal(out[k], want[k], err_msg=k)
    assert out["mm_mask"][:, 1:].any()  # the simulated release has heads, bodies, audio


def test_answerable_needs_a_positive_qff_weight_for_clip_vectors_any_modality_for_multimodal() -> None:
    parts = _parts(np.random.default_rng(8))
    # clip 3's one face gets quality 0: qFF's weight is 0 (plain-mean fallback, ok False)
    parts.faces.quality[parts.faces.offsets[3]:parts.faces.offsets[4]] = 0.0
    out = inputs.build(parts, SPEC)
    assert out["ok"].tolist() == [True, False, True, False]
    assert inputs.answerable(["clip_vector"], out).tolist() == [True, False, True, False]
    assert inputs.answerable(["clip_vector", "multimodal"], out).tolist() == [True] * 4
    assert inputs.answerable(["face_set"], out).tolist() == [True, False, True, True]
