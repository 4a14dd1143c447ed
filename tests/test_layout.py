"""Release discovery, labels and per-clip validation (rayvid.release.layout, rayvid.release.clip_values).

Fast unit tests on hand-made values; the end-to-end conversion is in test_prepare.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from rayvid.core.formats import GroundTruthError
from rayvid.release.layout import (BadClipError, MissingFilesError, Release, clip_name, parse_audio,
                                   parse_detections)

OFFICIAL = [
    "face_train_v2.pickle", "head_train.pickle", "body_train.pickle", "audio_train.pickle",
    "face_val_v2.pickle", "head_val.pickle", "body_val.pickle", "audio_val.pickle",
    "train_gt.txt", "val_gt.txt",
]
TEST_FILES = ["face_test.pickle", "head_test.pickle", "body_test.pickle", "audio_test.pickle"]


def touch(root, names):
    for n in names:
        (root / n).write_bytes(b"")
    return root


def feat(rng, dim=512, dtype=np.float16):
    return rng.standard_normal(dim).astype(dtype)


def face(rng, frame=b"12", bbox=(1, 2, 30, 40), det=0.99, quality=35.5, f=None):
    return [frame, list(bbox), det, quality, feat(rng) if f is None else f]


# --- discovery -------------------------------------------------------------------------

def test_discover_finds_every_split(tmp_path):
    r = Release.discover(touch(tmp_path, OFFICIAL + TEST_FILES))
    assert r.splits == ("train", "val", "test")
    assert r.pickles["test"]["face"].name == "face_test.pickle"
    assert r.pickles["val"]["face"].name == "face_val_v2.pickle"
    assert r.gt["val"].name == "val_gt.txt"


def test_discover_test_split_is_optional_and_accepts_v2(tmp_path):
    assert Release.discover(touch(tmp_path, OFFICIAL)).splits == ("train", "val")
    names = ["face_test_v2.pickle"] + TEST_FILES[1:]
    r = Release.discover(touch(tmp_path, names))
    assert r.pickles["test"]["face"].name == "face_test_v2.pickle"
    touch(tmp_path, ["face_test.pickle"])
    with pytest.raises(MissingFilesError, match="both face_test.pickle and face_test_v2.pickle"):
        Release.discover(tmp_path)


def test_discover_lists_every_missing_file(tmp_path):
    touch(tmp_path, [n for n in OFFICIAL if n not in ("head_val.pickle", "val_gt.txt")])
    touch(tmp_path, ["face_test.pickle"])  # a partial test split is an error too
    with pytest.raises(MissingFilesError) as e:
        Release.discover(tmp_path)
    msg = str(e.value)
    for name in ("head_val.pickle", "val_gt.txt", "head_test.pickle", "audio_test.pickle"):
        assert name in msg
    assert "face_val_v2.pickle" not in msg
    with pytest.raises(MissingFilesError, match="does not exist"):
        Release.discover(tmp_path / "nope")


# --- gt (parsed by rayvid.core.formats; the error cases are in test_metrics.py) ----------

def _release_with_gt(tmp_path, train: str | bytes, val: str) -> Release:
    touch(tmp_path, OFFICIAL)
    (tmp_path / "train_gt.txt").write_bytes(train if isinstance(train, bytes) else train.encode())
    (tmp_path / "val_gt.txt").write_text(val)
    return Release.discover(tmp_path)


def test_labels_are_keyed_like_the_pickles(tmp_path):
    r = _release_with_gt(
        tmp_path, "IQIYI_VID_TRAIN_0000001.mp4 7\n\nIQIYI_VID_TRAIN_0000002.mp4 10034\r\n",
        "3 IQIYI_VID_VAL_0000002.mp4 IQIYI_VID_VAL_0000009.mp4\n1 IQIYI_VID_VAL_0000001.mp4\n")
    assert r.labels("train") == {"IQIYI_VID_TRAIN_0000001": 7, "IQIYI_VID_TRAIN_0000002": 10034}
    assert r.labels("val") == {"IQIYI_VID_VAL_0000002": 3, "IQIYI_VID_VAL_0000009": 3,
                               "IQIYI_VID_VAL_0000001": 1}
    assert r.labels("test") == {}


@pytest.mark.parametrize("split,train,val,match", [
    ("train", "A.mp4 1\nB.mp4 x\n", "1 C.mp4\n", r"train_gt.txt:2: id 'x'"),
    ("train", b"\xff\xfe\x00bad", "1 C.mp4\n", r"train_gt.txt: not UTF-8"),
    ("val", "A.mp4 1\n", "1 A.mp4\n1 B.mp4\n", r"val_gt.txt:2: id 1 listed twice"),
    ("val", "A.mp4 1\n", "2 A.mp4 B.avi\n", r"val_gt.txt:1: 'B.avi' is not"),
])
def test_gt_errors_name_file_and_line(tmp_path, split, train, val, match):
    r = _release_with_gt(tmp_path, train, val)
    with pytest.raises(GroundTruthError, match=match):
        r.labels(split)


def test_num_ids_bounds_labels(tmp_path):
    r = _release_with_gt(tmp_path, "A.mp4 301\n", "1 B.mp4\n")
    assert r.labels("train", num_ids=301) == {"A": 301}
    with pytest.raises(GroundTruthError, match="1..300"):
        r.labels("train", num_ids=300)


# --- one clip's value --------------------------------------------------------------------

def test_faces_convert_bit_exact_from_lists_and_tuples():
    rng = np.random.default_rng(0)
    special = np.array([0.0, -0.0, 6.1e-5, 6e-8, 65504, -65504], np.float16)  # subnormal, max
    f0 = feat(rng)
    f0[: special.size] = special
    value = [face(rng, b"3", (1, 2, 3, 4), 0.5, -12.25, f0),
             tuple(face(rng, b"10", np.array([5, 6, 7, 8]), 1, 250))]
    out = parse_detections(value, "face", file="f.pickle", clip="C", feat_dim=512)
    assert out["frame"].tolist() == [3, 10] and out["frame"].dtype == np.int32
    assert out["bbox"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]] and out["bbox"].dtype == np.int32
    assert out["det"].tolist() == [0.5, 1.0] and out["det"].dtype == np.float32
    assert out["quality"].tolist() == [-12.25, 250.0]
    assert out["feat"].dtype == np.float16 and out["feat"].shape == (2, 512)
    expected = np.stack([value[0][4], value[1][4]])
    assert np.array_equal(out["feat"].view(np.uint16), expected.view(np.uint16))


def test_empty_face_list():
    out = parse_detections([], "face", file="f", clip="C", feat_dim=512)
    assert out["feat"].shape == (0, 512) and out["bbox"].shape == (0, 4) and len(out["frame"]) == 0


def test_head_and_body_take_their_dim_and_cast_to_float16():
    rng = np.random.default_rng(1)
    heads = [[b"1", [0, 0, 9, 9], 0.8, feat(rng, 64, np.float32)],
             (b"2", (0, 0, 9, 9), 0.7, feat(rng, 64, np.float32))]
    out = parse_detections(heads, "head", file="h", clip="C", feat_dim=None)
    assert out["feat"].dtype == np.float16 and out["feat"].shape == (2, 64)
    assert set(out) == {"frame", "bbox", "det", "feat"}
    bodies = [[b"1", [0, 0, 9, 9], feat(rng, 32)]]
    out = parse_detections(bodies, "body", file="b", clip="C", feat_dim=32)
    assert set(out) == {"frame", "bbox", "feat"}


@pytest.mark.parametrize("mutate,field,reason", [
    (lambda v, r: v[1].__setitem__(4, feat(r, 511)), "face[1].feat", r"expected shape \(512,\)"),
    (lambda v, r: v[1].__setitem__(4, feat(r, 512, np.float32)), "face[1].feat", "float16"),
    (lambda v, r: v[0][4].__setitem__(7, np.nan), "face[0].feat", "NaN or inf"),
    (lambda v, r: v[1][4].__setitem__(0, np.inf), "face[1].feat", "NaN or inf"),
    (lambda v, r: v[1].__setitem__(1, [1, 2, 3]), "face[1].bbox", "not 4 integers"),
    (lambda v, r: v[0].__setitem__(1, [1, 2, 3, "4"]), "face[0].bbox", "not 4 integers"),
    (lambda v, r: v[1].__setitem__(1, [1.5, 2, 3, 4]), "face[1].bbox", "not 4 integers"),
    (lambda v, r: v[1].__setitem__(0, b"1x"), "face[1].frame", "not an int frame string"),
    (lambda v, r: v[0].__setitem__(0, 1.0), "face[0].frame", "not an int frame string"),
    (lambda v, r: v[0].__setitem__(2, float("nan")), "face[0].det", "not a finite number"),
    (lambda v, r: v[1].__setitem__(3, None), "face[1].quality", "not a finite number"),
    (lambda v, r: v[1].pop(), "face[1]", r"expected \(frame, bbox, det, quality, feat\)"),
    (lambda v, r: v.append("junk"), "face[2]", "expected"),
])
def test_bad_face_names_file_clip_and_field(mutate, field, reason):
    rng = np.random.default_rng(2)
    value = [face(rng), face(rng)]
    mutate(value, rng)
    with pytest.raises(BadClipError, match=reason) as e:
        parse_detections(value, "face", file="/r/face_val_v2.pickle", clip="IQIYI_VID_VAL_0000007",
                         feat_dim=512)
    assert (e.value.file, e.value.clip, e.value.field) == ("/r/face_val_v2.pickle",
                                                           "IQIYI_VID_VAL_0000007", field)
    assert str(e.value).startswith(f"/r/face_val_v2.pickle: clip IQIYI_VID_VAL_0000007: {field}:")


def test_bad_values_and_keys():
    with pytest.raises(BadClipError, match="expected a list of detections"):
        parse_detections(None, "head", file="h", clip="C", feat_dim=None)
    rng = np.random.default_rng(3)
    mixed = [[b"1", [0, 0, 1, 1], feat(rng, 8)], [b"2", [0, 0, 1, 1], feat(rng, 9)]]
    with pytest.raises(BadClipError, match=r"body\[1\]\.feat: expected shape \(8,\)"):
        parse_detections(mixed, "body", file="b", clip="C", feat_dim=None)
    assert clip_name(b"IQIYI_VID_TEST_0000001", "f") == "IQIYI_VID_TEST_0000001"
    with pytest.raises(BadClipError, match="key"):
        clip_name(b"\xff\xfe", "f")
    with pytest.raises(BadClipError, match="key"):
        clip_name(7, "f")


def test_audio():
    rng = np.random.default_rng(4)
    a = feat(rng, 128)
    assert np.array_equal(parse_audio(a, file="a", clip="C", feat_dim=128).view(np.uint16),
                          a.view(np.uint16))
    for bad, match in [(feat(rng, 127), r"expected shape \(128,\)"),
                       (np.full(128, np.nan, np.float16), "NaN"),
                       (np.zeros((1, 128), np.float16), "1-d float"),
                       ([0.0] * 128, "1-d float")]:
        with pytest.raises(BadClipError, match=match):
            parse_audio(bad, file="audio_val.pickle", clip="C", feat_dim=128)
