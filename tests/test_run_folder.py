"""Tests of rayvid.model.run_folder: `ensemble.json` and `serving.json` read, written and
rejected, and the one weighted mean of member scores. Fast: no Ray, no torch.

    pytest tests/test_run_folder.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rayvid.core.fusion import Weighting
from rayvid.model.run_folder import (ENSEMBLE_FILE, SERVING_FILE, EnsembleSpec, Member,
                                     RunFolderError, ServingSpec, read_ensemble, read_serving,
                                     weighted_mean, write_ensemble, write_serving)

ROOT = Path(__file__).resolve().parents[1]

# An ensemble.json as training wrote it before this module existed (json.dumps of a dict
# built in rayvid.train.kfold), prototype member included: the format to stay readable.
LEGACY = {
    "members": [
        {"path": "folds/0/M5/best", "weight": 1.0, "fold": 0, "arch": "M5", "fold_map": 0.81},
        {"path": "folds/1/M5/best", "weight": 1.0, "fold": 1, "arch": "M5", "fold_map": None},
        {"path": "prototype", "arch": "prototype", "weight": 2.0},
    ],
    "weighting": {"kind": "bands", "cuts": [0.0, 20.0, 30.0, 40.0],
                  "values": [0.0, 0.2, 0.3, 0.6, 1.0], "power": 1.0},
    "num_classes": 41,
}


def _write(run: Path, name: str, obj) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / name).write_text(obj if isinstance(obj, str) else json.dumps(obj, indent=2))


def _listing(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir())


# ------------------------------------------------------------------ ensemble.json


def test_reads_a_legacy_ensemble_json_and_writes_it_back_unchanged(tmp_path):
    _write(tmp_path / "a", ENSEMBLE_FILE, LEGACY)
    spec = read_ensemble(tmp_path / "a")
    assert spec.weights == [1.0, 1.0, 2.0] and spec.total_weight == 4.0
    assert [m.arch for m in spec.members] == ["M5", "M5", "prototype"]
    assert spec.members[0] == Member("folds/0/M5/best", 1.0, 0, "M5", 0.81)
    assert spec.members[1].fold_map is None and spec.members[2].fold is None
    assert spec.weighting == Weighting() and spec.num_classes == 41
    assert spec.member_dirs(tmp_path / "a") == [tmp_path / "a" / "folds/0/M5/best",
                                                tmp_path / "a" / "folds/1/M5/best",
                                                tmp_path / "a" / "prototype"]
    assert write_ensemble(tmp_path / "b", spec) == tmp_path / "b" / ENSEMBLE_FILE
    assert json.loads((tmp_path / "b" / ENSEMBLE_FILE).read_text()) == LEGACY
    assert read_ensemble(tmp_path / "b") == spec
    assert _listing(tmp_path / "b") == [ENSEMBLE_FILE]  # no temporary left behind


def test_oldest_runs_lack_weighting_weights_and_num_classes(tmp_path):
    _write(tmp_path, ENSEMBLE_FILE, {"members": [{"path": "m0"}, {"path": "/abs/m1"}],
                                     "note": "kept"})
    spec = read_ensemble(tmp_path)
    assert spec.weights == [1.0, 1.0] and spec.weighting is None and spec.num_classes is None
    assert spec.member_dirs(tmp_path) == [tmp_path / "m0", Path("/abs/m1")]
    assert spec.to_json() == {"members": [{"path": "m0", "weight": 1.0},
                                          {"path": "/abs/m1", "weight": 1.0}], "note": "kept"}


def test_training_writes_the_keys_runs_have_always_had(tmp_path):
    from rayvid.train.config import TrainJobConfig
    from rayvid.train.kfold import write_ensemble as train_write_ensemble

    results = [{"best": str(tmp_path / "folds/0/M5/best"), "fold": 0, "arch": "M5",
                "best_map": 0.81},
               {"best": str(tmp_path / "folds/1/M5/best"), "fold": 1, "arch": "M5",
                "best_map": None}]
    cfg = TrainJobConfig.model_validate({"model": {"prototype_weight": 1.0},
                                         "openset": {"noise": "none"}})
    path = train_write_ensemble(cfg, tmp_path, results, 41, tmp_path / "prototype")
    assert path == tmp_path / ENSEMBLE_FILE
    written = json.loads(path.read_text())
    # the legacy keys, unchanged (prototype: weight 1.0 x 2 MLP members), plus the inputs
    # the members read (clip vectors only: what a file without the key means) and the
    # clips they trained on (issue 13)
    assert written.pop("inputs")["kinds"] == ["clip_vector"]
    assert written.pop("trained_on") == {"splits": ["train"], "openset": "none"}
    assert written == LEGACY
    assert read_ensemble(tmp_path).input_spec().kinds == ("clip_vector",)


def test_inputs_of_a_mixed_run_round_trip_and_bad_inputs_name_the_field(tmp_path):
    from rayvid.train.config import TrainJobConfig
    from rayvid.train.kfold import write_ensemble as train_write_ensemble

    results = [{"best": str(tmp_path / f"folds/0/{a}/best"), "fold": 0, "arch": a,
                "best_map": 0.5} for a in ("M5", "attention", "multimodal")]
    train_write_ensemble(TrainJobConfig(), tmp_path, results, 41, None, (256, 128, 64))
    spec = read_ensemble(tmp_path).input_spec()
    assert spec.kinds == ("clip_vector", "face_set", "multimodal")
    assert spec.dims == (256, 128, 64) and spec.mm_dim == 512 + 256 + 128 + 64
    bad = {**LEGACY, "inputs": {"kinds": ["clip_vector", "video"]}}
    _write(tmp_path / "bad", ENSEMBLE_FILE, bad)
    with pytest.raises(RunFolderError, match=r"ensemble.json: inputs: .*video"):
        read_ensemble(tmp_path / "bad")


@pytest.mark.parametrize("text, message", [
    ("{", "not valid JSON"),
    ("[]", "expected a JSON object, got list"),
    ({}, "members: missing"),
    ({"members": {}}, "members: expected list, got dict"),
    ({"members": []}, "members: needs at least one member"),
    ({"members": ["m0"]}, r"members\[0\]: expected an object, got str"),
    ({"members": [{"path": "m0"}, {"weight": 1}]}, r"members\[1\]\.path: missing"),
    ({"members": [{"path": 3}]}, r"members\[0\]\.path: expected str, got int"),
    ({"members": [{"path": ""}]}, r"members\[0\]\.path: empty"),
    ({"members": [{"path": "m", "weight": "1"}]}, r"members\[0\]\.weight: expected a number"),
    ({"members": [{"path": "m", "weight": -1}]}, r"members\[0\]\.weight: expected a number >= 0"),
    ('{"members": [{"path": "m", "weight": NaN}]}', r"members\[0\]\.weight"),
    ({"members": [{"path": "m", "weight": 0}]}, r"weights sum to 0"),
    ({"members": [{"path": "m", "wieght": 2}]}, r"members\[0\]: unknown key\(s\) wieght"),
    ({"members": [{"path": "m", "fold": "0"}]}, r"members\[0\]\.fold: expected an integer"),
    ({"members": [{"path": "m"}], "weighting": {"kind": "band"}}, "weighting: weighting kind"),
    ({"members": [{"path": "m"}], "weighting": {"cut": [1]}}, "weighting: unknown weighting key"),
    ({"members": [{"path": "m"}], "weighting": [1]}, "weighting: expected dict"),
    ({"members": [{"path": "m"}], "num_classes": "41"}, "num_classes: expected an integer"),
])
def test_malformed_ensemble_json_names_the_file_and_the_field(tmp_path, text, message):
    _write(tmp_path, ENSEMBLE_FILE, text)
    with pytest.raises(RunFolderError, match=message) as err:
        read_ensemble(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / ENSEMBLE_FILE}: ")


def test_missing_ensemble_json(tmp_path):
    with pytest.raises(RunFolderError, match="has no ensemble.json .is training finished"):
        read_ensemble(tmp_path)


def test_a_spec_without_members_or_weight_is_refused():
    with pytest.raises(RunFolderError, match="at least one member"):
        EnsembleSpec(())
    with pytest.raises(RunFolderError, match="positive sum"):
        EnsembleSpec((Member("m", 0.0),))


# ------------------------------------------------------------------ serving.json


def test_serving_json_round_trip_and_absence(tmp_path):
    assert read_serving(tmp_path) is None  # not calibrated yet
    spec = ServingSpec(0.42, {"f1": 0.9, "split": "val"})
    write_serving(tmp_path, spec)
    assert json.loads((tmp_path / SERVING_FILE).read_text()) == {
        "unknown_threshold": 0.42, "calibration": {"f1": 0.9, "split": "val"}}
    assert read_serving(tmp_path) == spec and _listing(tmp_path) == [SERVING_FILE]
    _write(tmp_path, SERVING_FILE, {"unknown_threshold": 0.3})  # hand-written, no record
    assert read_serving(tmp_path) == ServingSpec(0.3)


@pytest.mark.parametrize("obj, message", [
    ({}, "unknown_threshold: expected a number in"),
    ({"unknown_threshold": "0.3"}, "unknown_threshold: expected a number in"),
    ({"unknown_threshold": 1.5}, r"unknown_threshold: expected a number in \[0, 1\], got 1.5"),
    ({"unknown_threshold": 0.3, "calibration": [1]}, "calibration: expected an object"),
    ("0.3", "expected a JSON object"),
])
def test_malformed_serving_json(tmp_path, obj, message):
    _write(tmp_path, SERVING_FILE, obj)
    with pytest.raises(RunFolderError, match=message) as err:
        read_serving(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / SERVING_FILE}: ")


# ------------------------------------------------------------------ the weighted mean


def test_weighted_mean_hand_computed():
    sums = np.array([[1.0 * 0.2 + 3.0 * 0.6, 1.0 * 1.0 + 3.0 * 0.0]], np.float32)
    got = weighted_mean(sums, [1.0, 3.0])
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, [[0.5, 0.25]], rtol=1e-6)


def test_weighted_mean_of_group_sums_equals_that_of_the_whole_sum():
    rng = np.random.default_rng(0)
    s = rng.random((3, 4, 7), dtype=np.float32)  # 3 members' sigmoid scores
    w = [1.0, 0.5, 2.0]
    groups = [w[0] * s[0] + w[1] * s[1], w[2] * s[2]]  # two member deployments' sums
    frozen = [g.copy() for g in groups]
    for g in groups:
        g.flags.writeable = False  # what a Serve handle returns
    want = np.tensordot(w, s, 1) / 3.5
    np.testing.assert_allclose(weighted_mean(groups, w), want, rtol=1e-6)
    np.testing.assert_allclose(weighted_mean(sum(frozen), w), want, rtol=1e-6)
    assert all((g == f).all() for g, f in zip(groups, frozen))  # inputs untouched
    # Scaling every weight leaves the mean unchanged.
    np.testing.assert_allclose(weighted_mean([4 * g for g in frozen], [4 * x for x in w]), want,
                               rtol=1e-6)
    assert weighted_mean(np.ones((2, 3), np.float32) * 1.5, [1.0, 0.5]).max() == 1.0


@pytest.mark.parametrize("weights", [[0.0, 0.0], [1.0, -1.0], [], [float("nan")]])
def test_weighted_mean_refuses_weights_without_a_positive_sum(weights):
    with pytest.raises(ValueError, match="positive sum"):
        weighted_mean(np.zeros((1, 3), np.float32), weights)


def test_run_folder_and_the_serving_api_import_no_torch():
    code = ("import sys, rayvid.model.run_folder, rayvid.infer.api; "
            "sys.exit('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr or "torch was imported"


def test_serve_job_refuses_a_malformed_serving_json_before_starting_ray(tmp_path):
    """A run whose serving.json is broken: `jobs/serve.py` names the file and exits 2, with
    no traceback and before Ray starts (the member's model config is all read_run opens)."""
    ckpt = tmp_path / "run" / "folds" / "0" / "M5" / "best"
    ckpt.mkdir(parents=True)
    (ckpt / "model_config.json").write_text(json.dumps({"arch": "M5", "in_dim": 512, "num_classes": 5}))
    (tmp_path / "run" / ENSEMBLE_FILE).write_text(json.dumps(
        {"members": [{"path": "folds/0/M5/best", "weight": 1.0}], "num_classes": 5}))
    (tmp_path / "run" / SERVING_FILE).write_text("{not json")
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "serve.py"), "--run", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("serve: error: ") and f"{SERVING_FILE}: not valid JSON" in last
    assert "Traceback" not in proc.stderr and "Ray" not in proc.stderr
