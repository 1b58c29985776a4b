"""The quantized linear layer: an `nn.Linear` whose weight and input pass through fake quantizers (what every
quantized layer kind shares is `layer.QuantizedLayer`; the quantizers are in `quantizers`)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from fraqat_cli.quant.layer import QuantizedLayer, QuantizedWeight
from fraqat_cli.quant.quantizers import ActivationQuantizer, FakeQuantizer
from fraqat_cli.quant.spec import PASS_THROUGH_BITS, QuantSpec


class QuantLinear(QuantizedLayer, nn.Linear):
    """Drop-in `nn.Linear` computing `linear(Qa(x), Qw(W), b)` with fake-quantized W and x.

    It keeps the original full-precision weight (the trained parameter); the
    quantizers are applied on the fly, so the weight bit-width can change at any
    step without rebuilding the layer.
    """

    kind = "linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight_spec: QuantSpec | None = None,
        weight_bits: float | None = 8,
        activation_spec: QuantSpec | None = None,
        activation_bits: float | None = 8,
        static_activations: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._attach_quantizers(weight_spec, weight_bits, activation_spec, activation_bits, static_activations)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **quant_kwargs) -> QuantLinear:
        """Wrap an existing layer, sharing (not copying) its weight and bias parameters."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",
            dtype=linear.weight.dtype,
            **quant_kwargs,
        )
        return layer._adopt(linear.weight, linear.bias)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain `nn.Linear` whose weight is the current fake-quantized weight (activations not baked in)."""
        linear = nn.Linear(
            self.in_features, self.out_features, self.bias is not None,
            device=self.weight.device, dtype=self.weight.dtype,
        )
        linear.weight.copy_(self.quantize_weight())
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


@contextmanager
def calibrate_activations(model: nn.Module):
    """Measure static activation ranges: batches run inside the block are observed, not quantized."""
    quantizers = [m for m in model.modules() if isinstance(m, ActivationQuantizer) and m.static]
    if not quantizers:
        raise ValueError("calibrate_activations: the model has no static activation quantizer to calibrate")
    for q in quantizers:
        q.calibrating, q._moments = True, None
    try:
        yield model
    except BaseException:
        for q in quantizers:
            q.calibrating, q._moments = False, None
        raise
    for q in quantizers:
        q.finish_calibration()


def weight_bits_of(model: nn.Module) -> set[float]:
    """The distinct weight bit-widths of a model's quantized layers (PASS_THROUGH_BITS means full precision)."""
    return {m.weight_bits for m in model.modules() if isinstance(m, QuantizedLayer)}


__all__ = [
    "ActivationQuantizer", "FakeQuantizer", "PASS_THROUGH_BITS", "QuantLinear", "QuantizedLayer", "QuantizedWeight",
    "calibrate_activations", "weight_bits_of",
]
