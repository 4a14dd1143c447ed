"""Unit tests of rayvid.model.schedules: warm-up, step decay and cosine in fractions of the run."""

from __future__ import annotations

import pytest
import torch

from rayvid.model.schedules import FOURTH_PLACE_LR, POSTER_LR, LRSchedule, apply


def test_linear_warmup_then_base() -> None:
    s = LRSchedule(base_lr=1e-3, warmup_fraction=0.1, warmup_lr=1e-5, kind="constant")
    assert s.warmup_steps(1000) == 100
    assert s.lr_at(0, 1000) == pytest.approx(1e-5)
    assert s.lr_at(50, 1000) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert s.lr_at(99, 1000) < 1e-3
    assert s.lr_at(100, 1000) == pytest.approx(1e-3)  # warm-up end
    assert s.lr_at(999, 1000) == pytest.approx(1e-3)


def test_cosine_ends_at_min_lr() -> None:
    s = LRSchedule(base_lr=0.1, warmup_fraction=0.1, warmup_lr=0.0, kind="cosine", min_lr=1e-4)
    assert s.lr_at(10, 100) == pytest.approx(0.1)
    assert s.lr_at(99, 100) == pytest.approx(1e-4)
    mid = s.lr_at(10 + 89 // 2, 100)
    assert mid == pytest.approx(1e-4 + (0.1 - 1e-4) * 0.5 * (1 + torch.cos(torch.tensor(44 / 89 * torch.pi)).item()))
    lrs = [s.lr_at(i, 100) for i in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert s.lr_at(500, 100) == pytest.approx(1e-4)  # past the end: the last lr


def test_step_boundaries() -> None:
    s = LRSchedule(base_lr=1.0, warmup_fraction=0.0, kind="step", step_fraction=0.25, step_gamma=0.5)
    total = 101  # remaining progress r = step / 100
    assert s.lr_at(0, total) == 1.0
    assert s.lr_at(24, total) == 1.0
    assert s.lr_at(25, total) == 0.5
    assert s.lr_at(49, total) == 0.5
    assert s.lr_at(50, total) == 0.25
    assert s.lr_at(100, total) == 1.0 / 16


def test_fourth_place_schedule_in_epochs() -> None:
    # One step per epoch, 150 epochs: constant 2e-5 for epochs 1-9, 1.5e-4 from epoch 10,
    # halved at epochs 60 and 110 (1-based), as in their code.
    lr = [FOURTH_PLACE_LR.lr_at(e - 1, 150) for e in range(1, 151)]
    assert set(lr[:9]) == {2e-5}
    assert lr[9] == pytest.approx(1.5e-4) and lr[58] == pytest.approx(1.5e-4)
    assert lr[59] == pytest.approx(7.5e-5) and lr[108] == pytest.approx(7.5e-5)
    assert lr[109] == pytest.approx(3.75e-5) and lr[149] == pytest.approx(3.75e-5)


def test_size_invariance() -> None:
    # The same fractions of the run give the same lr at 100 or 10,000 steps.
    small = [POSTER_LR.lr_at(i, 100) for i in (0, 3, 6, 99)]
    large = [POSTER_LR.lr_at(i, 10000) for i in (0, 300, 600, 9999)]
    assert small == pytest.approx(large)
    assert small[2] == POSTER_LR.base_lr and small[3] == POSTER_LR.min_lr


def test_validation() -> None:
    with pytest.raises(ValueError):
        LRSchedule(kind="poly")
    with pytest.raises(ValueError):
        LRSchedule(warmup="exp")
    with pytest.raises(ValueError):
        LRSchedule(warmup_fraction=1.0)
    with pytest.raises(ValueError):
        POSTER_LR.lr_at(0, 0)


def test_apply_sets_every_group() -> None:
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([{"params": [p1]}, {"params": [p2], "lr": 0.5}], lr=0.1)
    apply(opt, 3e-4)
    assert [g["lr"] for g in opt.param_groups] == [3e-4, 3e-4]
