"""Weight scales beyond the paper's `max|W| / (2^(b-1) - 1)`: learned (LSQ) and MSE-searched clipping.

`max` lets one outlier set the step of a whole tensor (or channel). Two ways out, both symmetric only:
- `learned`: the scale is a trainable parameter with the LSQ gradient (Esser et al., 2020, "Learned Step Size
  Quantization"): codes = clamp(R(x / s), lo, hi), out = codes * s; d out / d x = 1 inside the clip range, 0
  outside; d out / d s = R(x/s) - x/s inside, lo or hi outside; the gradient of s scaled by
  1 / sqrt(elements per scale * hi), the paper's factor, so a scale shared by many weights does not take steps
  that many times larger than theirs.
- `mse`: the scale stays `ratio * max|x| / levels`, recomputed from the weights at every step as `max` is, but the
  clip ratio (one per scale group) is searched once per bit-width, the ratio minimising the quantization error.
"""

from __future__ import annotations

import math

import torch

from fraqat_cli.quant.fake_quant import SMALLEST_SPAN, code_range

# Clip ratios the MSE search tries, 1.0 (no clipping: `max`) down to 0.2 in steps of 0.01. A Gaussian tensor of
# a million weights has max|x| ~ 5 std, and its MSE-optimal clip is ~2.5 std at 4 bits, ~1.7 at 3, ~1.0 at 2:
# ratios 0.5, 0.34 and 0.2. Finer steps change the error by well under 1% (the optimum is flat).
CLIP_RATIOS = tuple(round(1.0 - 0.01 * i, 2) for i in range(81))


def levels(bits: float) -> float:
    """The symmetric grid's top level 2^(b-1) - 1: the max scale is max|x| / levels, so s * levels is the
    real-valued clip range of scale s at `bits` bits."""
    return 2.0 ** (bits - 1) - 1


def lsq_gradient_factor(elements_per_scale: int, bits: float, rounding: str) -> float:
    """LSQ's gradient scale 1 / sqrt(N * Qp): N weights share the scale, Qp is the top code."""
    top = max(code_range(bits, True, rounding)[1], 1)
    return 1.0 / math.sqrt(max(elements_per_scale, 1) * top)


class LearnedScaleQuantize(torch.autograd.Function):
    """clamp(R(x / s), lo, hi) * s with LSQ's gradients (see the module docstring); x is (..., G), s (..., 1).

    A hand-written backward so that only x and s are kept for it (autograd of the explicit formula keeps four
    full-size intermediates); tests check it against that formula's autograd."""

    @staticmethod
    def forward(ctx, x, scale, lo: int, hi: int, grad_factor: float, floor: bool):
        ratio = x / scale
        codes = (ratio.floor() if floor else ratio.round()).clamp_(lo, hi)
        ctx.save_for_backward(x, scale)
        ctx.lo, ctx.hi, ctx.grad_factor, ctx.floor = lo, hi, grad_factor, floor
        return codes.mul_(scale)

    @staticmethod
    def backward(ctx, grad_out):
        x, scale = ctx.saved_tensors
        ratio = x / scale
        inside = (ratio >= ctx.lo) & (ratio <= ctx.hi)
        rounded = ratio.floor() if ctx.floor else ratio.round()
        d_scale = torch.where(inside, rounded - ratio, ratio.clamp(ctx.lo, ctx.hi))  # lo or hi outside
        grad_scale = (grad_out * d_scale).sum_to_size(scale.shape) * ctx.grad_factor
        return grad_out * inside, grad_scale, None, None, None, None


def learned_fake_quantize(view: torch.Tensor, scale: torch.Tensor, bits: float, rounding: str) -> torch.Tensor:
    """LSQ fake quantization of `view` (..., G), each last-dimension row sharing one entry of `scale` (..., 1)."""
    lo, hi = code_range(bits, True, rounding)
    factor = lsq_gradient_factor(view.shape[-1], bits, rounding)
    return LearnedScaleQuantize.apply(view, scale.clamp_min(SMALLEST_SPAN), lo, hi, factor, rounding == "floor")


@torch.no_grad()
def mse_clip_ratio(view: torch.Tensor, bits: float, rounding: str) -> torch.Tensor:
    """Per row of `view` (..., G): the ratio in CLIP_RATIOS whose scale ratio * max|x| / levels(bits) gives the
    least squared quantization error (ties: the larger ratio, clipping less). Shape (...,)."""
    lo, hi = code_range(bits, True, rounding)
    span = view.abs().amax(dim=-1, keepdim=True).clamp_min_(SMALLEST_SPAN)  # (..., 1)
    best_error = torch.full(view.shape[:-1], float("inf"), device=view.device, dtype=view.dtype)
    best = torch.ones_like(best_error)
    for ratio in CLIP_RATIOS:
        scale = span * (ratio / levels(bits))
        codes = torch.div(view, scale)
        codes = (codes.floor_() if rounding == "floor" else codes.round_()).clamp_(lo, hi)
        error = codes.mul_(scale).sub_(view).square_().sum(dim=-1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best = torch.where(better, torch.full_like(best, ratio), best)
    return best

