"""The quantized convolution: an `nn.Conv2d` whose weight and input pass through fake quantizers.

A 1x1 convolution (stride 1, no padding, one group) is a matrix product applied at every pixel, so it
quantizes exactly as a linear layer does; Sana's feed-forward (GLUMBConv) is two of them around a
depthwise 3x3. A depthwise convolution (one group per input channel) quantizes per output channel over
its k x k taps. Other convolutions (a patch embedding's strided k x k) are not a kind this core selects.
"""

from __future__ import annotations

import torch
from torch import nn

from fraqat_cli.quant.layer import QuantizedLayer
from fraqat_cli.quant.quantizers import ActivationQuantizer
from fraqat_cli.quant.spec import QuantSpec


def conv_kind(conv: nn.Module) -> str | None:
    """'pointwise_conv', 'depthwise_conv', or None for any other (or non-) 2-D convolution."""
    if not isinstance(conv, nn.Conv2d):
        return None
    if conv.kernel_size == (1, 1) and conv.groups == 1 and conv.stride == (1, 1) and conv.padding in ((0, 0), "valid"):
        return "pointwise_conv"
    if conv.groups > 1 and conv.groups == conv.in_channels:
        return "depthwise_conv"
    return None


class QuantConv2d(QuantizedLayer, nn.Conv2d):
    """Drop-in `nn.Conv2d` computing `conv2d(Qa(x), Qw(W), b)`; W is quantized as the matrix
    (out_channels, in_channels / groups * kh * kw), so per-channel scales are per output channel."""

    def __init__(self, *args, weight_spec: QuantSpec | None = None, weight_bits: float | None = 8,
                 activation_spec: QuantSpec | None = None, activation_bits: float | None = 8,
                 static_activations: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._attach_quantizers(weight_spec, weight_bits, activation_spec, activation_bits, static_activations)

    @property
    def kind(self) -> str:
        return conv_kind(self)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **quant_kwargs) -> QuantConv2d:
        """Wrap an existing convolution of a kind `conv_kind` names, sharing its weight and bias."""
        if conv_kind(conv) is None:
            raise ValueError(f"{conv} is neither a pointwise (1x1, stride 1, one group) nor a depthwise convolution; "
                             f"allowed kinds: pointwise_conv, depthwise_conv")
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device="meta", dtype=conv.weight.dtype, **quant_kwargs,
        )
        return layer._adopt(conv.weight, conv.bias)

    @torch.no_grad()
    def to_conv(self) -> nn.Conv2d:
        """A plain `nn.Conv2d` whose weight is the current fake-quantized weight (activations not baked in)."""
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride, padding=self.padding,
            dilation=self.dilation, groups=self.groups, bias=self.bias is not None, padding_mode=self.padding_mode,
            device=self.weight.device, dtype=self.weight.dtype,
        )
        conv.weight.copy_(self.quantize_weight())
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H', W')
        return self._conv_forward(self.input_quantizer(x), self.quantize_weight(), self.bias)


__all__ = ["ActivationQuantizer", "QuantConv2d", "conv_kind"]
