"""Unit tests of rayvid.model.losses: focal, CE, UIR, the combined margin, mixes and stages."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rayvid.model.losses import (
    OpenSetLoss,
    COMBINE, FOURTH_PLACE_STAGES, LOSSES, START, LossSchedule, MarginLoss, MixedLoss, build_loss,
)


def _naive_focal(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    z = logits.double()
    p = torch.sigmoid(z)
    t = F.one_hot(target, z.shape[1]).double()
    pt = t * p + (1 - t) * (1 - p)
    return (-(1 - pt) ** gamma * torch.log(pt)).sum(1).mean()


def test_focal_hand_computed() -> None:
    # Two classes, one sample of class 1, logits [0, 0]: p = 0.5 everywhere;
    # each class gives -(0.5)^2 * log(0.5) = 0.25 * log 2; summed: 0.5 * log 2.
    loss = build_loss("focal")(torch.zeros(1, 2), torch.tensor([1]))
    assert loss.item() == pytest.approx(0.5 * math.log(2), rel=1e-6)
    # Logits [ln 3, 0], target 0: class 0 p = 0.75 -> 0.0625 * -log 0.75; class 1 p_t = 0.5.
    loss = build_loss("focal")(torch.tensor([[math.log(3), 0.0]]), torch.tensor([0]))
    assert loss.item() == pytest.approx(-0.0625 * math.log(0.75) + 0.25 * math.log(2), rel=1e-5)


def test_focal_matches_naive_float64_and_is_stable() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(16, 11) * 3, torch.randint(0, 11, (16,))
    assert build_loss("focal")(logits, target).item() == pytest.approx(_naive_focal(logits, target).item(), rel=1e-5)
    big = torch.tensor([[200.0, -200.0, 50.0]])
    loss = build_loss("focal")(big, torch.tensor([1]))
    # Wrong class 0 at +200 and target class 1 at -200 cost ~200 each, class 2 at +50 ~50.
    assert torch.isfinite(loss) and loss.item() == pytest.approx(450.0, rel=1e-3)


def test_focal_gradient_finite_at_extremes() -> None:
    logits = torch.tensor([[100.0, -100.0, 0.0]], requires_grad=True)
    build_loss("focal")(logits, torch.tensor([1])).backward()
    assert torch.isfinite(logits.grad).all()


def test_ce_equals_torch() -> None:
    torch.manual_seed(1)
    logits, target = torch.randn(8, 11), torch.randint(0, 11, (8,))
    assert torch.allclose(build_loss("ce")(logits, target), F.cross_entropy(logits, target))


def test_uir_labelled_is_ce_over_known_classes() -> None:
    torch.manual_seed(2)
    logits, target = torch.randn(6, 11), torch.randint(1, 11, (6,))
    expected = F.cross_entropy(logits[:, 1:], target - 1)
    assert torch.allclose(build_loss("uir")(logits, target), expected)


def test_uir_noise_minimum_at_uniform() -> None:
    loss = build_loss("uir", lam=1.0)
    n = 10
    uniform = loss(torch.full((1, n + 1), 3.0), torch.tensor([0]))
    assert uniform.item() == pytest.approx(math.log(n), rel=1e-6)
    torch.manual_seed(3)
    for _ in range(20):
        other = loss(torch.randn(1, n + 1), torch.tensor([0]))
        assert other.item() > uniform.item()
    # The "other" logit is not part of the known-class softmax.
    shifted = torch.full((1, n + 1), 3.0)
    shifted[0, 0] = 50.0
    assert loss(shifted, torch.tensor([0])).item() == pytest.approx(uniform.item())


def test_uir_lambda_and_mixture() -> None:
    torch.manual_seed(4)
    logits, target = torch.randn(6, 11), torch.tensor([0, 3, 0, 5, 7, 0])
    known = target > 0
    cls = F.cross_entropy(logits[known][:, 1:], target[known] - 1)
    rej = -F.log_softmax(logits[~known][:, 1:], dim=1).mean()
    assert torch.allclose(build_loss("uir", lam=0.3)(logits, target), cls + 0.3 * rej)


def test_margin_zero_equals_scaled_cosine_ce() -> None:
    torch.manual_seed(5)
    cos = torch.rand(8, 11) * 2 - 1
    target = torch.randint(0, 11, (8,))
    loss = MarginLoss(s=30.0, m1=1.0, m2=0.0, m3=0.0)(cos, target)
    assert torch.allclose(loss, F.cross_entropy(30.0 * cos, target), atol=1e-5)


def test_arcface_and_cosface_target_logits() -> None:
    cos = torch.tensor([[0.6, 0.2, -0.1]])
    target = torch.tensor([0])
    arc = build_loss("arcface").margin_logits(cos, target)
    assert arc[0, 0].item() == pytest.approx(30 * math.cos(math.acos(0.6) + 0.5), rel=1e-5)
    assert torch.allclose(arc[0, 1:], 30 * cos[0, 1:])
    cosf = build_loss("cosface").margin_logits(cos, target)
    assert cosf[0, 0].item() == pytest.approx(30 * (0.6 - 0.35), rel=1e-5)
    # A margin makes the loss larger than without it.
    plain = MarginLoss(m2=0.0)(cos, target)
    assert build_loss("margin")(cos, target) > plain


def test_margin_focal_gamma_reduces_loss() -> None:
    cos, target = torch.tensor([[0.9, 0.1, 0.0]]), torch.tensor([0])
    assert MarginLoss(gamma=2.0)(cos, target) < MarginLoss(gamma=0.0)(cos, target)


def test_registry_and_unknown() -> None:
    assert {"focal", "ce", "uir", "margin"} <= set(LOSSES)
    with pytest.raises(ValueError, match="focal"):
        build_loss("hinge")


def test_mixed_loss_weighted_sum_and_components() -> None:
    torch.manual_seed(6)
    logits, target = torch.randn(8, 11), torch.randint(0, 11, (8,))
    mix = MixedLoss(START)
    expected = 0.25 * F.cross_entropy(logits, target) + 0.75 * build_loss("focal")(logits, target)
    assert torch.allclose(mix(logits, target), expected)
    mix.set_weights({"focal": 1.0})
    assert set(mix.components(logits, target)) == {"focal"}
    assert torch.allclose(mix(logits, target), build_loss("focal")(logits, target))
    with pytest.raises(ValueError):
        mix.set_weights({"uir": 1.0})
    assert torch.allclose(MixedLoss({"uir": 1.0}, options={"uir": {"lam": 0.0}})(logits, target),
                          build_loss("uir", lam=0.0)(logits, target))


def test_loss_schedule_boundaries() -> None:
    sched = LossSchedule(FOURTH_PLACE_STAGES)
    assert sched.at(0.0) == START
    assert sched.at(24 / 150 - 1e-9) == START
    assert sched.at(24 / 150) == {"focal": 1.0}
    assert sched.at(99 / 150 - 1e-9) == {"focal": 1.0}
    assert sched.at(99 / 150) == COMBINE
    assert sched.at(1.0) == COMBINE
    assert sched.at(-0.1) == START
    assert sched.names == ["ce", "focal"]


def test_loss_schedule_validation() -> None:
    with pytest.raises(ValueError):
        LossSchedule([(0.1, START)])
    with pytest.raises(ValueError):
        LossSchedule([(0.0, START), (0.5, COMBINE), (0.5, START)])


# ------------------------------------------------------------------ open-set recipes


def _batch(seed: int = 0, n: int = 12, c: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 0, 3, 4, 5, 0, 1, 2, 0, 3])[:n]
    return logits, target


def _rejection_by_hand(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-(1/n) sum_i log softmax_i over the known classes, per noise row, averaged: a loop."""
    rows = []
    for z, t in zip(logits, target):
        if t == 0:
            known = z[1:]
            log_p = known - torch.logsumexp(known, 0)
            rows.append(-log_p.mean())
    return torch.stack(rows).mean()


