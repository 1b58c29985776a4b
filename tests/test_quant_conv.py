"""Quantized convolutions: a 1x1 convolution quantizes as the linear layer it is, a depthwise one per output
channel, and `QuantConfig.layers` picks which kinds of layer a model gets quantized."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from fraqat_cli.quant import (
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    QuantSpec,
    fake_quantize_spec,
    layer_kind,
    quantize_model,
    set_weight_bits,
)
from fraqat_cli.quant.conv import conv_kind


@pytest.mark.parametrize("granularity,group_size", [("per_tensor", None), ("per_channel", None), ("per_group", 8)])
def test_a_pointwise_conv_computes_what_the_same_quantized_linear_layer_computes(granularity, group_size):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 1)
    linear = nn.Linear(16, 24)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.reshape(24, 16))
        linear.bias.copy_(conv.bias)
    spec = QuantSpec(granularity, group_size)
    qconv = QuantConv2d.from_conv(conv, weight_spec=spec, weight_bits=4)
    qlinear = QuantLinear.from_linear(linear, weight_spec=spec, weight_bits=4)
    x = torch.randn(2, 16, 5, 7)  # (B, C, H, W)
    by_conv = qconv(x)
    by_linear = qlinear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(by_conv, by_linear, rtol=1e-5, atol=1e-6)
    assert qconv.kind == "pointwise_conv" and qconv.weight is conv.weight  # shared, not copied


def test_a_depthwise_conv_is_quantized_per_output_channel_over_its_taps():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    qconv = QuantConv2d.from_conv(conv, weight_spec=QuantSpec("per_channel"), weight_bits=3)
    expected = fake_quantize_spec(conv.weight.reshape(8, 9), 3, QuantSpec("per_channel")).reshape(8, 1, 3, 3)
    assert torch.equal(qconv.quantize_weight(), expected)
    assert qconv.kind == "depthwise_conv"
    baked = qconv.to_conv()
    x = torch.randn(1, 8, 6, 6)
    set_weight_bits(nn.Sequential(qconv), 3)
    torch.testing.assert_close(baked(x), nn.functional.conv2d(x, expected, conv.bias, padding=1, groups=8))


def test_a_quantized_conv_passes_gradients_straight_through():
    conv = QuantConv2d.from_conv(nn.Conv2d(4, 6, 1), weight_bits=4)
    conv(torch.randn(2, 4, 3, 3)).square().sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("conv,kind", [
    (nn.Conv2d(4, 8, 1), "pointwise_conv"),
    (nn.Conv2d(4, 8, 3, padding=1, groups=4), "depthwise_conv"),
    (nn.Conv2d(4, 8, 4, stride=4), None),      # a patch embedding: not a matrix product per pixel
    (nn.Conv2d(4, 8, 1, stride=2), None),      # strided 1x1: skips pixels
    (nn.Conv2d(4, 8, 1, groups=2), None),      # grouped 1x1: block-diagonal
])
def test_conv_kinds(conv, kind):
    assert conv_kind(conv) == kind == layer_kind(conv)


def test_a_conv_of_no_kind_is_refused():
    with pytest.raises(ValueError, match="allowed kinds: pointwise_conv, depthwise_conv"):
        QuantConv2d.from_conv(nn.Conv2d(4, 8, 4, stride=4))


@pytest.fixture(scope="module")
def tiny_sana():
    from pathlib import Path

    from hydra.utils import instantiate

    conf = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "model" / "tiny_sana.yaml")
    torch.manual_seed(0)
    return instantiate(conf.components.transformer)


def kinds_quantized(model) -> dict[str, str]:
    return {name: m.kind for name, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))}


def test_the_layers_option_picks_which_kinds_are_quantized(tiny_sana):
    only_linear = copy.deepcopy(tiny_sana)
    quantize_model(only_linear, QuantConfig(weight_bits=4))
    assert set(kinds_quantized(only_linear).values()) == {"linear"}

    with_pointwise = copy.deepcopy(tiny_sana)
    summary = quantize_model(with_pointwise, QuantConfig(weight_bits=4, layers=("linear", "pointwise_conv")))
    quantized = kinds_quantized(with_pointwise)
    assert {k for k in quantized if k.endswith(("conv_inverted", "conv_point"))} == {
        k for k in quantized if quantized[k] == "pointwise_conv"} != set()
    assert not any(k.endswith("conv_depth") for k in quantized)
    assert "linear/pointwise_conv layers quantized" in str(summary)
    assert summary.quantized_params > quantize_model(copy.deepcopy(tiny_sana), QuantConfig()).quantized_params

    everything = copy.deepcopy(tiny_sana)
    quantize_model(everything, QuantConfig(weight_bits=4, include=("*",),
                                           layers=("linear", "pointwise_conv", "depthwise_conv")))
    kinds = set(kinds_quantized(everything).values())
    assert kinds == {"linear", "pointwise_conv", "depthwise_conv"}
    assert not isinstance(everything.patch_embed.proj, QuantConv2d)  # a 2x2 patch convolution is no kind
    assert set_weight_bits(everything, 5) == len(kinds_quantized(everything))


def test_a_quantized_sana_trains_through_its_convolutions(tiny_sana):
    model = copy.deepcopy(tiny_sana)
    quantize_model(model, QuantConfig(weight_bits=4, layers=("linear", "pointwise_conv")))
    out = model(torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, 4, 32), timestep=torch.tensor([3.0]),
                return_dict=False)[0]
    out.square().mean().backward()
    conv = next(m for m in model.modules() if isinstance(m, QuantConv2d))
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("layers,message", [
    (("linear", "conv"), r"unknown layer kind\(s\) \['conv'\]; allowed: .*linear, pointwise_conv, depthwise_conv"),
    ((), "allowed: a non-empty list"),
    ("linear", "not the single string 'linear'"),
])
def test_bad_layer_kinds_are_refused(layers, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(layers=layers)


def test_a_pattern_that_matches_no_layer_of_the_chosen_kinds_is_refused(tiny_sana):
    with pytest.raises(ValueError, match="matches no pointwise_conv layer"):
        quantize_model(copy.deepcopy(tiny_sana), QuantConfig(include=("*attn1*",), layers=("pointwise_conv",)))
