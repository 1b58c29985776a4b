"""fake_quantize: bit-exact against a naive reference, its properties as bits fall, dtypes, and its errors."""

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from fraqat_cli.quant import QuantSpec, code_range, fake_quantize, validate_bits
from fraqat_cli.quant.fake_quant import quantize_to_codes
from fraqat_cli.quant.spec import ROUNDINGS

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

SPECS = st.sampled_from(
    [
        {"granularity": "per_tensor"},
        {"granularity": "per_channel"},
        {"granularity": "per_group", "group_size": 16},
    ]
)
# Quarter bits from 8 down to 2: the paper's schedule moves in quarter and half bits.
QUARTER_BIT_GRID = [8 - 0.25 * i for i in range(25)]


def naive_fake_quantize(x, bits, granularity, group_size, symmetric, rounding):
    """Round-and-clamp written from the paper's formulas, one scale (one row of `rows`) at a time, clamped to
    the b-bit integer range (asymmetric: every integer below 2^b): at integer bits for every rounding (the
    narrow grid never reaches the bounds' difference), at any bits for `nearest_int_range`, whose definition
    this clamp is."""
    assert bits == int(bits) or rounding == "nearest_int_range"
    if granularity == "per_tensor":
        rows = x.reshape(1, -1)
    elif granularity == "per_channel":
        rows = x.reshape(-1, x.shape[-1])
    else:
        rows = x.reshape(-1, group_size)
    round_ = torch.floor if rounding == "floor" else torch.round
    out = torch.empty_like(rows)
    for i, row in enumerate(rows):
        if symmetric:
            levels = 2.0 ** (bits - 1) - 1
            lowest, highest = -math.floor(2 ** (bits - 1)), math.floor(2 ** (bits - 1)) - 1
            span = row.abs().max()
            codes = round_(row / span * levels).clamp(lowest, highest)
            out[i] = codes * (span / levels)
        else:
            levels = 2.0**bits
            lowest, highest = 0, math.ceil(2**bits) - 1
            low = row.min()
            span = row.max() - low
            codes = round_((row - low) / span * levels).clamp(lowest, highest)
            out[i] = codes * (span / levels) + low
    return out.reshape(x.shape)


# ---------------------------------------------------------------------------------------------------------
# Independent reference at integer bits


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"{b}bit")
@pytest.mark.parametrize(
    "granularity, group_size",
    [("per_tensor", None), ("per_channel", None), ("per_group", 8)],
    ids=["per_tensor", "per_channel", "per_group8"],
)
def test_integer_bits_match_naive_round_and_clamp_exactly(granularity, group_size, bits, symmetric, rounding):
    x = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(bits))  # (3, 4, 32)
    got = fake_quantize(
        x, bits, granularity=granularity, group_size=group_size, symmetric=symmetric, rounding=rounding
    )
    want = naive_fake_quantize(x, bits, granularity, group_size, symmetric, rounding)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# The paper's example and fractional bits


# The paper's storage ranges are INT6 [-32, 31], INT5.5 [-22, 21], INT5 [-16, 15]; the narrow symmetric
# quantizer emits the codes of -max|x| and +max|x|, which at integer bits leaves out the lowest one.
@pytest.mark.parametrize(
    "bits, lowest, highest", [(6, -31, 31), (5.5, -22, 21), (5, -15, 15)], ids=["INT6", "INT5.5", "INT5"]
)
def test_code_range_matches_the_papers_example(bits, lowest, highest):
    assert code_range(bits, symmetric=True) == (lowest, highest)


def test_codes_at_five_and_a_half_bits_span_exactly_minus_22_to_21():
    x = torch.linspace(-1, 1, 10001)  # max|x| = 1, so codes = out * levels
    levels = 2.0**4.5 - 1
    codes = fake_quantize(x, 5.5, granularity="per_tensor", rounding="floor") * levels
    assert torch.allclose(codes, codes.round(), atol=1e-3)  # the codes are integers
    assert (codes.round().min().item(), codes.round().max().item()) == (-22, 21)