@pytest.mark.parametrize("mode", ["class", "uir", "both"])
def test_open_set_loss_against_hand_computation(mode: str) -> None:
    logits, target = _batch()
    base = MixedLoss({"ce": 0.25, "focal": 0.75})
    loss = OpenSetLoss(base, mode, lam=0.7)
    noise = target == 0
    everything = 0.25 * F.cross_entropy(logits, target) + 0.75 * _naive_focal(logits, target)
    known_only = 0.25 * F.cross_entropy(logits[~noise], target[~noise]) + \
        0.75 * _naive_focal(logits[~noise], target[~noise])
    rejection = _rejection_by_hand(logits, target)
    expected = {"class": everything, "uir": known_only + 0.7 * rejection,
                "both": everything + 0.7 * rejection}[mode]
    assert torch.allclose(loss(logits, target), expected)


def test_open_set_rejection_starts_on_schedule_and_uses_the_cosine_scale() -> None:
    logits, target = _batch(1)
    loss = OpenSetLoss(MixedLoss({"ce": 1.0}), "uir", lam=1.0, start=0.5, scale=30.0)
    known = target > 0
    ce_known = F.cross_entropy(logits[known], target[known])
    loss.set_progress(0.4)
    assert torch.allclose(loss(logits, target), ce_known)  # before its start: labelled CE only
    loss.set_progress(0.5)
    assert set(loss.components(logits, target)) == {"ce", "uir_rejection"}
    assert torch.allclose(loss(logits, target),
                          ce_known + _rejection_by_hand(30.0 * logits, target))


def test_open_set_rejection_is_minimal_at_uniform_and_pushes_towards_it() -> None:
    target = torch.tensor([0, 0])
    uniform = torch.zeros(2, 5)
    peaked = torch.tensor([[0.0, 4.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0, -2.0]])
    loss = OpenSetLoss(MixedLoss({"focal": 1.0}), "uir")
    assert float(loss(uniform, target)) == pytest.approx(math.log(4))  # log n, n known classes
    assert float(loss(peaked, target)) > math.log(4)
    z = peaked.clone().requires_grad_(True)
    loss(z, target).backward()
    assert z.grad[0, 1] > 0  # gradient descent lowers the peaked identity's logit


def test_open_set_batches_without_noise_or_labels_are_finite() -> None:
    logits, _ = _batch()
    for target in (torch.full((12,), 2), torch.zeros(12, dtype=torch.long)):
        for mode in ("class", "uir", "both"):
            value = OpenSetLoss(MixedLoss({"ce": 0.5, "focal": 0.5}), mode)(logits, target)
            assert torch.isfinite(value)
    with pytest.raises(ValueError, match="open-set mode"):
        OpenSetLoss(MixedLoss({"ce": 1.0}), "reject")
