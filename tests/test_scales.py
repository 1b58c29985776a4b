"""Learned (LSQ) and MSE-searched weight scales: the gradient, the bit-width changes, state and codes."""

import pytest
import torch
from torch import nn

from fraqat_cli.quant import QuantLinear, QuantSpec, fake_quantize
from fraqat_cli.quant.fake_quant import code_range, dequantize_codes
from fraqat_cli.quant.scales import CLIP_RATIOS, LearnedScaleQuantize, levels, lsq_gradient_factor

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

GRANULARITIES = [("per_tensor", None), ("per_channel", None), ("per_group", 8)]
GRANULARITY_IDS = ["per_tensor", "per_channel", "per_group"]


def explicit_lsq(x, scale, lo, hi, grad_factor):
    """LSQ as Esser et al. write it, gradients by autograd: the scale's gradient scaled by grad_factor
    (value s, gradient g * d/ds), the rounding straight through, the clip on x / s."""
    scaled = scale * grad_factor + (scale - scale * grad_factor).detach()
    ratio = torch.clamp(x / scaled, lo, hi)
    rounded = ratio + (ratio.round() - ratio).detach()
    return rounded * scaled


def _layer(spec, bits=4, seed=0, rows=16, width=32):
    torch.manual_seed(seed)
    linear = nn.Linear(width, rows)
    with torch.no_grad():
        linear.weight[0, 0] = 3.0  # an outlier: max|W| sets a coarse step, clipping pays
    return QuantLinear.from_linear(linear, weight_bits=bits, weight_spec=spec)


