"""How to fake-quantize: the FraQAT quantizer as one pure function.

Symmetric (narrow) range, after the paper:
    codes = R(x / max|x| * (2^(b-1) - 1)) clamped to code_range(b, True, R)
    out   = codes * max|x| / (2^(b-1) - 1)
Asymmetric (wide) range:
    codes = R((x - min) / (max - min) * 2^b) clamped to code_range(b, False, R)
    out   = codes * (max - min) / 2^b + min
`b` may be fractional: the codes stay integers and the scale shrinks smoothly.
R and the clamp come in three kinds (`code_range` has the bounds):
- `floor`: round down; clamp to the codes of the range's own extremes. At b = 5.5
  the symmetric codes span [-22, 21], the paper's example, but every value moves
  down by half a step on average.
- `nearest`: round to nearest; the same kind of clamp, [-22, 22] at 5.5 bits, so a
  fractional level count never clips the top of the range.
- `nearest_int_range`: round to nearest, then clamp symmetric codes to the range of a
  signed b-bit integer, [-floor(2^(b-1)), floor(2^(b-1)) - 1] ([-22, 21] at 5.5 bits, as
  the paper); values at the very top lose one code against `nearest` when 2^(b-1) has a
  fractional part >= 0.5 (5.5 and 4.25 bits). Asymmetric codes are `nearest`'s: the wide
  range's scale (max - min) / 2^b already leaves its top up to a step short, and the
  unsigned range [0, floor(2^b) - 1] would clip up to two steps, enough to make the error
  at 4.5 bits exceed that at 4.25 on uniform data.
At integer b the three emit codes within the paper's [-(2^(b-1) - 1), 2^(b-1) - 1]
and [0, 2^b - 1], and the two nearest kinds emit identical codes.
Dividing by the range before multiplying by the level count keeps the extreme
values exactly on a code: x / max|x| is exactly +-1 there, which floor rounding
would otherwise turn into the code below.
"""

from __future__ import annotations

import math

import torch

from fraqat_cli.quant.spec import PASS_THROUGH_BITS, QuantSpec, validate_bits
from fraqat_cli.quant.ste import StraightThrough

# Smallest positive float32; keeps an all-zero tensor (or group) from dividing by zero.
SMALLEST_SPAN = torch.finfo(torch.float32).tiny
# float16's largest finite value and smallest positive (subnormal) value: the range a float16 scale can take.
HALF_MAX = torch.finfo(torch.float16).max
HALF_TINIEST = 2.0**-24


def code_range(bits: float, symmetric: bool, rounding: str = "floor") -> tuple[int, int]:
    """The clamp bounds of a `bits`-bit quantizer's integer codes, as (lowest, highest).

    `floor` and `nearest`, symmetric: the codes of -max|x| and +max|x|; asymmetric: every
    integer below 2^b (the paper's 2^b - 1 at integer b), so max(x) is clipped by at most one
    step. `nearest_int_range`, symmetric: the signed b-bit integer range, whose lowest code the
    narrow grid reaches only when 2^(b-1) has a fractional part >= 0.5 (never at integer b: INT6
    codes stop at -31 of [-32, 31]); asymmetric: as `nearest`. The default, floor, gives at integer
    bits the narrow range that every rounding's codes lie in there (storage checks codes against it).
    """
    if symmetric and rounding == "nearest_int_range":
        half = math.floor(2.0 ** (bits - 1))
        return -half, half - 1
    if symmetric:
        levels = 2.0 ** (bits - 1) - 1
        round_ = math.floor if rounding == "floor" else round
        return round_(-levels), round_(levels)
    return 0, math.ceil(2.0**bits) - 1


