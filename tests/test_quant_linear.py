"""QuantLinear: a drop-in nn.Linear with fake-quantized weight and input, and its run-time bit-width."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from fraqat_cli.quant import QuantLinear, QuantSpec, calibrate_activations, fake_quantize
from fraqat_cli.quant.spec import ROUNDINGS

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

BITS = st.one_of(st.floats(2, 16), st.sampled_from([4, 4.25, 5.5, 8, None, 32]))


def _linear(in_features=32, out_features=16, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


def _inputs(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_from_linear_shares_the_parameters(bias):
    linear = _linear(bias=bias)
    layer = QuantLinear.from_linear(linear, weight_bits=4)
    assert layer.weight is linear.weight
    assert layer.bias is linear.bias
    assert {id(p) for p in layer.parameters()} == {id(p) for p in linear.parameters()}
    with torch.no_grad():
        linear.weight.add_(1.0)  # an update through either name is seen by both
    assert torch.equal(layer.weight, linear.weight)


@pytest.mark.parametrize("weight_bits", [32, None, 40], ids=["32", "none", "40"])
def test_full_precision_quant_linear_equals_the_linear_exactly(weight_bits):
    linear = _linear()
    layer = QuantLinear.from_linear(linear, weight_bits=weight_bits, activation_bits=None)
    x = _inputs(3, 7, 32)  # (B, T, in)
    assert torch.equal(layer(x), linear(x))


@pytest.mark.parametrize("rounding", [None, *ROUNDINGS], ids=["default", *ROUNDINGS])
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
def test_quant_linear_computes_linear_of_quantized_input_and_weight(symmetric, rounding):
    linear = _linear()
    chosen = {"rounding": rounding} if rounding else {}  # None: QuantSpec's and fake_quantize's defaults agree
    weight_spec = QuantSpec(granularity="per_group", group_size=8, symmetric=symmetric, **chosen)
    layer = QuantLinear.from_linear(linear, weight_spec=weight_spec, weight_bits=5.5, activation_bits=8)
    x = _inputs(3, 32)
    want = nn.functional.linear(
        fake_quantize(x, 8, granularity="per_tensor", rounding="nearest"),  # activations round to nearest
        fake_quantize(linear.weight, 5.5, granularity="per_group", group_size=8, symmetric=symmetric, **chosen),
        linear.bias,
    )
    assert torch.equal(layer(x), want)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_to_linear_holds_the_fake_quantized_weight(bias):
    linear = _linear(bias=bias)
    layer = QuantLinear.from_linear(linear, weight_bits=4, activation_bits=None)
    plain = layer.to_linear()
    assert type(plain) is nn.Linear
    assert torch.equal(plain.weight, fake_quantize(linear.weight, 4))
    assert not torch.equal(plain.weight, linear.weight)
    assert plain.weight is not layer.weight  # a copy: the trained full-precision weight stays untouched
    if bias:
        assert torch.equal(plain.bias, linear.bias)
    else:
        assert plain.bias is None
    x = _inputs(5, 32)
    assert torch.equal(plain(x), layer(x))


def test_set_bits_changes_the_output_without_rebuilding_the_layer():
    layer = QuantLinear.from_linear(_linear(), weight_bits=8, activation_bits=None)
    x = _inputs(5, 32)
    weight, out_8 = layer.weight, layer(x)
    layer.weight_quantizer.set_bits(4)
    out_4 = layer(x)
    assert layer.weight is weight and layer.weight_bits == 4.0
    assert not torch.equal(out_4, out_8)
    assert torch.equal(out_4, nn.functional.linear(x, fake_quantize(weight, 4), layer.bias))


def test_bits_buffers_are_in_the_state_dict():
    layer = QuantLinear.from_linear(_linear(), weight_bits=4.5, activation_bits=8)
    state = layer.state_dict()
    assert state["weight_quantizer.bits"].item() == 4.5
    assert state["input_quantizer.bits"].item() == 8.0
    layer.weight_quantizer.set_bits(None)
    assert layer.state_dict()["weight_quantizer.bits"].item() == 32.0


@settings(max_examples=40, deadline=None)
@given(saved_bits=BITS, fresh_bits=BITS, activation_bits=st.sampled_from([8, 6.5, None]))
@example(saved_bits=5.3, fresh_bits=8, activation_bits=None)  # a smooth schedule's bits: not a float32
def test_bits_restored_from_a_state_dict_give_bit_identical_outputs(saved_bits, fresh_bits, activation_bits):
    saved = QuantLinear.from_linear(_linear(seed=0), weight_bits=saved_bits, activation_bits=activation_bits)
    fresh = QuantLinear.from_linear(_linear(seed=1), weight_bits=fresh_bits, activation_bits=4)
    fresh.load_state_dict(saved.state_dict())
    x = _inputs(4, 32)
    torch.testing.assert_close(fresh(x), saved(x), atol=0, rtol=0)
    assert fresh.weight_bits == saved.weight_bits
    assert fresh.input_quantizer.current_bits == saved.input_quantizer.current_bits


# ---------------------------------------------------------------------------------------------------------
# Static activation ranges


def _static_layer():
    return QuantLinear.from_linear(_linear(), weight_bits=4, activation_bits=8, static_activations=True)


def test_calibration_sets_static_range_to_mean_plus_minus_three_std():
    layer = _static_layer()
    batches = [_inputs(4, 32, seed=s) * (s + 1) + s for s in range(3)]  # different mean and spread per batch
    with calibrate_activations(layer):
        for batch in batches:
            assert torch.equal(layer(batch), nn.functional.linear(batch, fake_quantize(layer.weight, 4), layer.bias))
    seen = torch.cat([b.reshape(-1) for b in batches]).double()
    # Population std (divide by n) over every value seen, as the layer accumulates it across batches.
    mean, std = seen.mean().item(), seen.std(correction=0).item()
    quantizer = layer.input_quantizer
    assert quantizer.range_min.item() == pytest.approx(mean - 3 * std, rel=1e-6)
    assert quantizer.range_max.item() == pytest.approx(mean + 3 * std, rel=1e-6)


def test_calibrated_layer_quantizes_inputs_to_the_fixed_range():
    layer = _static_layer()
    with calibrate_activations(layer):
        layer(_inputs(16, 32, seed=2))
    x = _inputs(5, 32, seed=3) * 10  # wider than the calibration data: clipped to the fixed range
    value_range = (layer.input_quantizer.range_min, layer.input_quantizer.range_max)
    want = nn.functional.linear(
        fake_quantize(x, 8, granularity="per_tensor", rounding="nearest", value_range=value_range),
        fake_quantize(layer.weight, 4),
        layer.bias,
    )
    assert torch.equal(layer(x), want)


def test_static_layer_before_calibration_raises_a_clear_error():
    with pytest.raises(RuntimeError, match="calibrat"):
        _static_layer()(_inputs(2, 32))


def test_calibrating_a_model_without_static_quantizers_raises():
    dynamic = QuantLinear.from_linear(_linear(), weight_bits=4)
    with pytest.raises(ValueError, match="no static activation quantizer"):
        with calibrate_activations(dynamic):
            pass


def test_static_activations_need_per_tensor_granularity():
    with pytest.raises(ValueError, match="'per_channel'"):
        QuantLinear(32, 16, activation_spec=QuantSpec(granularity="per_channel"), static_activations=True)
