"""Unit tests of rayvid.model.architectures: the 4th-place MLPs, the 3rd-place face-set model, multimodal."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from rayvid.model.architectures import MODELS, build_from_config, build_model

C = 11


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _lin(i: int, o: int) -> int:
    return i * o + o


def _bn(n: int) -> int:
    return 2 * n  # weight + bias (running stats are buffers)


@pytest.mark.parametrize(
    "arch, expected",
    [
        ("M1", _lin(512, 1024) + _bn(1024) + _lin(1024, C)),
        ("M2", _lin(512, 512) + _bn(512) + _lin(512, 1024) + _bn(1024) + _lin(1024, C)),
        ("M3", _lin(512, 1024) + _bn(1024) + _lin(1024, C)),
        ("M4", _lin(512, 768) + _lin(768, 1024) + _lin(1024, C)),
        ("M5", 512 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 11 + 11),
    ],
)
def test_mlp_parameter_counts_and_shapes(arch: str, expected: int) -> None:
    model = build_model(arch, in_dim=512, num_classes=C)
    assert _n_params(model) == expected
    assert model.input_kind == "clip_vector"
    out = model.eval()(torch.randn(4, 512))
    assert out.shape == (4, C) and out.dtype == torch.float32


@pytest.mark.parametrize("arch", ["M1", "M2", "M3", "M4", "M5"])
def test_mlp_init_xavier_and_zero_bias(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, num_classes=C)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            fan_out, fan_in = m.weight.shape
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            assert m.weight.abs().max() <= bound
            assert m.weight.abs().max() > 0.9 * bound  # uniform over the whole range
            assert torch.count_nonzero(m.bias) == 0


@pytest.mark.parametrize("arch", ["M1", "M5"])
def test_prior_head_bias_starts_every_class_at_one_over_c(arch: str) -> None:
    model = build_model(arch, num_classes=C, head_bias="prior")
    hidden = [m for m in model.modules() if isinstance(m, nn.Linear)][:-1]
    assert all(torch.count_nonzero(m.bias) == 0 for m in hidden)  # only the output layer moves
    assert torch.allclose(torch.sigmoid(model.head.bias), torch.full((C,), 1.0 / C), rtol=1e-3)
    assert build_from_config(model.model_config()).model_config()["head_bias"] == "prior"
    with pytest.raises(ValueError, match="head_bias"):
        build_model(arch, num_classes=C, head_bias="random")


def _kinds(model: nn.Module) -> list[str]:
    names = {nn.Linear: "linear", nn.Sigmoid: "sigmoid", nn.SiLU: "swish", nn.BatchNorm1d: "bn", nn.Dropout: "drop"}
    return [names[type(m)] for m in model.modules() if type(m) in names]


def test_layer_order_bn_after_activation() -> None:
    assert _kinds(build_model("M1", num_classes=C)) == ["linear", "sigmoid", "bn", "drop", "linear"]
    assert _kinds(build_model("M2", num_classes=C)) == [
        "linear", "sigmoid", "bn", "drop", "linear", "sigmoid", "bn", "drop", "linear"]
    assert _kinds(build_model("M3", num_classes=C)) == ["linear", "swish", "bn", "drop", "linear"]
    assert _kinds(build_model("M4", num_classes=C)) == ["linear", "swish", "drop", "linear", "swish", "drop", "linear"]
    assert [m.p for m in build_model("M2", num_classes=C).modules() if isinstance(m, nn.Dropout)] == [0.2, 0.5]
    assert [m.p for m in build_model("M5", num_classes=C).modules() if isinstance(m, nn.Dropout)] == [0.5, 0.5]


def test_unknown_model_lists_known() -> None:
    with pytest.raises(ValueError, match="M5"):
        build_model("M6")


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_model_config_rebuilds(arch: str) -> None:
    kwargs = {"d_model": 32} if arch in ("attention", "multimodal") else {}
    if arch == "attention":
        kwargs["num_heads"] = 4
    if arch == "multimodal":
        kwargs.update(head_dim=8, body_dim=6, audio_dim=4)
    model = build_model(arch, in_dim=16, num_classes=C, **kwargs)
    cfg = json.loads(json.dumps(model.model_config()))
    assert cfg["arch"] == arch and cfg["num_classes"] == C
    clone = build_from_config(cfg)
    assert clone.model_config() == cfg
    assert {k: v.shape for k, v in clone.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_cosine_mlp_outputs_cosines() -> None:
    model = build_model("cosine_mlp", in_dim=16, num_classes=C).eval()
    out = model(torch.randn(5, 16))
    assert out.shape == (5, C) and out.abs().max() <= 1.0 + 1e-6
    assert model.logit_scale == 30.0


def _face_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("attention", in_dim=16, num_classes=C, d_model=32, num_heads=4, dropout=0.0).eval()


def test_attention_shapes_mask_and_empty_clip() -> None:
    model = _face_model()
    assert model.input_kind == "face_set"
    x = torch.randn(3, 5, 18)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    out = model(x, mask)
    assert out.shape == (3, C) and torch.isfinite(out).all()
    assert out.abs().max() <= 1.0 + 1e-6
    assert torch.count_nonzero(out[2]) == 0  # no face -> zero cosines, defined
    # Padded faces must not matter.
    x2 = x.clone()
    x2[0, 3:] = 100.0
    assert torch.allclose(model(x2, mask)[0], out[0], atol=1e-5)


def test_attention_is_permutation_invariant_over_faces() -> None:
    model = _face_model()
    x = torch.randn(2, 6, 18)
    perm = torch.randperm(6)
    assert torch.allclose(model(x), model(x[:, perm]), atol=1e-5)


def test_multimodal_missing_face_still_predicts() -> None:
    torch.manual_seed(0)
    model = build_model("multimodal", in_dim=8, num_classes=C, head_dim=8, body_dim=6, audio_dim=4, d_model=16).eval()
    assert model.input_kind == "multimodal"
    x = torch.randn(3, 26)
    x[1, :8] = 0.0  # no face
    out = model(x)
    assert out.shape == (3, C) and torch.isfinite(out).all()
    # With the face absent, the face slice does not influence the output.
    x2 = x.clone()
    x2[1, :8] = 5.0
    present = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.allclose(model(x2, present)[1], out[1], atol=1e-5)
    nothing = model(torch.zeros(1, 26))
    assert torch.isfinite(nothing).all()