def test_codes_at_five_and_a_half_bits_with_nearest_rounding_span_minus_22_to_22():
    # METHOD.md: floor(+-21.63) gives [-22, 21]; "round-to-nearest would give [-22, 22]". Clamping the
    # nearest code of max|x| (22) to 21 saturates the top of the range: 0.97 max|x| instead of 1.02 max|x|.
    x = torch.linspace(-1, 1, 10001)
    levels = 2.0**4.5 - 1
    codes = (fake_quantize(x, 5.5, granularity="per_tensor", rounding="nearest") * levels).round()
    assert (codes.min().item(), codes.max().item()) == (-22, 22)


@pytest.mark.parametrize("bits", [5, 6], ids=["INT5", "INT6"])
def test_codes_at_integer_bits_stay_in_the_int_range_on_the_narrow_grid(bits):
    # The narrow symmetric range scales max|x| to 2^(b-1) - 1 exactly, so the lowest code -2^(b-1) of
    # the INT range ([-32, 31] at 6 bits) is never produced: codes span [-(2^(b-1) - 1), 2^(b-1) - 1].
    x = torch.linspace(-1, 1, 10001)
    levels = 2.0 ** (bits - 1) - 1
    codes = (fake_quantize(x, bits, granularity="per_tensor", rounding="floor") * levels).round()
    lowest, highest = code_range(bits, symmetric=True)
    assert lowest <= codes.min().item() and codes.max().item() <= highest
    assert (codes.min().item(), codes.max().item()) == (-levels, levels)


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
@pytest.mark.parametrize(
    "granularity, group_size",
    [("per_tensor", None), ("per_channel", None), ("per_group", 64)],
    ids=["per_tensor", "per_channel", "per_group64"],
)
@pytest.mark.parametrize(
    "below, fractional, above", [(5, 5.5, 6), (4.5, 4.75, 5), (4, 4.25, 4.5)], ids=["5.5", "4.75", "4.25"]
)
@pytest.mark.parametrize("data", ["gaussian", "uniform"])
def test_fractional_bits_lie_between_neighbours(
    data, below, fractional, above, granularity, group_size, symmetric, rounding
):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 512, generator=g) if data == "gaussian" else torch.rand(128, 512, generator=g) * 2 - 1

    def error(bits):
        out = fake_quantize(
            w, bits, granularity=granularity, group_size=group_size, symmetric=symmetric, rounding=rounding
        )
        return (out - w).square().mean().item()

    assert error(above) < error(fractional) < error(below)


# ---------------------------------------------------------------------------------------------------------
# The third reading: round to nearest, clamp to the b-bit integer range (`nearest_int_range`)


@pytest.mark.parametrize(
    "bits, lowest, highest", [(6, -32, 31), (5.5, -22, 21), (5, -16, 15)], ids=["INT6", "INT5.5", "INT5"]
)
def test_nearest_int_range_bounds_are_the_papers_three_ranges(bits, lowest, highest):
    assert code_range(bits, symmetric=True, rounding="nearest_int_range") == (lowest, highest)


