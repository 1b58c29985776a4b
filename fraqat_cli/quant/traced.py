"""The fake quantizers as torch.compile traces them: the bit-width read from the `bits` buffer, as a tensor.

Eager code takes the bit-width as a Python float (`FakeQuantizer._bits`), which never waits on the device. To
dynamo a Python float is a constant: every new bit-width would compile the student again, nine times along the
fractional schedule and at every step of a smooth one. Here the levels and the code bounds are computed from the
buffer with torch ops, so the graph holds the bit-width as an input and a change of bits reuses it.

The values are the eager ones, bit for bit on the CPU's eager kernels (tests/test_compiled_student.py checks it):
- the grid: levels and bounds computed in float64 as Python does, the levels then rounded to the view's dtype,
  which is what an eager op does with a Python scalar;
- the straight-through estimators: `out + (x - x.detach())` has the value `out` exactly (x - x is 0) and the
  gradient 1, where the textbook `x + (out - x).detach()` is off by a rounding;
- learned scales: the same trick gives LSQ's gradients (quant/scales.py) with autograd, the forward value
  `clamp(R(x / s)) * s` exactly.
"""

from __future__ import annotations

import torch

from fraqat_cli.quant.fake_quant import SMALLEST_SPAN, quantize_in_place
from fraqat_cli.quant.spec import QuantSpec


def traced_grid(bits: torch.Tensor, spec: QuantSpec, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """`fake_quant.grid_of` from the 0-d `bits` buffer: (levels, lowest code, highest code) as 0-d tensors."""
    b = bits.double()
    if not spec.symmetric:
        levels = torch.pow(2.0, b)
        return levels.to(dtype), torch.zeros_like(levels).to(dtype), (levels.ceil() - 1).to(dtype)
    top = torch.pow(2.0, b - 1)
    levels = top - 1
    if spec.rounding == "nearest_int_range":
        lo, hi = -top.floor(), top.floor() - 1
    elif spec.rounding == "floor":
        lo, hi = (-levels).floor(), levels.floor()
    else:  # torch.round, like Python's round, takes halves to even
        lo, hi = (-levels).round(), levels.round()
    return levels.to(dtype), lo.to(dtype), hi.to(dtype)


def straight_through(x: torch.Tensor, out: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`out`'s value with `x`'s gradient passed straight through (zeroed outside `mask`, when given)."""
    passed = x - x.detach()
    return out + (passed if mask is None else passed * mask)


def traced_fake_quantize(x: torch.Tensor, bits: torch.Tensor, spec: QuantSpec, *,
                         value_range: tuple[torch.Tensor, torch.Tensor] | None = None,
                         clip_gradient: bool = False, scale: torch.Tensor | None = None) -> torch.Tensor:
    """`fake_quantize_spec` at the bit-width held by the tensor `bits` (never full precision: callers check)."""
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    grid = traced_grid(bits, spec, compute_dtype)
    with torch.no_grad():
        out, mask = quantize_in_place(x.detach(), grid, spec, value_range, clip_gradient, scale)
    return straight_through(x, out, mask.to(x.dtype) if mask is not None else None)


def traced_learned_quantize(view: torch.Tensor, scale: torch.Tensor, bits: torch.Tensor,
                            rounding: str) -> torch.Tensor:
    """`scales.learned_fake_quantize` at the bit-width the tensor `bits` holds: clamp(R(x / s), lo, hi) * s, with
    LSQ's gradients from autograd: 1 to x inside the clip range, R(x/s) - x/s (inside) or lo/hi (outside) to s,
    scaled by 1 / sqrt(N * hi)."""
    _, lo, hi = traced_grid(bits, QuantSpec(rounding=rounding), view.dtype)
    factor = torch.rsqrt(hi.clamp_min(1) * view.shape[-1])
    scale = scale.clamp_min(SMALLEST_SPAN)
    scale = scale.detach() + (scale - scale.detach()) * factor  # the value of s, its gradient scaled
    ratio = view / scale
    with torch.no_grad():
        rounded = (ratio.floor() if rounding == "floor" else ratio.round()).clamp_(lo, hi)
        inside = ((ratio >= lo) & (ratio <= hi)).to(view.dtype)
    codes = rounded + (ratio - ratio.detach()) * inside  # the value R(x/s) clamped; d/d ratio: 1 inside
    return codes * scale
