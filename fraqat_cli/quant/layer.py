"""What every fake-quantized layer kind shares (`QuantizedLayer`, a mixin beside its `nn.Module` class): the two
quantizers, the weight as the matrix its codes are laid out over, and freezing the quantized weight for eval."""

from __future__ import annotations

import math

import torch
from torch import nn

from fraqat_cli.quant.quantizers import ActivationQuantizer, FakeQuantizer, scale_shape
from fraqat_cli.quant.spec import QuantSpec


class QuantizedWeight(nn.Module):
    """Takes a weight quantizer's place once its weight has been quantized for good (at evaluation): the
    forward passes the weight through; bits and spec stay readable, and the bit-width can no longer change."""

    def __init__(self, quantizer: FakeQuantizer) -> None:
        super().__init__()
        self.spec = quantizer.spec
        self.register_buffer("bits", quantizer.bits.detach().clone())
        self._bits = quantizer.current_bits

    @property
    def current_bits(self) -> float:
        return self._bits

    def set_bits(self, bits) -> None:
        raise RuntimeError("this student's weights were quantized once for evaluation; its bit-width is fixed")

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def extra_repr(self) -> str:
        return f"bits={self._bits:g}, {self.spec}, quantized once"


class QuantizedLayer:
    """A layer with a `weight` whose first dimension is the output channel, a `weight_quantizer` that sees it as
    a matrix (output channel x everything else, so per-channel means per output channel and groups run along
    the inputs) and an `input_quantizer`. `kind` names the layer kind the quantizer's `layers` option selects."""

    kind: str

    def _attach_quantizers(self, weight_spec: QuantSpec | None, weight_bits: float | None,
                           activation_spec: QuantSpec | None, activation_bits: float | None,
                           static_activations: bool) -> None:
        """Make both quantizers (the layer's weight must exist, on any device); every layer kind's constructor
        calls this after its `nn.Module` one."""
        weight_spec = weight_spec or QuantSpec()
        rows, width = self.weight.shape[0], math.prod(self.weight.shape[1:])
        self.weight_quantizer = FakeQuantizer(weight_spec, weight_bits, scale_shape=scale_shape(rows, width,
                                                                                                 weight_spec))
        self.input_quantizer = ActivationQuantizer(
            activation_spec or QuantSpec(granularity="per_tensor", rounding="nearest"), activation_bits,
            static=static_activations,
        )

    def _adopt(self, weight: nn.Parameter, bias: nn.Parameter | None):
        """Share the wrapped layer's `weight` and `bias`, move the quantizers to them, and set a learned or
        searched scale from the weight (`FakeQuantizer.init_scale`)."""
        self.weight, self.bias = weight, bias
        self.to(weight.device)  # quantizer state joins the weight, the meta device included
        self.weight_quantizer.init_scale(self.weight_matrix())
        return self

    def weight_matrix(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """`weight` (default: the layer's own) as the 2-D matrix its codes and scales are laid out over."""
        weight = self.weight if weight is None else weight
        return weight.reshape(weight.shape[0], -1)

    def quantize_weight(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The fake-quantized `weight` (default: the layer's own), in the weight's own shape."""
        weight = self.weight if weight is None else weight
        return self.weight_quantizer(self.weight_matrix(weight)).reshape(weight.shape)

    def weight_codes(self, bits: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(codes, scale, offset) of the layer's weight matrix at `bits` (default: the current width), taken at
        the quantizer's own scale (max, searched or learned): what every export stores."""
        bits = self.weight_bits if bits is None else bits
        return self.weight_quantizer.codes(self.weight_matrix(), bits)

    @torch.no_grad()
    def freeze(self, device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Quantize the weight for good (evaluation): fake-quantized once, in float32 from the master weight
        exactly as in training, then cast to `dtype`; the weight quantizer becomes a `QuantizedWeight` (the
        bit-width fixed, a learned scale dropped with it). Returns the master weight it replaced."""
        master = self.weight
        weight = self.quantize_weight(master.to(device=device, dtype=torch.float32))
        self.weight = nn.Parameter(weight.to(dtype or torch.float32), requires_grad=False)
        self.weight_quantizer = QuantizedWeight(self.weight_quantizer)
        return master

    @property
    def weight_bits(self) -> float:
        return self.weight_quantizer.current_bits


__all__ = ["QuantizedLayer", "QuantizedWeight"]