def test_nearest_int_range_codes_at_five_and_a_half_bits_span_exactly_minus_22_to_21():
    x = torch.linspace(-1, 1, 10001)
    levels = 2.0**4.5 - 1
    codes = (fake_quantize(x, 5.5, granularity="per_tensor", rounding="nearest_int_range") * levels).round()
    assert (codes.min().item(), codes.max().item()) == (-22, 21)


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
@pytest.mark.parametrize("bits", [7.5, 5.5, 4.75, 4.25, 3.5, 2.5], ids=lambda b: f"{b}bit")
@pytest.mark.parametrize(
    "granularity, group_size",
    [("per_tensor", None), ("per_channel", None), ("per_group", 8)],
    ids=["per_tensor", "per_channel", "per_group8"],
)
def test_nearest_int_range_matches_naive_round_and_clamp_at_fractional_bits(granularity, group_size, bits, symmetric):
    x = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(int(bits * 4)))  # (3, 4, 32)
    got = fake_quantize(x, bits, granularity=granularity, group_size=group_size, symmetric=symmetric,
                        rounding="nearest_int_range")
    want = naive_fake_quantize(x, bits, granularity, group_size, symmetric, "nearest_int_range")
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    bits=st.floats(2, 16),
    spec=SPECS,
    symmetric=st.booleans(),
)
def test_nearest_int_range_is_nearest_clamped_to_the_integer_range(seed, bits, spec, symmetric):
    # Same rounding, tighter or equal clamp: codes equal nearest's wherever those fit the b-bit integer range,
    # and sit on its bound where they do not; at integer bits the two are the same quantizer.
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(seed))  # (8, 32)
    nearest, scale, offset = quantize_to_codes(x, bits, QuantSpec(**spec, symmetric=symmetric, rounding="nearest"))
    got, got_scale, got_offset = quantize_to_codes(
        x, bits, QuantSpec(**spec, symmetric=symmetric, rounding="nearest_int_range")
    )
    lowest, highest = code_range(bits, symmetric, "nearest_int_range")
    assert torch.equal(got, nearest.clamp(lowest, highest))
    assert torch.equal(got_scale, scale) and (offset is None or torch.equal(got_offset, offset))
    if bits == int(bits):
        assert torch.equal(got, nearest)


# The numbers: a 256 x 256 N(0, 1) matrix at 4 bits, per tensor: floor's mean error -0.33 and RMS 0.377,
# round-to-nearest's 0.001 and 0.188. The step is max|x| / 7, about 0.67; floor moves every value down by half
# of it on average (uniform error in (-step, 0]), nearest spreads the error evenly around 0 (RMS step / sqrt(12)).
@pytest.mark.parametrize("bits", [4, 4.25, 5.5], ids=lambda b: f"{b}bit")
def test_round_to_nearest_readings_are_unbiased_and_halve_floors_rms_error(bits):
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    step = w.abs().max().item() / (2 ** (bits - 1) - 1)

    def mean_and_rms(rounding):
        error = fake_quantize(w, bits, granularity="per_tensor", rounding=rounding) - w
        return error.mean().item(), error.square().mean().sqrt().item()

    floor_mean, floor_rms = mean_and_rms("floor")
    assert floor_mean == pytest.approx(-step / 2, rel=0.05)
    assert floor_rms == pytest.approx(step / math.sqrt(3), rel=0.05)
    for rounding in ("nearest", "nearest_int_range"):
        mean, rms = mean_and_rms(rounding)
        assert abs(mean) < 0.01 * step, f"{rounding}: mean error {mean:.4f}, step {step:.3f}"
        assert rms == pytest.approx(step / math.sqrt(12), rel=0.05)
        assert 0.45 < rms / floor_rms < 0.55


# ---------------------------------------------------------------------------------------------------------
# Properties


@settings(max_examples=60, deadline=None)
@given(
    w=arrays(
        np.float32,
        array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=48),
        elements=st.floats(-1e4, 1e4, width=32),
    ),
    bits=st.integers(2, 8),
    rounding=st.sampled_from(ROUNDINGS),
)
def test_integer_bits_give_at_most_2_pow_b_levels_per_row(w, bits, rounding):
    out = fake_quantize(torch.from_numpy(w), bits, granularity="per_channel", symmetric=True, rounding=rounding)
    for row in out:
        assert len(torch.unique(row)) <= 2**bits


