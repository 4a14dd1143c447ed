"""Per-frame voting (rayvid.infer.vote, predict_split(fusion="vote"), jobs/predict.py --fusion).

The oracle is a plain per-clip Python loop: each face through the torch model on its own,
sigmoid, mean over the clip's faces, then the blend written out by hand. The scorer is
checked against it on checkpoints (random M5 + cosine_mlp; conftest's trained mixed run)
with chunks that split clips, faceless clips included; then the job end to end on the
session's Ray.

    pytest tests/test_vote.py              # ~20 s with the session's fixtures built
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import MIXED_KINDS, MIXED_WEIGHTS, TRAINED_WEIGHTING

from rayvid.core import fusion, inputs, metrics
from rayvid.core.inputs import FaceParts
from rayvid.data.pipeline import ClipTransform, split_paths
from rayvid.infer.vote import VotingEnsemble
from rayvid.model.architectures import build_model
from rayvid.model.checkpoints import save_checkpoint
from rayvid.model.ensemble import Ensemble
from rayvid.model.run_folder import blend
from rayvid.release import schema

ROOT = Path(__file__).resolve().parents[1]
COUNTS = [0, 1, 5, 0, 3, 7, 0, 2, 4, 1]  # faces per clip: faceless first, between, many


def _faces(counts, seed: int = 0) -> FaceParts:
    """Flat faces as the dataset stores them: float16, not normalised, norms ~1-20."""
    rng = np.random.default_rng(seed)
    offsets = fusion.offsets_from_counts(np.asarray(counts))
    n = int(offsets[-1])
    feat = rng.standard_normal((n, 512)) * rng.uniform(0.05, 0.9, (n, 1))
    quality = rng.uniform(-10, 60, n).astype(np.float32)  # some faces weigh 0 in qFF
    return FaceParts(feat.astype(np.float16), rng.uniform(0.5, 1, n).astype(np.float32),
                     quality, offsets)


def _loop_means(model, faces: FaceParts) -> np.ndarray:
    """The oracle: per clip, every face alone through `model`, sigmoid, mean; 0 if faceless."""
    scale = float(getattr(model, "logit_scale", 1.0))
    bias = float(getattr(model, "logit_bias", 0.0))
    out = []
    with torch.no_grad():
        for c in range(len(faces.offsets) - 1):
            probs = [torch.sigmoid(scale * model(torch.from_numpy(
                faces.feat[i].astype(np.float32))[None]) + bias)[0].numpy()
                for i in range(faces.offsets[c], faces.offsets[c + 1])]
            out.append(np.mean(probs, axis=0) if probs else None)
    c_all = next(p for p in out if p is not None).shape[0]
    return np.stack([np.zeros(c_all, np.float32) if p is None else p for p in out])


@pytest.fixture(scope="module")
def random_members(tmp_path_factory):
    """Two untrained clip-vector checkpoints (M5, cosine_mlp with its logit scale and a
    score calibration, as training writes it), loaded back through the checkpoint reader
    as an ensemble with unequal weights."""
    from rayvid.model.calibration import write_calibration

    root = tmp_path_factory.mktemp("vote-ckpt")
    dirs = []
    for seed, arch in enumerate(("M5", "cosine_mlp")):
        torch.manual_seed(seed)
        dirs.append(save_checkpoint(root / arch, build_model(arch, in_dim=512, num_classes=11)))
    write_calibration(dirs[1], {"a": 12.0, "b": -3.0})
    ens = Ensemble.from_dirs(dirs, weights=(1.0, 0.5))
    assert (ens.members[1].logit_scale, ens.members[1].logit_bias) == (12.0, -3.0)
    return ens


def test_a_face_is_fed_as_a_clip_of_one_face():
    """What a voting member sees for a face is what qFF gives a clip of that face alone
    (the raw feature, not normalised), whatever its fusion weight."""
    faces = _faces([1] * 40)
    one = np.arange(41)
    x, _ = fusion.qff(faces.feat, faces.det, faces.quality, one)
    np.testing.assert_array_equal(x, fusion.as_float32(faces.feat))


@pytest.mark.parametrize("chunk", [1, 3, 4, 8192])
def test_vote_matches_a_per_clip_loop(random_members, chunk):
    faces = _faces(COUNTS)
    seen = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
             for m in random_members.members]
    try:
        got = VotingEnsemble(random_members, chunk_faces=chunk).scores({}, faces)
    finally:
        for h in hooks:
            h.remove()
    assert max(seen) <= chunk  # never more faces than a chunk through a model at once
    assert sum(seen) == 2 * sum(COUNTS)
    w = random_members.weights
    want = sum(wi * _loop_means(m, faces) for wi, m in zip(w, random_members.members))
    assert got.shape == (len(COUNTS), 11) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    faceless = np.asarray(COUNTS) == 0
    assert (got[faceless] == 0).all() and (got[~faceless] > 0).all()


def test_one_member_is_the_core_vote(random_members):
    """One member, weight 1: `fusion.vote` (the numpy core) of its per-face scores."""
    m5 = Ensemble(random_members.members[:1])
    faces = _faces(COUNTS, seed=1)
    with torch.no_grad():
        probs = torch.sigmoid(m5.members[0](torch.from_numpy(
            fusion.as_float32(faces.feat)))).numpy()
    np.testing.assert_allclose(VotingEnsemble(m5, chunk_faces=5).scores({}, faces),
                               fusion.vote(probs, faces.offsets), rtol=1e-5, atol=1e-7)


def test_mixed_ensemble_votes_its_face_member_only(sim_dataset, trained_mixed_run):
    """M5 + multimodal (conftest's trained mixed run) on real val clips: the multimodal
    part is `Ensemble.partial_scores`'s, M5's is the loop's vote, blended per clip; a
    faceless clip is answered by the multimodal member alone, as in qFF mode."""
    meta = schema.read_meta(sim_dataset)
    dims = tuple(int(meta["dims"][m]) for m in ("head", "body", "audio"))
    weighting = fusion.Weighting.from_dict(TRAINED_WEIGHTING)
    table = pq.read_table(split_paths(sim_dataset, ["val"]))
    transform = ClipTransform(kinds=MIXED_KINDS, weighting=weighting, dims=dims)
    parts = transform.parts(table)
    counts = np.diff(parts.faces.offsets)
    rows = np.sort(np.concatenate([np.flatnonzero(counts == 0)[:6],
                                   np.flatnonzero(counts > 0)[:30]]))
    parts = parts.take(rows)
    has_face = np.diff(parts.faces.offsets) > 0
    assert (~has_face).sum() == 6
    built = inputs.build(parts, transform.spec)
    ens = Ensemble.from_run(trained_mixed_run)
    assert ens.kinds == list(MIXED_KINDS)
    got = VotingEnsemble(ens, chunk_faces=7).scores(built, parts.faces)

    w_face, w_mm = MIXED_WEIGHTS
    mm_sums, mm_used = ens.partial_scores(built, weights=[0.0, w_mm])  # the multimodal part
    votes = w_face * _loop_means(ens.members[0], parts.faces)
    want = blend(mm_sums + votes, mm_used + w_face * has_face, w_face + w_mm)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    qff = ens.scores(built)
    np.testing.assert_allclose(got[~has_face], qff[~has_face], rtol=1e-6)  # mm alone, rescaled
    assert (got[~has_face].max(axis=1) > 0).all()
    assert not np.allclose(got[has_face], qff[has_face])  # voting did change the face clips


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_predict_job_with_fusion_vote(ray_local, sim_dataset, trained_run, tmp_path):
    """`jobs/predict.py --fusion vote` attached to the session's Ray: a valid submission,
    the same as the in-process vote ranks it, and its mAP reported."""
    out = tmp_path / "submission.txt"
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "predict.py"), "--run", str(trained_run),
         "--dataset", str(sim_dataset), "--split", "val", "--out", str(out),
         "--fusion", "vote", "--batch-size", "64", "--num-actors", "1"],
        capture_output=True, text=True, timeout=280, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("{")))
    assert summary["fusion"] == "vote" and 0.0 < summary["map"] <= 1.0
    assert summary["gt"] == str(Path(schema.read_meta(sim_dataset)["source"]) / "val_gt.txt")
    assert f"mAP {summary['map']:.4f}" in proc.stdout

    table = pq.read_table(split_paths(sim_dataset, ["val"]))  # file order = stream order
    feat, det, quality, offsets = schema.face_arrays(table)
    faces = FaceParts(feat, det, quality, offsets)
    s = VotingEnsemble(Ensemble.from_run(trained_run)).scores({}, faces)
    names, labels = table["clip"].to_pylist(), table["label"].to_numpy()
    assert summary["clips"] == len(names)
    x, ok = fusion.qff(feat, det, quality, offsets, fusion.Weighting.from_dict(TRAINED_WEIGHTING))
    assert summary["not_ok"] == int((~inputs.answerable(["clip_vector"], {"x": x, "ok": ok})).sum())
    expected = []
    for c in range(1, s.shape[1]):  # score desc, ties by the lower clip index
        order = np.lexsort((np.arange(len(names)), -s[:, c]))[:100]
        expected.append(" ".join([str(c)] + [names[i] + ".mp4" for i in order]))
    assert out.read_text().splitlines() == expected
    assert summary["map"] == pytest.approx(metrics.map_from_scores(s, labels))
