"""Score calibration of cosine-head members (rayvid.model.calibration), against a full
logistic fit and on small trained members: a cosine head blended with a focal MLP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.linear_model import LogisticRegression

from rayvid.model.architectures import build_model
from rayvid.model.calibration import fit_outputs, sample_pairs, write_calibration
from rayvid.model.checkpoints import load_model, save_checkpoint
from rayvid.model.ensemble import Ensemble
from rayvid.model.losses import MixedLoss, build_loss


def _pairs_full(outputs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (clip, identity >= 1) pair: the oracle the sampled, weighted fit estimates."""
    z = outputs[:, 1:].ravel()
    t = (labels[:, None] == np.arange(1, outputs.shape[1])[None, :]).ravel().astype(float)
    return z, t


def test_sampled_weighted_fit_matches_the_fit_on_every_pair() -> None:
    rng = np.random.default_rng(0)
    n, c = 600, 120
    labels = rng.integers(0, c, n)  # 0: noise, no positive
    outputs = rng.normal(0.0, 0.15, (n, c))
    known = labels > 0
    outputs[known, labels[known]] += rng.normal(0.6, 0.15, known.sum())
    z, t = _pairs_full(outputs, labels)
    full = LogisticRegression(C=1e6, max_iter=1000).fit(z[:, None], t)
    got = fit_outputs([(outputs[:300], labels[:300]), (outputs[300:], labels[300:])], seed=1)
    assert got["a"] == pytest.approx(full.coef_[0, 0], rel=0.1)
    assert got["b"] == pytest.approx(full.intercept_[0], rel=0.1)
    assert got["positives"] == known.sum()


def test_sample_pairs_weights_count_every_negative_once() -> None:
    rng = np.random.default_rng(2)
    n, c = 2000, 50
    labels = rng.integers(0, c, n)
    z, t, w = sample_pairs(rng.normal(size=(n, c)), labels, rng, negatives=16)
    assert (t == 1).sum() == (labels > 0).sum()
    true_negatives = (labels > 0).sum() * (c - 2) + (labels == 0).sum() * (c - 1)
    assert w[t == 0].sum() == pytest.approx(true_negatives, rel=0.02)
    with pytest.raises(ValueError, match="positive and negative"):
        fit_outputs([(np.zeros((3, 4)), np.zeros(3, np.int64))])  # noise only: no positive


def _data(n: int, seed: int, c: int = 21, spread: float = 0.9):
    g = torch.Generator().manual_seed(99)  # the same identities for every split
    protos = torch.nn.functional.normalize(torch.randn(c, 512, generator=g), dim=1)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(1, c, (n,), generator=g)
    x = protos[y] + spread * torch.randn(n, 512, generator=g) / 512 ** 0.5 * 4
    return torch.nn.functional.normalize(x, dim=1), y


def _train(arch: str, loss: dict, steps: int = 150, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(arch, num_classes=21, **kwargs)
    mix = MixedLoss(loss)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = _data(400, seed=1)
    for step in range(steps):
        idx = torch.randint(0, len(y), (64,))
        loss_v = mix(model(x[idx]).float(), y[idx])
        opt.zero_grad()
        loss_v.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("members")
    mlp = _train("M5", {"ce": 0.25, "focal": 0.75}, head_bias="prior")
    cos = _train("cosine_mlp", {"arcface": 1.0}, scale=30.0)
    dirs = {"M5": save_checkpoint(out / "m5", mlp), "cosine_mlp": save_checkpoint(out / "cos", cos)}
    return dirs


def _calibrated(src: Path, dst: Path, x_held: torch.Tensor, y_held: torch.Tensor) -> Path:
    """A copy of a checkpoint, Platt-calibrated on held-out clips as training does."""
    import shutil

    shutil.copytree(src, dst)
    model, _ = load_model(dst)
    with torch.inference_mode():
        out = model(x_held).numpy()
    write_calibration(dst, fit_outputs([(out, y_held.numpy())]))
    return dst


def test_calibration_keeps_one_members_scale_from_deciding_the_blend(members, tmp_path) -> None:
    """Uncalibrated, sigmoid(30 cos) scores a clip ~0.5 for identities it does not show:
    its score mass dwarfs the focal MLP's and the sum ranks by the cosine head alone.
    Calibrating the cosine head alone swings it the other way (this small MLP overrates
    its negatives). With every member calibrated on held-out clips (`model.calibrate:
    auto`), each member's scores add up to about the number of true pairs, as
    probabilities do, and the blend follows both members."""
    x_held, y_held = _data(300, seed=2)
    x_test, _ = _data(300, seed=3)
    x = x_test.numpy()
    positives = len(x)

    def mass(member: Ensemble) -> float:
        return float(member.scores(x)[:, 1:].sum())

    def agreement(blend: Ensemble, member: Ensemble) -> float:
        """Mean Spearman correlation, per identity over the clips, of blend and member."""
        b, m = blend.scores(x), member.scores(x)
        return float(np.mean([spearmanr(b[:, j], m[:, j])[0] for j in range(1, 21)]))

    def one(path: Path) -> Ensemble:
        return Ensemble.from_dirs([path])

    mlp_raw, cos_raw = members["M5"], members["cosine_mlp"]
    mlp_cal = _calibrated(mlp_raw, tmp_path / "m5", x_held, y_held)
    cos_cal = _calibrated(cos_raw, tmp_path / "cos", x_held, y_held)
    assert mass(one(cos_raw)) > 4 * mass(one(mlp_raw)) and mass(one(cos_raw)) > 5 * positives
    for path in (mlp_cal, cos_cal):
        assert mass(one(path)) == pytest.approx(positives, rel=0.3)

    def gap(a: Path, b: Path) -> float:
        blend = Ensemble.from_dirs([a, b])
        return agreement(blend, one(a)) - agreement(blend, one(b))

    assert gap(cos_raw, mlp_raw) > 0.05   # the cosine head decides
    assert gap(cos_cal, mlp_raw) < -0.05  # now the uncalibrated MLP does
    assert abs(gap(cos_cal, mlp_cal)) < 0.05  # neither
    both = Ensemble.from_dirs([mlp_cal, cos_cal])
    assert min(agreement(both, one(mlp_cal)), agreement(both, one(cos_cal))) > 0.9