def _mean_levels_per_scale(out, granularity, group_size):
    """Distinct values per unit that shares one scale, averaged over the units."""
    if granularity == "per_tensor":
        units = out.reshape(1, -1)
    elif granularity == "per_channel":
        units = out
    else:
        units = out.reshape(-1, group_size)
    sorted_units = units.sort(dim=-1).values
    return ((sorted_units.diff(dim=-1) != 0).sum(dim=-1) + 1).float().mean().item()


# Monotonicity is a statement about large tensors, not every tensor: a few values can gain a level when b
# falls because the grid shifts under them (floor(0.34 * 3) == floor(0.66 * 3) share one code at 3 levels,
# floor(0.34 * 2.9) != floor(0.66 * 2.9) split at 2.9). So each example is a 4 x 4096 tensor of i.i.d.
# uniform values (random scale and offset): dense enough that every code in range is used, which makes the
# level count the size of the code range and the error the step's, both monotone in b up to sampling noise
# far below the gap between quarter bits. (Rows of very different scales under one per-tensor scale are not
# dense near zero at low bits, and the asymmetric grid's phase there moves with b: not a fair test.)
# nearest_int_range is held to it from 8 down to 3 bits: below, its clamp can cost more than the finer grid
# gains (at 2.5 bits the top code is 1 where the grid reaches 1.83; see the test after this one).
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["narrow_symmetric", "wide_asymmetric"])
# Phases without shrinking: a failure prints its 4 x 4096 example as drawn, at once.
@settings(max_examples=12, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(
    seed=st.integers(0, 2**31 - 1),
    spec=st.sampled_from([("per_tensor", None), ("per_channel", None), ("per_group", 1024)]),
    offset=st.floats(-1.0, 1.0),
    scale=st.floats(0.01, 100.0),
)
@example(seed=0, spec=("per_channel", None), offset=0.0, scale=1.0)  # centred, like most weights
@example(seed=0, spec=("per_channel", None), offset=1.0, scale=1.0)  # one-sided, like post-activation inputs
def test_levels_and_error_move_monotonically_as_bits_fall(symmetric, rounding, seed, spec, offset, scale):
    granularity, group_size = spec
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(4, 4096, generator=g) * 2 - 1 + offset) * scale  # (4, 4096)
    grid = [b for b in QUARTER_BIT_GRID if b >= 3 or rounding != "nearest_int_range"]
    levels, errors = [], []
    for bits in grid:
        out = fake_quantize(
            w, bits, granularity=granularity, group_size=group_size, symmetric=symmetric, rounding=rounding
        )
        levels.append(_mean_levels_per_scale(out, granularity, group_size))
        errors.append((out - w).square().mean().item())
    for i in range(1, len(grid)):
        at = f"{grid[i - 1]:g} -> {grid[i]:g} bits"
        assert levels[i] <= levels[i - 1], f"levels rose at {at}: {levels[i - 1]} -> {levels[i]}"
        assert errors[i] >= errors[i - 1] * (1 - 1e-6), f"error fell at {at}: {errors[i - 1]} -> {errors[i]}"


@pytest.mark.parametrize(
    "bits, nearest_top, clamped_top", [(5.5, 22, 21), (4.25, 9, 8), (2.5, 2, 1)], ids=["5.5", "4.25", "2.5"]
)
def test_nearest_int_range_clips_the_top_where_2_pow_b_minus_1_has_a_large_fraction(bits, nearest_top, clamped_top):
    # The price of the signed range: the narrow grid reaches 2^(b-1) - 1 (21.63 at 5.5 bits), whose nearest code
    # can exceed floor(2^(b-1)) - 1. The values that clip are those above (top - 0.5) / (2^(b-1) - 1) of max|x|:
    # 0.6% of the range at 5.5 bits, 0.1% at 4.25, 18% at 2.5.
    x = torch.linspace(-1, 1, 20001)  # max|x| = 1
    levels = 2.0 ** (bits - 1) - 1
    codes = {r: (fake_quantize(x, bits, granularity="per_tensor", rounding=r) * levels).round()
             for r in ("nearest", "nearest_int_range")}
    assert codes["nearest"].max().item() == nearest_top and codes["nearest_int_range"].max().item() == clamped_top
    clipped = (codes["nearest"] != codes["nearest_int_range"]).float().mean().item() * 2  # share of [0, 1]
    assert clipped == pytest.approx(1 - (clamped_top + 0.5) / levels, abs=1e-3)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    bits=st.floats(2, 16),
    spec=SPECS,
    symmetric=st.booleans(),
    rounding=st.sampled_from(ROUNDINGS),
)
def test_weight_gradient_passes_straight_through_everywhere(seed, bits, spec, symmetric, rounding):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 32, generator=g).requires_grad_()
    upstream = torch.randn(4, 32, generator=g)
    fake_quantize(x, bits, symmetric=symmetric, rounding=rounding, **spec).backward(upstream)
    assert torch.equal(x.grad, upstream)