@pytest.mark.parametrize("bits", [3, 4, 4.5, 8], ids=lambda b: f"{b:g}bits")
def test_lsq_gradient_matches_autograd_of_the_explicit_formula(bits):
    x = torch.randn(6, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    scale = (x.abs().amax(dim=-1, keepdim=True) / levels(bits) * 0.6).requires_grad_()  # (6, 1): clips some
    lo, hi = code_range(bits, True, "nearest_int_range")
    factor = lsq_gradient_factor(x.shape[-1], bits, "nearest_int_range")
    grad_out = torch.randn(6, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    xa = x.clone().requires_grad_()
    out = LearnedScaleQuantize.apply(xa, scale, lo, hi, factor, False)
    dx, ds = torch.autograd.grad(out, (xa, scale), grad_out)
    xb = x.clone().requires_grad_()
    ref = explicit_lsq(xb, scale, lo, hi, factor)
    ref_dx, ref_ds = torch.autograd.grad(ref, (xb, scale), grad_out)

    assert torch.equal(out, ref)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-12, atol=0)  # ref: (1 / s) * s, a rounding away from 1
    torch.testing.assert_close(ds, ref_ds, rtol=1e-12, atol=1e-12)
    ratio = x / scale.detach()
    assert bool(((ratio < lo) | (ratio > hi)).any()), "the check must cover clipped values"
    assert bool((dx == 0).any()) and bool((dx == grad_out).any())


def test_lsq_gradient_scale_is_one_over_root_of_elements_times_top_code():
    assert lsq_gradient_factor(100, 4, "nearest_int_range") == pytest.approx(1 / (100 * 7) ** 0.5)


def test_learned_scale_starts_at_max_where_clipping_does_not_pay_and_below_it_where_it_does():
    spec = QuantSpec(granularity="per_tensor", scale="learned")
    smooth = QuantLinear.from_linear(nn.Linear(4, 1, bias=False), weight_bits=8, weight_spec=spec)
    with torch.no_grad():
        smooth.weight.copy_(torch.tensor([[-1.0, -0.5, 0.5, 1.0]]))
    smooth.weight_quantizer.init_scale(smooth.weight_matrix())
    assert float(smooth.weight_quantizer.scale.detach()) == pytest.approx(1.0 / levels(8))
    outlier = _layer(spec, bits=4)
    max_scale = float(outlier.weight.detach().abs().max()) / levels(4)
    assert float(outlier.weight_quantizer.scale.detach()) < 0.9 * max_scale


@pytest.mark.parametrize("scale", ["mse", "learned"])
def test_searched_and_learned_scales_quantize_closer_than_max(scale):
    linear = nn.Linear(256, 64, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(64, 256, generator=torch.Generator().manual_seed(0)))  # max ~ 4.5 std
    layer = QuantLinear.from_linear(linear, weight_bits=4, weight_spec=QuantSpec(granularity="per_tensor",
                                                                                 scale=scale))
    with torch.no_grad():
        error = (layer.quantize_weight() - layer.weight).square().sum()
        baseline = (fake_quantize(layer.weight, 4, granularity="per_tensor") - layer.weight).square().sum()
    assert float(error) < 0.6 * float(baseline)


@pytest.mark.parametrize("granularity,group_size", GRANULARITIES, ids=GRANULARITY_IDS)
@pytest.mark.parametrize("steps", [[8, 7, 6, 5.5, 5, 4.75, 4.5, 4.25, 4], [8, 4], [4, 3], [4, 8]],
                         ids=["fractional", "8to4", "4to3", "4to8"])
def test_a_bit_change_moves_learned_weights_no_more_than_the_range_change(granularity, group_size, steps):
    spec = QuantSpec(granularity=granularity, group_size=group_size, scale="learned")
    layer = _layer(spec, bits=steps[0])
    quantizer = layer.weight_quantizer
    with torch.no_grad():
        quantizer.scale.mul_(torch.linspace(0.5, 1.0, quantizer.scale.numel()).reshape(quantizer.scale.shape))
    for old, new in zip(steps, steps[1:]):
        before, s_old = layer.quantize_weight().detach(), quantizer.scale.detach().clone()
        quantizer.set_bits(new)
        after, s_new = layer.quantize_weight().detach(), quantizer.scale.detach().clone()
        torch.testing.assert_close(s_new * levels(new), s_old * levels(old), rtol=1e-6, atol=0)  # the range stays
        # each is within half its step of the weight clipped to its range, and the ranges' ends differ by less
        # than a step of either (the top code is floor(2^(b-1)) - 1, not 2^(b-1) - 1, at fractional bits)
        allowed = (s_old + s_new) / 2 + torch.maximum(s_old, s_new)
        jump = (after - before).abs().reshape(*s_old.shape, -1).amax(dim=-1)
        assert bool((jump <= allowed * (1 + 1e-6)).all()), f"{old} -> {new}: {float((jump / allowed).max()):.3f}"
        assert float(quantizer.scale_bits) == new


def test_leaving_full_precision_and_coming_back_keeps_the_learned_scale():
    layer = _layer(QuantSpec(scale="learned"), bits=4)
    scale = layer.weight_quantizer.scale.detach().clone()
    layer.weight_quantizer.set_bits(None)
    layer.weight_quantizer.set_bits(4)
    assert torch.equal(layer.weight_quantizer.scale, scale)


def test_learned_scale_gets_a_gradient_and_the_weight_its_straight_through_one():
    layer = _layer(QuantSpec(scale="learned"), bits=4)
    layer(torch.randn(5, 32)).square().sum().backward()
    assert layer.weight_quantizer.scale.grad is not None
    assert bool(layer.weight_quantizer.scale.grad.abs().sum() > 0)
    assert layer.weight.grad is not None


def test_mse_clip_ratio_is_searched_again_only_when_the_bits_change():
    layer = _layer(QuantSpec(granularity="per_channel", scale="mse"), bits=4)
    quantizer = layer.weight_quantizer
    ratio4 = quantizer.clip_ratio.clone()
    assert set(ratio4.tolist()) <= set(torch.tensor(CLIP_RATIOS).tolist())
    assert float(ratio4.min()) < 1.0
    with torch.no_grad():
        layer.weight.mul_(2.0)  # a changed weight does not start a new search at the same width
    layer.quantize_weight()
    assert torch.equal(quantizer.clip_ratio, ratio4)
    quantizer.set_bits(8)
    layer.quantize_weight()
    assert float(quantizer.scale_bits) == 8.0
    assert bool((quantizer.clip_ratio >= ratio4).all()) and not torch.equal(quantizer.clip_ratio, ratio4)


@pytest.mark.parametrize("scale", ["mse", "learned"])
@pytest.mark.parametrize("granularity,group_size", GRANULARITIES, ids=GRANULARITY_IDS)
@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
def test_codes_times_scale_are_the_fake_quantized_weight_exactly(scale, granularity, group_size, scale_dtype):
    spec = QuantSpec(granularity=granularity, group_size=group_size, scale=scale, scale_dtype=scale_dtype)
    layer = _layer(spec, bits=4)
    with torch.no_grad():
        codes, scales, offset = layer.weight_codes()
        lo, hi = code_range(4, True, spec.rounding)
        assert codes.dtype == torch.int32 and int(codes.min()) >= lo and int(codes.max()) <= hi
        assert torch.equal(dequantize_codes(codes, scales, offset, spec), layer.quantize_weight())


@pytest.mark.parametrize("scale", ["mse", "learned"])
def test_scale_state_survives_a_state_dict_round_trip_bit_for_bit(scale):
    layer = _layer(QuantSpec(granularity="per_channel", scale=scale), bits=4.5)
    layer.weight_quantizer.set_bits(4)
    if scale == "learned":
        with torch.no_grad():
            layer.weight_quantizer.scale.mul_(0.9)  # as training would have moved it
    expected = layer.quantize_weight().detach()
    fresh = QuantLinear(32, 16, weight_bits=8, weight_spec=layer.weight_quantizer.spec)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.weight_bits == 4.0
    assert torch.equal(fresh.quantize_weight(), expected)
    fresh.weight_quantizer.set_bits(4)  # the schedule's callback re-applying the width changes nothing
    assert torch.equal(fresh.quantize_weight(), expected)


def test_a_learned_scale_is_a_parameter_of_the_layer_and_max_adds_none():
    learned = _layer(QuantSpec(granularity="per_channel", scale="learned"))
    names = {name for name, _ in learned.named_parameters()}
    assert names == {"weight", "bias", "weight_quantizer.scale"}
    assert learned.weight_quantizer.scale.shape == (16,)
    assert {name for name, _ in _layer(QuantSpec()).named_parameters()} == {"weight", "bias"}


def test_freeze_bakes_the_learned_quantized_weight_and_drops_the_scale():
    layer = _layer(QuantSpec(scale="learned"), bits=4)
    expected = layer.quantize_weight().detach()
    layer.freeze()
    assert torch.equal(layer.weight, expected)
    assert {name for name, _ in layer.named_parameters()} == {"weight", "bias"}
    with pytest.raises(RuntimeError, match="fixed"):
        layer.weight_quantizer.set_bits(3)


@pytest.mark.parametrize("scale", ["mse", "learned"])
def test_mse_and_learned_scales_refuse_the_asymmetric_range(scale):
    with pytest.raises(ValueError, match="symmetric"):
        QuantSpec(symmetric=False, scale=scale)


def test_an_unknown_scale_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="max, mse, learned"):
        QuantSpec(scale="minmax")
