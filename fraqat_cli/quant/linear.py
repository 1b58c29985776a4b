"""The quantized linear layer: an `nn.Linear` whose weight and input pass through fake quantizers; what every
quantized layer kind shares (`QuantizedLayer`)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from fraqat_cli.quant.fake_quant import fake_quantize_spec
from fraqat_cli.quant.spec import PASS_THROUGH_BITS, QuantSpec, validate_bits

# The paper's static activation range: mean +- 3 standard deviations over the calibration set.
CALIBRATION_STDS = 3.0


def _stored_bits(bits: float | None) -> float:
    """`bits` as its float32 buffer holds it, computed on the CPU: the buffer itself may be on the meta device."""
    return float(torch.tensor(validate_bits(bits), dtype=torch.float32, device="cpu"))


class FakeQuantizer(nn.Module):
    """One tensor's quantizer: a spec plus its current bit-width.

    The bit-width is a float buffer (saved in the state dict, restored on load)
    and only changes through `set_bits`. A plain-float copy is kept beside it so
    that the forward pass never synchronises with the device to read it.
    """

    def __init__(self, spec: QuantSpec, bits: float | None, clip_gradient: bool = False) -> None:
        super().__init__()
        self.spec = spec
        self.clip_gradient = clip_gradient
        self.register_buffer("bits", torch.tensor(validate_bits(bits), dtype=torch.float32))
        self._bits = _stored_bits(bits)  # the stored (float32) value, so a reloaded layer computes the same

    @property
    def current_bits(self) -> float:
        return self._bits

    def set_bits(self, bits: float | None) -> None:
        self.bits.fill_(validate_bits(bits))
        self._bits = _stored_bits(bits)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._bits = validate_bits(float(self.bits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_spec(x, self._bits, self.spec, clip_gradient=self.clip_gradient)

    def extra_repr(self) -> str:
        return f"bits={self._bits:g}, {self.spec}"


class ActivationQuantizer(FakeQuantizer):
    """Input-activation quantizer: dynamic per-tensor range, or a static calibrated one.

    In static mode the range is measured once (`calibrating` on, a few batches
    through the model, then `finish_calibration`): mean +- 3 std of the
    activation values, then kept fixed, with the gradient clipped outside it.
    """

    def __init__(self, spec: QuantSpec, bits: float | None = 8, static: bool = False) -> None:
        super().__init__(spec, bits, clip_gradient=static)
        if static and spec.granularity != "per_tensor":
            raise ValueError(f"static activation ranges are per_tensor; got granularity {spec.granularity!r}")
        self.static = static
        self.register_buffer("range_min", torch.tensor(float("nan")))
        self.register_buffer("range_max", torch.tensor(float("nan")))
        self.calibrating = False
        self._moments = None  # running (count, sum, sum of squares) while calibrating

    @property
    def calibrated(self) -> bool:
        return not bool(torch.isnan(self.range_min))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self._observe(x)
            return x
        if not self.static:
            return super().forward(x)
        if not self.calibrated:
            raise RuntimeError(
                "static activation quantization needs calibration first: "
                "run calibration batches inside fraqat_cli.quant.calibrate_activations(model)"
            )
        return fake_quantize_spec(
            x, self._bits, self.spec, value_range=(self.range_min, self.range_max), clip_gradient=True
        )

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        flat = x.detach().double().reshape(-1)
        moments = torch.stack([flat.new_tensor(flat.numel()), flat.sum(), flat.square().sum()])
        self._moments = moments if self._moments is None else self._moments + moments

    @torch.no_grad()
    def finish_calibration(self) -> None:
        if self._moments is None:
            raise RuntimeError("no calibration batch reached this layer; run at least one batch through the model")
        count, total, total_sq = self._moments
        mean = total / count
        std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
        self.range_min.fill_(float(mean - CALIBRATION_STDS * std))
        self.range_max.fill_(float(mean + CALIBRATION_STDS * std))
        self._moments = None
        self.calibrating = False

    def extra_repr(self) -> str:
        return super().extra_repr() + (", static" if self.static else ", dynamic")


class QuantizedLayer:
    """What every fake-quantized layer shares (a mixin beside its `nn.Module` class): a `weight` whose
    first dimension is the output channel, a `weight_quantizer` that sees it as a matrix (output channel x
    everything else, so per-channel means per output channel and groups run along the inputs) and an
    `input_quantizer`. `kind` names the layer kind the quantizer's `layers` option selects."""

    kind: str

    def weight_matrix(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """`weight` (default: the layer's own) as the 2-D matrix its codes and scales are laid out over."""
        weight = self.weight if weight is None else weight
        return weight.reshape(weight.shape[0], -1)

    def quantize_weight(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The fake-quantized `weight` (default: the layer's own), in the weight's own shape."""
        weight = self.weight if weight is None else weight
        return self.weight_quantizer(self.weight_matrix(weight)).reshape(weight.shape)

    @property
    def weight_bits(self) -> float:
        return self.weight_quantizer.current_bits


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
        self.weight_quantizer = FakeQuantizer(weight_spec or QuantSpec(), weight_bits)
        self.input_quantizer = ActivationQuantizer(
            activation_spec or QuantSpec(granularity="per_tensor", rounding="nearest"), activation_bits,
            static=static_activations,
        )

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
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer.to(linear.weight.device)  # quantizer buffers join the weight, the meta device included

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain `nn.Linear` whose weight is the current fake-quantized weight (activations not baked in)."""
        linear = nn.Linear(
            self.in_features, self.out_features, self.bias is not None,
            device=self.weight.device, dtype=self.weight.dtype,
        )
        linear.weight.copy_(self.weight_quantizer(self.weight))
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
    "ActivationQuantizer", "FakeQuantizer", "PASS_THROUGH_BITS", "QuantLinear", "QuantizedLayer",
    "calibrate_activations", "weight_bits_of",
]