def _grid(bits, symmetric, rounding, low, high):
    """(lowest grid value, highest grid value, step) of a static range, from the paper's formulas, or the signed
    b-bit integer range for symmetric `nearest_int_range`."""
    if symmetric:
        span = max(abs(low), abs(high))
        levels = 2 ** (bits - 1) - 1
        if rounding == "nearest_int_range":
            lowest, highest = -math.floor(2 ** (bits - 1)), math.floor(2 ** (bits - 1)) - 1
        else:
            round_ = math.floor if rounding == "floor" else round
            lowest, highest = round_(-levels), round_(levels)
        return lowest * span / levels, highest * span / levels, span / levels
    step = (high - low) / 2**bits
    return low, low + (math.ceil(2**bits) - 1) * step, step


# "In range" is the quantizer's grid (the clamp leaves the code alone), as in torch's and AIMET's fake
# quantization; "outside" is two steps or more beyond the calibrated range. Narrow symmetric ranges at
# integer bits contain the whole calibrated [-span, span]; the wide asymmetric range (scale (max - min) / 2^b,
# codes below 2^b) may stop up to one step below the calibrated max, so that top step is neither: not asserted.
@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    bits=st.floats(2, 16),
    symmetric=st.booleans(),
    rounding=st.sampled_from(ROUNDINGS),
    low=st.floats(-10, -0.1),
    high=st.floats(0.1, 10),
)
def test_static_range_gradient_is_identity_inside_and_zero_outside(seed, bits, symmetric, rounding, low, high):
    g = torch.Generator().manual_seed(seed)
    grid_low, grid_high, step = _grid(bits, symmetric, rounding, low, high)
    range_low, range_high = (-max(-low, high), max(-low, high)) if symmetric else (low, high)
    inside = grid_low + step / 4 + torch.rand(64, generator=g, dtype=torch.float64) * (grid_high - grid_low)
    beyond = step * 2 + torch.rand(64, generator=g, dtype=torch.float64) * 10
    x = torch.cat([inside, range_low - beyond, range_high + beyond]).float().requires_grad_()  # (192,)
    value_range = (torch.tensor(low), torch.tensor(high))
    out = fake_quantize(
        x, bits, granularity="per_tensor", symmetric=symmetric, rounding=rounding,
        value_range=value_range, clip_gradient=True,
    )
    out.sum().backward()
    assert torch.equal(x.grad[:64], torch.ones(64)), "gradient blocked inside the grid"
    assert torch.equal(x.grad[64:], torch.zeros(128)), "gradient leaked outside the range"


def test_static_narrow_range_at_8_bits_passes_the_whole_calibrated_range():
    x = torch.linspace(-3.0, 3.0, 601).requires_grad_()  # the calibrated range is [-2, 2]
    value_range = (torch.tensor(-2.0), torch.tensor(2.0))
    fake_quantize(
        x, 8, granularity="per_tensor", rounding="nearest", value_range=value_range, clip_gradient=True
    ).sum().backward()
    inside = x.detach().abs() <= 2.0
    assert torch.equal(x.grad[inside], torch.ones(int(inside.sum())))
    assert torch.equal(x.grad[x.detach().abs() >= 2.05], torch.zeros(int((x.detach().abs() >= 2.05).sum())))


