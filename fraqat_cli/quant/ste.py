"""The straight-through estimator used by every fake quantizer.

Forward: the fake-quantized tensor. Backward: the incoming gradient unchanged
(torchao's choice) or, with `clip_gradient`, zeroed where the input fell outside
the representable range (AIMET's choice). Weights use pass-everywhere: their
range is the tensor's own min/max, so nothing is clipped except the one
endpoint that `nearest` rounding may push past the top code. Activations with a
static calibrated range use the clipped variant so that out-of-range values do
not pretend to influence the output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class StraightThrough(torch.autograd.Function):
    """Apply `quantize` in the forward pass and pretend it was the identity in the backward.

    `quantize` maps a tensor to `(fake_quantized, in_range_mask_or_None)`. The mask
    is only kept (and only computed) when `clip_gradient` is set, so the
    pass-everywhere estimator stores nothing for the backward pass.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, quantize: Callable, clip_gradient: bool) -> torch.Tensor:
        with torch.no_grad():
            out, in_range = quantize(x, clip_gradient)
        ctx.clip_gradient = clip_gradient
        if clip_gradient:
            ctx.save_for_backward(in_range)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.clip_gradient:
            (in_range,) = ctx.saved_tensors
            grad_out = grad_out * in_range
        return grad_out, None, None