def _grouped_view(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Reshape so that each scale covers exactly the last dimension of the view."""
    if spec.granularity == "per_tensor":
        return x.reshape(1, -1)
    if x.dim() == 0:
        return x.reshape(1, 1)
    if spec.granularity == "per_channel":
        return x
    length = x.shape[-1]
    if length % spec.group_size:
        raise ValueError(
            f"group_size={spec.group_size} does not divide the row length {length} of a tensor of shape "
            f"{tuple(x.shape)}; allowed: a divisor of {length}"
        )
    return x.reshape(*x.shape[:-1], length // spec.group_size, spec.group_size)


def grid_of(bits: float, spec: QuantSpec) -> tuple[float, int, int]:
    """(levels, lowest code, highest code) at `bits`: levels is what the range is divided into, 2^(b-1) - 1
    symmetric and 2^b asymmetric; the codes are `code_range`'s. Python numbers, so eager code never reads a
    device; `quant/traced.py` computes the same three as tensors from the `bits` buffer, for torch.compile."""
    lo_code, hi_code = code_range(bits, spec.symmetric, spec.rounding)
    return (2.0 ** (bits - 1) - 1 if spec.symmetric else 2.0**bits), lo_code, hi_code


def _codes_view(
    view: torch.Tensor,
    grid: tuple,
    spec: QuantSpec,
    value_range: tuple[torch.Tensor, torch.Tensor] | None,
    want_mask: bool,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Integer codes (as floats) of a float32/float64 view whose last dimension shares one scale.

    `grid`: `grid_of(bits, spec)`, as numbers or as 0-d tensors (the same arithmetic either way).
    Returns (codes, scale, offset, mask): the dequantized value is `codes * scale (+ offset)`, which
    is exactly what `_quantize_view` returns, so exported integer codes reproduce the fake-quantized
    tensor bit for bit. `offset` is None for the symmetric range.

    Speed: the view is read-only (it may be the caller's tensor), so `ratio` is the
    one full-size allocation; every later pass works in place on it. max|x| comes
    from amax and amin rather than abs(), which would allocate another copy.
    """
    levels, lo_code, hi_code = grid
    if scale is not None:
        return _codes_at_scale(view, scale, spec, want_mask, (lo_code, hi_code))
    if spec.scale_dtype == "float16":
        return _codes_on_half_grid(view, grid, spec, value_range, want_mask)
    if spec.symmetric:
        if value_range is None:
            low, high = view.amin(dim=-1, keepdim=True), view.amax(dim=-1, keepdim=True)
        else:
            low, high = value_range
        span = torch.maximum(low.abs(), high.abs()).to(view.dtype).clamp_min_(SMALLEST_SPAN)
        ratio = torch.div(view, span)  # (..., G) in [-1, 1] for in-range values
        offset = None
    else:
        if value_range is None:
            low, high = view.amin(dim=-1, keepdim=True), view.amax(dim=-1, keepdim=True)
        else:
            low, high = (v.to(view.dtype) for v in value_range)
        span = (high - low).clamp_min_(SMALLEST_SPAN)
        ratio = torch.sub(view, low).div_(span)  # (..., G) in [0, 1] for in-range values
        offset = low
    codes = ratio.mul_(levels)
    codes = codes.floor_() if spec.rounding == "floor" else codes.round_()
    mask = (codes >= lo_code) & (codes <= hi_code) if want_mask else None
    return codes.clamp_(lo_code, hi_code), span / levels, offset, mask


def _on_half_grid(t: torch.Tensor) -> torch.Tensor:
    """`t` rounded to the nearest float16 (kept in its dtype), within float16's finite range."""
    return t.clamp(-HALF_MAX, HALF_MAX).to(torch.float16).to(t.dtype)


def _codes_on_half_grid(view, grid, spec, value_range, want_mask):
    """`_codes_view` for `scale_dtype="float16"`: the scale span/levels (and the asymmetric offset, the range's
    minimum) rounded to float16 first, the codes then taken against it: round(x / scale), clamped as usual.
    codes * scale is exact in float32 for codes of up to 13 bits (times an 11-bit mantissa: 24 bits; GGUF's go
    to 8), so a reader that multiplies the same fp16 scale by the same code in float32 gets the student's weight
    bit for bit (and adds the same fp16 offset in float32, as `dequantize_codes` does)."""
    levels, lo_code, hi_code = grid
    low, high = (view.amin(dim=-1, keepdim=True), view.amax(dim=-1, keepdim=True)) if value_range is None \
        else (v.to(view.dtype) for v in value_range)
    if spec.symmetric:
        offset = None
        span = torch.maximum(low.abs(), high.abs()).clamp_min_(SMALLEST_SPAN)
        scale = _on_half_grid(span / levels).clamp_min_(HALF_TINIEST)
        codes = torch.div(view, scale)  # (..., G)
    else:
        offset = _on_half_grid(low)
        scale = _on_half_grid((high - low).clamp_min_(SMALLEST_SPAN) / levels).clamp_min_(HALF_TINIEST)
        codes = torch.sub(view, offset).div_(scale)  # (..., G)
    codes = codes.floor_() if spec.rounding == "floor" else codes.round_()
    mask = (codes >= lo_code) & (codes <= hi_code) if want_mask else None
    return codes.clamp_(lo_code, hi_code), scale, offset, mask


def _codes_at_scale(view, scale, spec, want_mask, bounds):
    """`_codes_view` at a given symmetric scale (a learned or clip-searched one; quant/scales.py), one entry per
    scale group (the view's shape but its last dimension): R(x / scale), clamped. The scale is used as given,
    already on the float16 grid when `spec.scale_dtype` asks for it."""
    lo_code, hi_code = bounds
    scale = scale.to(view.dtype).reshape(*view.shape[:-1], 1)
    codes = torch.div(view, scale)  # (..., G)
    codes = codes.floor_() if spec.rounding == "floor" else codes.round_()
    mask = (codes >= lo_code) & (codes <= hi_code) if want_mask else None
    return codes.clamp_(lo_code, hi_code), scale, None, mask


def _quantize_view(
    view: torch.Tensor,
    grid: tuple,
    spec: QuantSpec,
    value_range: tuple[torch.Tensor, torch.Tensor] | None,
    want_mask: bool,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fake-quantize a view whose last dimension shares one scale: its codes, dequantized in place."""
    codes, scale, offset, mask = _codes_view(view, grid, spec, value_range, want_mask, scale)
    out = codes.mul_(scale)
    if offset is not None:
        out = out.add_(offset)
    return out, mask


def quantize_to_codes(
    x: torch.Tensor, bits: float, spec: QuantSpec, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The integer codes behind `fake_quantize_spec(x, bits, spec)`: (codes, scale, offset).

    codes: int32, shape of `x`, within `code_range(bits, ...)`. scale and offset
    (None when symmetric): float32, one per scale group, shaped (1,) per tensor,
    (rows,) per channel, (rows, groups) per group. `dequantize_codes` inverts it
    exactly. For deployment, where only integer bit-widths make sense. `scale` (symmetric only, shaped as
    the returned scale): a learned or clip-searched scale to take the codes at instead of max|x| / levels;
    a layer's quantizer passes its own (`FakeQuantizer.codes`).
    """
    bits = validate_bits(bits)
    if bits >= PASS_THROUGH_BITS:
        raise ValueError("quantize_to_codes needs a bit-width in [2, 16]; got full precision (32 / None)")
    if x.dim() != 2 and spec.granularity != "per_tensor":
        raise ValueError(f"per-channel and per-group codes need a 2-D weight; got shape {tuple(x.shape)}")
    view = _grouped_view(x.detach().float(), spec)
    fixed = scale.detach().float() if scale is not None else None
    codes, scale, offset, _ = _codes_view(view, grid_of(bits, spec), spec, None, want_mask=False, scale=fixed)
    shape = (1,) if spec.granularity == "per_tensor" else tuple(view.shape[:-1])
    flat = lambda t: t.reshape(shape).float().contiguous()  # noqa: E731
    return codes.reshape(x.shape).to(torch.int32), flat(scale), (flat(offset) if offset is not None else None)


def dequantize_codes(
    codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, spec: QuantSpec
) -> torch.Tensor:
    """float32 values of integer codes: `codes * scale (+ offset)`, in the order `fake_quantize` computes."""
    view = _grouped_view(codes.float(), spec)
    shape = (*view.shape[:-1], 1) if spec.granularity != "per_tensor" else (1, 1)
    out = view.mul(scale.reshape(shape))
    if offset is not None:
        out = out.add_(offset.reshape(shape))
    return out.reshape(codes.shape)


def fake_quantize(
    x: torch.Tensor,
    bits: float | None,
    *,
    granularity: str = "per_channel",
    group_size: int | None = None,
    symmetric: bool = True,
    rounding: str = "nearest_int_range",
    value_range: tuple[torch.Tensor, torch.Tensor] | None = None,
    clip_gradient: bool = False,
) -> torch.Tensor:
    """Quantize-dequantize `x` to `bits` bits; same shape and dtype, straight-through gradient.

    bits: a real number in [2, 16]; None or >= 32 returns `x` itself.
    value_range: fixed (min, max) instead of the tensor's own, for calibrated
    static activation ranges (per-tensor: 0-d tensors).
    clip_gradient: zero the gradient where `x` fell outside the range.
    """
    return fake_quantize_spec(
        x,
        bits,
        QuantSpec(granularity=granularity, group_size=group_size, symmetric=symmetric, rounding=rounding),
        value_range=value_range,
        clip_gradient=clip_gradient,
    )


def fake_quantize_spec(
    x: torch.Tensor,
    bits: float | None,
    spec: QuantSpec,
    *,
    value_range: tuple[torch.Tensor, torch.Tensor] | None = None,
    clip_gradient: bool = False,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """`fake_quantize` for callers that already hold a validated `QuantSpec`. `scale`: a fixed symmetric scale
    per scale group (no gradient flows to it; `quantize_to_codes` says its shape) instead of max|x| / levels."""
    bits = validate_bits(bits)
    if bits >= PASS_THROUGH_BITS:
        return x
    if not x.is_floating_point():
        raise ValueError(f"fake_quantize needs a floating-point tensor; got dtype {x.dtype}")
    if value_range is not None and spec.granularity != "per_tensor":
        raise ValueError(f"a fixed value_range needs granularity 'per_tensor'; got {spec.granularity!r}")
    _grouped_view(x, spec)  # validate the grouping before entering autograd
    grid = grid_of(bits, spec)
    return StraightThrough.apply(x, lambda t, want_mask: quantize_in_place(t, grid, spec, value_range, want_mask,
                                                                           scale), clip_gradient)


def quantize_in_place(t: torch.Tensor, grid: tuple, spec: QuantSpec, value_range, want_mask: bool,
                      scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(fake-quantized `t`, in-range mask or None): the forward of `fake_quantize_spec` at `grid` (`grid_of`),
    computed in float32 (float64 kept) and returned in `t`'s dtype and shape; no gradient is formed here."""
    compute = t if t.dtype == torch.float64 else t.float()
    fixed = scale.detach().to(compute.dtype) if scale is not None else None
    out, mask = _quantize_view(_grouped_view(compute, spec), grid, spec, value_range, want_mask, fixed)
    out = out.reshape(t.shape).to(t.dtype)
    return out, (mask.reshape(t.shape) if mask is not None else None)
