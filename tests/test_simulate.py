"""Tests of rayvid's release simulator (rayvid.release.simulator): layout, formats, determinism,
scale, and the properties that make the real release hard. All tiny (~15 s of CPU in all).

Files are read back only through rayvid.release.pickle_reader's restricted reader, never pickle.load.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rayvid.config import ConfigError
from rayvid.release.pickle_reader import iter_dict_items, load
from rayvid.release.simulator import SimParams, build_world, clip_latent, iter_clips, simulate_release

REPO = Path(__file__).resolve().parents[1]
PICKLES = ["face_train_v2.pickle", "face_val_v2.pickle", "face_test.pickle"] + [
    f"{m}_{s}.pickle" for m in ("head", "body", "audio") for s in ("train", "val", "test")]
OFFICIAL = sorted(PICKLES + ["train_gt.txt", "val_gt.txt"])
TINY = dict(ids=20, faces_per_clip=5)
NAME = re.compile(rb"IQIYI_VID_(TRAIN|VAL|TEST)_\d{7}")


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """Three tiny releases: seed 0 twice (determinism) and seed 1."""
    root = tmp_path_factory.mktemp("sim")
    out = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out[name] = (root / name, simulate_release(root / name, seed=seed, **TINY))
    return out


@pytest.fixture(scope="module")
def rel(releases):
    return releases["a"][0]


@pytest.fixture(scope="module")
def world():
    """A 300-identity world: latents only (cheap), for the statistical properties."""
    return build_world(300, 0, SimParams())


def _val_gt(path: Path) -> dict[int, list[str]]:
    out = {}
    for line in path.read_text().splitlines():
        tok = line.split()
        out[int(tok[0])] = tok[1:]
    return out


def test_layout_and_names(rel):
    assert sorted(p.name for p in rel.iterdir() if p.is_file()) == OFFICIAL
    assert sorted(p.name for p in (rel / "_simulator").iterdir()) == ["params.json", "test_gt.txt"]
    raw = (rel / "face_train_v2.pickle").read_bytes()
    assert raw[:3] == b"\x80\x02}" and b"cnumpy.core.multiarray\n_reconstruct\n" in raw
    for name in PICKLES:
        split = name.split("_")[1].split(".")[0].upper().encode()
        keys = [k for k, _ in iter_dict_items(rel / name)]
        assert keys and all(isinstance(k, bytes) and NAME.fullmatch(k) for k in keys)
        assert all(k.split(b"_")[2] == split for k in keys)


def test_gt_formats_and_test_key_hidden(rel):
    train = [line.split() for line in (rel / "train_gt.txt").read_text().splitlines()]
    assert all(len(t) == 2 and t[0].endswith(".mp4") and 1 <= int(t[1]) <= 20 for t in train)
    assert {int(t[1]) for t in train} == set(range(1, 21))  # every id has train clips
    head_train = {k.decode() + ".mp4" for k, _ in iter_dict_items(rel / "head_train.pickle")}
    assert {t[0] for t in train} == head_train
    for gt, pickle in ((rel / "val_gt.txt", "head_val.pickle"),
                       (rel / "_simulator" / "test_gt.txt", "head_test.pickle")):
        lines = _val_gt(gt)
        clips = [c for cs in lines.values() for c in cs]
        assert len(clips) == len(set(clips)) and all(c.endswith(".mp4") for c in clips)
        assert set(lines) <= set(range(1, 21))
        keys = {k.decode() + ".mp4" for k, _ in iter_dict_items(rel / pickle)}
        noise = keys - set(clips)
        assert set(clips) <= keys and 0.3 < len(noise) / len(keys) < 0.5
    official = (rel / "train_gt.txt").read_text() + (rel / "val_gt.txt").read_text()
    assert "TEST" not in official


def test_item_formats(rel):
    faces = load(rel / "face_val_v2.pickle")
    kinds = set()
    for clip in faces.values():
        frames = [int(item[0]) for item in clip]
        assert frames == sorted(frames)
        for frame, bbox, det, q, feat in clip:
            kinds.add(type(clip[0]))
            assert isinstance(frame, bytes) and all(type(v) is int for v in bbox)
            assert bbox[0] <= bbox[2] and bbox[1] <= bbox[3]
            assert type(det) is float and type(q) is float and 0 < det <= 1 and -30 <= q <= 250
            assert feat.dtype == np.float16 and feat.shape == (512,)
    assert kinds == {list, tuple}
    _, head = next(iter_dict_items(rel / "head_val.pickle"))
    assert len(head[0]) == 4 and head[0][3].shape == (512,)
    _, body = next(iter_dict_items(rel / "body_val.pickle"))
    assert len(body[0]) == 3 and body[0][2].dtype == np.float16
    _, audio = next(iter_dict_items(rel / "audio_val.pickle"))
    assert audio.dtype == np.float16 and audio.shape == (512,)


def test_deterministic_per_seed(releases):
    (a, sa), (b, _), (c, _) = releases["a"], releases["b"], releases["c"]
    for name in OFFICIAL + ["_simulator/test_gt.txt", "_simulator/params.json"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "face_train_v2.pickle").read_bytes() != (c / "face_train_v2.pickle").read_bytes()
    assert sa["clips"] > 0 and sa["faces"] > 0 and sa["bytes"] > 0
    assert set(sa["splits"]) == {"train", "val", "test"}


def test_params_json_records_everything(rel):
    meta = json.loads((rel / "_simulator" / "params.json").read_text())
    assert meta["seed"] == 0 and meta["ids"] == 20
    assert meta["dims"] == {"face": 512, "head": 512, "body": 512, "audio": 512}
    assert meta["params"]["faces_per_clip"] == 5
    assert set(meta["params"]) == set(SimParams().as_dict())
    assert meta["counts"]["val"]["noise"] > 0 and meta["counts"]["train"]["noise"] == 0


def test_unknown_parameter_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="faces_per_clipp"):
        simulate_release(tmp_path, 5, faces_per_clipp=3)


def test_counts_scale_with_ids(world):
    n = world.n_known
    train = world.clip_gid["train"]
    assert 5.0 < train.size / n < 7.0 and np.bincount(train).min() >= 1
    assert np.argmax(np.bincount(np.bincount(train))) == 2  # most common: 2 train clips
    for split in ("val", "test"):
        gids = world.clip_gid[split]
        assert abs((gids >= n).mean() - 0.4) < 0.01
        assert 0.6 < (gids < n).sum() / train.size < 0.9  # 40/30/30 of labelled clips
    assert (world.parent[:n] >= 0).sum() == 30 and (world.parent[n:] >= 0).sum() == 30


def test_faces_per_clip_and_missing_faces(world):
    lat = [clip_latent(world, "val", i) for i in range(1500)]
    counts = np.array([x.faces.n for x in lat if x.face_state == "faces"])
    assert 24 < counts.mean() < 35 and counts.max() > 150 and counts.min() >= 1
    states = [x.face_state for x in lat]
    assert 0.02 < states.count("absent") / len(lat) < 0.08 and states.count("empty") > 0
    faceless = [x for x in lat if x.face_state != "faces"]
    assert sum(x.heads.n for x in faceless) > 0  # no face, still heads (and bodies, audio)
    assert 0.75 < np.mean([x.audio for x in lat]) < 0.95
    costar = [x for x in lat if x.persons[1] >= 0 and x.faces.n > 10]
    share = np.mean([(x.faces.owner == 1).mean() for x in costar])
    assert costar and 0.05 < share < 0.45


def test_noise_identities_only_in_val_and_test(world):
    n = world.n_known
    assert world.clip_gid["train"].max() < n
    assert world.clip_gid["val"].max() >= n and world.clip_gid["test"].max() >= n


def test_lookalikes(world):
    mu = world.centres("face")
    kids = np.flatnonzero(world.parent >= 0)
    cos = np.sum(mu[kids] * mu[world.parent[kids]], axis=1)
    assert np.all((cos > 0.59) & (cos < 0.81))
    assert np.allclose(np.linalg.norm(mu, axis=1), 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def faces(world):
    """Faces of 200 val clips with their truth. Columns: quality, det, owner (0 person,
    1 co-star, -1 false), cosine to the true centre of the clip's person, norm, gid;
    plus the unit feature rows."""
    mu = world.centres("face")
    rows, unit = [], []
    for _, (key, items) in zip(range(200), iter_clips(world, "face", "val")):
        lat = clip_latent(world, "val", int(key.rsplit(b"_", 1)[1]) - 1, "faces")
        if not items:
            continue
        feat = np.stack([it[4] for it in items]).astype(np.float32)
        norm = np.linalg.norm(feat, axis=1)
        unit.append(feat / norm[:, None])
        rows.append(np.column_stack([[it[3] for it in items], [it[2] for it in items],
                                     lat.faces.owner, unit[-1] @ mu[lat.persons[0]], norm,
                                     np.full(len(items), lat.persons[0])]))
    return np.concatenate(rows), np.concatenate(unit)


def test_identity_grows_with_quality(faces):
    table = faces[0]
    q, owner, cos, norm = table[:, 0], table[:, 2], table[:, 3], table[:, 4]
    mine = owner == 0
    bands = [(-30, 0), (0, 20), (20, 40), (40, 80), (80, 251)]
    mean_cos = [cos[mine & (q >= lo) & (q < hi)].mean() for lo, hi in bands]
    mean_norm = [norm[mine & (q >= lo) & (q < hi)].mean() for lo, hi in bands]
    assert all(a < b for a, b in zip(mean_cos, mean_cos[1:])), mean_cos
    assert all(a < b for a, b in zip(mean_norm, mean_norm[1:])), mean_norm
    assert mean_cos[0] < 0.15 and mean_cos[-1] > 0.55
    assert 5 < mean_norm[0] and mean_norm[-1] < 40  # not normalised: norms are tens


def test_low_quality_faces_drift_to_a_common_region(faces):
    """Low-quality faces of different people look alike; good ones do not."""
    table, unit = faces
    q, gid = table[:, 0], table[:, 5]
    lo, hi = (q < 0) & (table[:, 2] >= 0), q > 80
    other = gid[:, None] != gid[None, :]
    sim_lo = (unit[lo] @ unit[lo].T)[other[lo][:, lo]].mean()
    sim_hi = (unit[hi] @ unit[hi].T)[other[hi][:, hi]].mean()
    assert sim_lo > 0.4 and sim_hi < 0.15


def test_false_detections(faces):
    det, owner, cos = faces[0][:, 1], faces[0][:, 2], faces[0][:, 3]
    false = owner == -1
    assert 0.02 < false.mean() < 0.07
    assert det[false].max() <= 0.85 and det[false].min() >= 0.2
    assert (det[~false] >= 0.9).mean() > 0.85
    assert abs(cos[false].mean()) < 0.1 < cos[owner == 0].mean()


@pytest.mark.slow
@pytest.mark.soak
def test_300_ids_make_a_release_of_the_documented_size(tmp_path):
    """300 ids, 2 faces per clip: the documented size (speed is a benchmark's business,
    not a test's: the test machine is shared)."""
    summary = simulate_release(tmp_path / "r", 300, seed=3, faces_per_clip=2)
    assert summary["clips"] > 5000
    assert summary["faces"] > summary["clips"]


def test_cli(tmp_path):
    out = tmp_path / "cli"
    res = subprocess.run([sys.executable, str(REPO / "jobs" / "simulate.py"), "--out", str(out),
                          "--ids", "5", "--faces-per-clip", "3", "--seed", "2"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "train:" in res.stderr and "test:" in res.stderr and '"faces"' in res.stdout
    assert (out / "face_test.pickle").exists() and (out / "_simulator" / "test_gt.txt").exists()