@settings(max_examples=30, deadline=None)
@given(
    bits=st.one_of(st.none(), st.floats(min_value=32, allow_nan=False)),
    w=arrays(np.float32, array_shapes(min_dims=1, max_dims=3), elements=st.floats(width=32)),
    spec=SPECS,
)
def test_thirty_two_bits_or_more_or_none_pass_the_tensor_through_untouched(bits, w, spec):
    x = torch.from_numpy(w)
    assert fake_quantize(x, bits, **spec) is x


# ---------------------------------------------------------------------------------------------------------
# dtypes and devices

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "spec",
    [{"granularity": "per_tensor"}, {"granularity": "per_channel"}, {"granularity": "per_group", "group_size": 16}],
    ids=["per_tensor", "per_channel", "per_group16"],
)
def test_output_keeps_shape_and_dtype_and_is_computed_in_float32(spec, dtype, device):
    x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    out = fake_quantize(x, 4.5, **spec)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    torch.testing.assert_close(out, fake_quantize(x.float(), 4.5, **spec).to(dtype), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Errors name the bad value


@pytest.mark.parametrize(
    "bits, named",
    [
        (1.5, "1.5"),
        (17, "17"),
        (20, "20"),
        (-math.inf, "-inf"),
        (math.nan, "NaN"),
        ("eight", "'eight'"),
        ([8], r"\[8\]"),
        # Non-numbers, even when float() would parse them: validate_bits promises ValueError for non-numbers.
        ("4", "'4'"),
        (True, "True"),
    ],
    ids=["1.5", "17", "20", "-inf", "nan", "word", "list", "numeric_string", "bool"],
)
def test_bad_bits_raise_value_error_naming_the_value(bits, named):
    with pytest.raises(ValueError, match=named):
        validate_bits(bits)
    with pytest.raises(ValueError, match=named):
        fake_quantize(torch.ones(2, 4), bits)


def test_unknown_granularity_raises_naming_it():
    with pytest.raises(ValueError, match="'per_row'"):
        fake_quantize(torch.ones(2, 4), 4, granularity="per_row")


def test_unknown_rounding_raises_naming_it_and_the_choices():
    with pytest.raises(ValueError, match="'stochastic'.*floor, nearest, nearest_int_range"):
        fake_quantize(torch.ones(2, 4), 4, rounding="stochastic")


def test_group_size_that_does_not_divide_the_row_raises_naming_it():
    with pytest.raises(ValueError, match=re.escape("group_size=3 does not divide the row length 10")):
        fake_quantize(torch.ones(2, 10), 4, granularity="per_group", group_size=3)


@pytest.mark.parametrize("group_size", [None, 0, -4, 2.5], ids=["none", "zero", "negative", "float"])
def test_per_group_needs_a_positive_integer_group_size(group_size):
    with pytest.raises(ValueError, match=re.escape(repr(group_size))):
        QuantSpec(granularity="per_group", group_size=group_size)


def test_group_size_without_per_group_raises():
    with pytest.raises(ValueError, match="group_size=16"):
        QuantSpec(granularity="per_channel", group_size=16)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool], ids=str)
def test_non_float_tensor_raises_naming_its_dtype(dtype):
    with pytest.raises(ValueError, match=re.escape(str(dtype))):
        fake_quantize(torch.ones(2, 4, dtype=dtype), 4)


def test_fixed_value_range_needs_per_tensor_granularity():
    with pytest.raises(ValueError, match="'per_channel'"):
        fake_quantize(torch.ones(2, 4), 8, value_range=(torch.tensor(-1.0), torch.tensor(1.0)))
