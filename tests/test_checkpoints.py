"""Unit tests of rayvid.model.checkpoints (directory round trips) and rayvid.model.ensemble (sigmoid blend)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import torch.distributed as dist
from torch import nn

from rayvid.model.checkpoints import (
    CONFIG_FILE, JOB_CONFIG_FILE, MODEL_FILE, load_model, save_checkpoint,
)
from rayvid.model.ensemble import Ensemble
from rayvid.model.run_folder import RunFolderError
from rayvid.model.architectures import build_model

C = 7
D = 16


def _trained(arch: str = "M3", seed: int = 0, **kwargs) -> nn.Module:
    """A model whose BN running stats and weights are not at their initial values."""
    torch.manual_seed(seed)
    model = build_model(arch, in_dim=D, num_classes=C, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        model.train()(torch.randn(32, D) + 1.0)  # updates BN running stats
    return model.eval()


def _x(n: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["M1", "M2", "M3", "M4", "M5", "cosine_mlp"])
def test_round_trip_identical_outputs(tmp_path: Path, arch: str) -> None:
    model = _trained(arch)
    out = save_checkpoint(tmp_path / "ckpt", model, job_config={"train": {"lr": 1e-3}},
                          extra={"epoch": 3, "fold": 1, "map": np.float32(0.5)})
    assert sorted(p.name for p in out.iterdir()) == sorted([MODEL_FILE, CONFIG_FILE, JOB_CONFIG_FILE])
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary left
    loaded, meta = load_model(out)
    assert not loaded.training
    assert meta["arch"] == arch and meta["extra"] == {"epoch": 3, "fold": 1, "map": 0.5}
    assert yaml.safe_load((out / JOB_CONFIG_FILE).read_text()) == {"train": {"lr": 1e-3}}
    with torch.no_grad():
        assert torch.equal(loaded(_x()), model(_x()))


def test_overwrite_replaces_checkpoint(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "best", _trained(seed=0), extra={"epoch": 1})
    save_checkpoint(tmp_path / "best", _trained(seed=1), extra={"epoch": 2})
    assert load_model(tmp_path / "best")[1]["extra"]["epoch"] == 2
    assert not (tmp_path / "best" / JOB_CONFIG_FILE).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_load_strips_ddp_and_compile_prefixes_from_file(tmp_path: Path) -> None:
    model = _trained()
    ckpt = save_checkpoint(tmp_path / "c", model)
    state = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    torch.save(state, ckpt / MODEL_FILE)
    with torch.no_grad():
        assert torch.equal(load_model(ckpt)[0](_x()), model(_x()))


def test_save_unwraps_real_ddp(tmp_path: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = _trained("M5")
        ckpt = save_checkpoint(tmp_path / "c", nn.parallel.DistributedDataParallel(model))
    finally:
        dist.destroy_process_group()
    keys = torch.load(ckpt / MODEL_FILE, weights_only=True).keys()
    assert not any(k.startswith("module.") for k in keys)
    with torch.no_grad():
        assert torch.equal(load_model(ckpt)[0](_x()), model(_x()))


def test_missing_files_and_unknown_arch_name_the_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model(tmp_path / "nowhere")
    ckpt = save_checkpoint(tmp_path / "c", _trained())
    (ckpt / MODEL_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=str(ckpt)):
        load_model(ckpt)
    ckpt = save_checkpoint(tmp_path / "d", _trained())
    cfg = json.loads((ckpt / CONFIG_FILE).read_text())
    (ckpt / CONFIG_FILE).write_text(json.dumps({**cfg, "arch": "M9"}))
    with pytest.raises(ValueError, match=rf"{ckpt}.*M9.*M5"):
        load_model(ckpt)


def test_save_rejects_plain_modules(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "c", nn.Linear(2, 2))
    assert not list(tmp_path.iterdir())


def test_ensemble_equals_manual_sum_of_sigmoids() -> None:
    members = [_trained("M5", 0), _trained("M3", 1), _trained("cosine_mlp", 2)]
    ens = Ensemble(members, weights=[1.0, 0.5, 2.0], batch_size=3)
    x = _x(10).numpy()
    with torch.no_grad():
        t = torch.from_numpy(x)
        manual = (torch.sigmoid(members[0](t)) + 0.5 * torch.sigmoid(members[1](t))
                  + 2.0 * torch.sigmoid(30.0 * members[2](t)))
    got = ens.scores(x)
    assert got.dtype == np.float32 and got.shape == (10, C) and ens.num_classes == C
    np.testing.assert_allclose(got, manual.numpy(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # per-call weights (what a served member gets) override, once
        only_m3 = 3.0 * torch.sigmoid(members[1](t))
    np.testing.assert_allclose(ens.scores(x, weights=[0, 3, 0]), only_m3.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ens.scores(x), got)
    with pytest.raises(ValueError, match="3 members but 2 weights"):
        ens.scores(x, weights=[1, 1])


def test_ensemble_from_run(tmp_path: Path) -> None:
    members = [_trained("M5", 0), _trained("M1", 1)]
    for fold, m in enumerate(members):
        save_checkpoint(tmp_path / "folds" / str(fold) / m.arch / "best", m)
    spec = {"members": [{"path": f"folds/{i}/{m.arch}/best", "weight": 1.0 + i} for i, m in enumerate(members)],
            "weighting": {"kind": "mean"}}
    (tmp_path / "ensemble.json").write_text(json.dumps(spec))
    ens = Ensemble.from_run(tmp_path)
    assert len(ens) == 2 and ens.weights == [1.0, 2.0] and ens.info["weighting"]["kind"] == "mean"
    x = _x(5).numpy()
    expected = Ensemble(members, [1.0, 2.0]).scores(x)
    np.testing.assert_allclose(ens.scores(x), expected, rtol=1e-6)
    with pytest.raises(RunFolderError, match="has no ensemble.json"):
        Ensemble.from_run(tmp_path / "folds")


def test_ensemble_face_set_members_take_a_mask() -> None:
    torch.manual_seed(0)
    model = build_model("attention", in_dim=D, num_classes=C, d_model=16, num_heads=2, dropout=0.0)
    x = torch.randn(4, 3, D + 2)
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[1, 2] = False
    got = Ensemble([model]).scores(x.numpy(), mask.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(got, torch.sigmoid(30.0 * model(x, mask)).numpy(), rtol=1e-5, atol=1e-6)


def test_ensemble_members_must_agree() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        Ensemble([build_model("M5", in_dim=D, num_classes=C), build_model("M5", in_dim=D, num_classes=C + 1)])
    mixed = Ensemble([build_model("M5", in_dim=D, num_classes=C),
                      build_model("attention", in_dim=D, num_classes=C, d_model=16, num_heads=2)])
    with pytest.raises(ValueError, match="dict of inputs"):  # one array cannot feed both kinds
        mixed.scores(np.zeros((2, D), np.float32))
    with pytest.raises(ValueError, match="face_mask"):
        mixed.scores({"x": np.zeros((2, D), np.float32), "faces": np.zeros((2, 3, D + 2))})
    with pytest.raises(ValueError):
        Ensemble([build_model("M5", in_dim=D, num_classes=C)], weights=[1.0, 2.0])
    with pytest.raises(ValueError):
        Ensemble([])


def test_mixed_ensemble_feeds_each_member_its_kind_and_skips_members_that_cannot_use_a_clip() -> None:
    """M5 (clip vector) + multimodal: each member gets its own columns; a faceless clip is
    scored by the multimodal member alone, rescaled to the ensemble's total weight."""
    torch.manual_seed(0)
    m5 = build_model("M5", in_dim=D, num_classes=C)
    mm = build_model("multimodal", in_dim=D, num_classes=C, head_dim=4, body_dim=4, audio_dim=4,
                     d_model=8)
    x = np.random.default_rng(0).standard_normal((3, D)).astype(np.float32)
    x[2] = 0.0  # clip 2 has no face
    mm_x = np.random.default_rng(1).standard_normal((3, D + 12)).astype(np.float32)
    mm_x[2, :D] = 0.0
    mm_mask = np.ones((3, 4), bool)
    mm_mask[2, 0] = False
    got = Ensemble([m5, mm], [1.0, 3.0]).scores({"x": x, "mm": mm_x, "mm_mask": mm_mask})
    with torch.no_grad():
        s5 = torch.sigmoid(m5.eval()(torch.from_numpy(x))).numpy()
        smm = torch.sigmoid(mm.eval()(torch.from_numpy(mm_x), torch.from_numpy(mm_mask))).numpy()
    np.testing.assert_allclose(got[:2], (1.0 * s5 + 3.0 * smm)[:2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[2], 4.0 * smm[2], rtol=1e-5, atol=1e-6)  # M5 cannot use it
    nothing = Ensemble([m5]).scores(np.zeros((1, D), np.float32))
    assert not nothing.any()  # no member can score a clip with no face: all zeros
