"""The fake quantizers a quantized layer holds: one tensor's spec, bit-width and (optionally) scale.

`FakeQuantizer` quantizes a weight (seen as a matrix: output channel x the rest); `ActivationQuantizer` a layer's
input, dynamically or with a calibrated static range.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fraqat_cli.quant.fake_quant import (
    HALF_TINIEST,
    SMALLEST_SPAN,
    _grouped_view,
    _on_half_grid,
    fake_quantize_spec,
    quantize_to_codes,
)
from fraqat_cli.quant.scales import learned_fake_quantize, levels, mse_clip_ratio
from fraqat_cli.quant.spec import PASS_THROUGH_BITS, QuantSpec, validate_bits
from fraqat_cli.quant.traced import traced_fake_quantize, traced_grid, traced_learned_quantize

# The paper's static activation range: mean +- 3 standard deviations over the calibration set.
CALIBRATION_STDS = 3.0


def _stored_bits(bits: float | None) -> float:
    """`bits` as its float32 buffer holds it, computed on the CPU: the buffer itself may be on the meta device."""
    return float(torch.tensor(validate_bits(bits), dtype=torch.float32, device="cpu"))


def scale_shape(rows: int, width: int, spec: QuantSpec) -> tuple[int, ...]:
    """The shape of the scales of a (rows, width) weight matrix: as `quantize_to_codes` returns them."""
    if spec.granularity == "per_tensor":
        return (1,)
    if spec.granularity == "per_channel":
        return (rows,)
    return (rows, width // spec.group_size)


class FakeQuantizer(nn.Module):
    """One tensor's quantizer: a spec plus its current bit-width, and for `spec.scale` mse or learned, its scale.

    The bit-width is a float buffer (saved in the state dict, restored on load)
    and only changes through `set_bits`. A plain-float copy is kept beside it so
    that the forward pass never synchronises with the device to read it.

    Scales other than `max` (quant/scales.py) need `scale_shape`, one entry per scale group, and are kept with
    the bit-width they belong to (`scale_bits`, a buffer; NaN until set):
    - `learned`: the parameter `scale`, initialised by `init_scale` from the weight at the first bit-width by the
      MSE search: at 8 bits that is max|W| / levels wherever clipping does not pay (the student starts as the
      `max` student does), and at a low first width (standard QAT's 4 bits) it starts from the best fixed clip
      instead of an outlier's. When the bit-width moves b -> b', the scale follows the code range: it is
      multiplied by levels(b) / levels(b') (levels = 2^(b-1) - 1), so the clip range s * levels learned so far
      stays where it is and only the step inside it changes, as the `max` scale's does.
    - `mse`: the buffer `clip_ratio`, searched from the weight the first time the quantizer runs at a new
      bit-width and fixed until the next change; the scale is clip_ratio * max|W| / levels at every step.

    Under torch.compile (`traced_forward` below) the forward reads the bit-width from the buffer instead, and what it
    branches on is kept in plain bools (`_active`, `_stale`) that change only at full precision's edge and, for
    `mse`, once per bit change: dynamo guards on those, never on the bit-width's value.
    """

    def __init__(self, spec: QuantSpec, bits: float | None, clip_gradient: bool = False,
                 scale_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.clip_gradient = clip_gradient
        self.register_buffer("bits", torch.tensor(validate_bits(bits), dtype=torch.float32))
        self._bits = _stored_bits(bits)  # the stored (float32) value, so a reloaded layer computes the same
        if spec.scale != "max":
            if scale_shape is None:
                raise ValueError(f"scale={spec.scale!r} needs the quantizer's scale_shape (one entry per scale group)")
            nan = torch.full(tuple(scale_shape), float("nan"))
            if spec.scale == "learned":
                self.scale = nn.Parameter(nan)
            else:
                self.register_buffer("clip_ratio", nan)
            self.register_buffer("scale_bits", torch.tensor(float("nan")))
        self._scale_bits = float("nan")
        self._note_state()

    @property
    def current_bits(self) -> float:
        return self._bits

    @torch.no_grad()
    def set_bits(self, bits: float | None) -> None:
        bits = validate_bits(bits)
        new = _stored_bits(bits)
        if self.spec.scale == "learned" and new < PASS_THROUGH_BITS and not math.isnan(self._scale_bits) \
                and new != self._scale_bits:
            self.scale.mul_(levels(self._scale_bits) / levels(new))  # the clip range stays: see the docstring
            self._set_scale_bits(new)
        self.bits.fill_(bits)
        self._bits = new
        self._note_state()

    def _set_scale_bits(self, bits: float) -> None:
        self.scale_bits.fill_(bits)
        self._scale_bits = bits
        self._note_state()

    def _note_state(self) -> None:
        """Keep the bools the compiled forward branches on in step with the bit-widths: `_active` (not full
        precision) and `_stale` (an `mse` clip ratio searched at another bit-width, searched again before use)."""
        self._active = self._bits < PASS_THROUGH_BITS
        self._stale = self.spec.scale == "mse" and self._active and self._scale_bits != self._bits

    @torch.no_grad()
    def init_scale(self, matrix: torch.Tensor) -> None:
        """Set the scale (learned) or clip ratio (mse) from `matrix` (the weight as a matrix) at the current
        bit-width; a no-op for `max`, at full precision, and for a weight on the meta device (a checkpoint fills
        it)."""
        if self.spec.scale == "max" or self._bits >= PASS_THROUGH_BITS or matrix.is_meta:
            return
        view = _grouped_view(matrix.detach().float(), self.spec)
        ratio = mse_clip_ratio(view, self._bits, self.spec.rounding)  # (...,)
        if self.spec.scale == "mse":
            self.clip_ratio.copy_(ratio.reshape(self.clip_ratio.shape))
        else:
            span = view.abs().amax(dim=-1).clamp_min_(SMALLEST_SPAN)
            self.scale.copy_((ratio * span / levels(self._bits)).reshape(self.scale.shape))
        self._set_scale_bits(self._bits)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._bits = validate_bits(float(self.bits))
        if self.spec.scale != "max":
            self._scale_bits = float(self.scale_bits)
        self._note_state()

    def scale_of(self, matrix: torch.Tensor, top: float | torch.Tensor | None = None) -> torch.Tensor | None:
        """The scale the codes of `matrix` are taken at, shaped as `quantize_to_codes` returns it (None: max).
        `mse`: searched first if the bit-width changed since the last search; its scale is clip_ratio * max|W| /
        `top` (default: levels at the current bits; the compiled forward passes them as a tensor)."""
        if self.spec.scale == "max":
            return None
        if self.spec.scale == "learned":
            scale = self.scale.clamp_min(SMALLEST_SPAN)
        else:
            if self._stale:
                _search_outside_graph(self, matrix)
            view = _grouped_view(matrix.detach().float(), self.spec)
            span = view.abs().amax(dim=-1).clamp_min_(SMALLEST_SPAN).reshape(self.clip_ratio.shape)
            scale = self.clip_ratio * span / (levels(self._bits) if top is None else top)
        if self.spec.scale_dtype == "float16":  # on the fp16 grid, the gradient passing straight through
            scale = scale + (_on_half_grid(scale).clamp_min(HALF_TINIEST) - scale).detach()
        return scale

    def codes(self, matrix: torch.Tensor, bits: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`quantize_to_codes` of `matrix` at `bits` (the current bit-width when the scale is not max) with
        this quantizer's scale: the codes the forward pass multiplied, exactly."""
        if self.spec.scale != "max" and float(bits) != self._bits:
            raise ValueError(f"a {self.spec.scale} scale belongs to the current {self._bits:g} bits, not {bits:g}")
        with torch.no_grad():
            return quantize_to_codes(matrix, bits, self.spec, scale=self.scale_of(matrix))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self.traced_forward(x)
        if self.spec.scale == "max" or self._bits >= PASS_THROUGH_BITS:
            return fake_quantize_spec(x, self._bits, self.spec, clip_gradient=self.clip_gradient)
        scale = self.scale_of(x)
        if self.spec.scale == "mse":
            return fake_quantize_spec(x, self._bits, self.spec, clip_gradient=self.clip_gradient, scale=scale)
        view = _grouped_view(x.float(), self.spec)
        out = learned_fake_quantize(view, scale.reshape(*view.shape[:-1], 1), self._bits, self.spec.rounding)
        return out.reshape(x.shape).to(x.dtype)

    def traced_forward(self, x: torch.Tensor,
                       value_range: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The forward as torch.compile traces it (quant/traced.py): the same values, the bit-width a tensor."""
        if not self._active:
            return x
        if self.spec.scale == "learned":
            view = _grouped_view(x.float(), self.spec)
            scale = self.scale_of(x).reshape(*view.shape[:-1], 1)
            return traced_learned_quantize(view, scale, self.bits, self.spec.rounding).reshape(x.shape).to(x.dtype)
        scale = None
        if self.spec.scale == "mse":
            scale = self.scale_of(x, top=traced_grid(self.bits, self.spec, torch.float32)[0])
        return traced_fake_quantize(x, self.bits, self.spec, value_range=value_range,
                                    clip_gradient=self.clip_gradient, scale=scale)

    def extra_repr(self) -> str:
        return f"bits={self._bits:g}, {self.spec}"


@torch.compiler.disable
def _search_outside_graph(quantizer: FakeQuantizer, matrix: torch.Tensor) -> None:
    """`init_scale` run eagerly even from a compiled forward: the search loops over 81 clip ratios at a Python
    bit-width, once per bit change, which is no graph to compile (dynamo breaks the graph here on that step)."""
    quantizer.init_scale(matrix)


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
        self._has_range = False  # `calibrated` as a plain bool, for the compiled forward to branch on

    @property
    def calibrated(self) -> bool:
        return not bool(torch.isnan(self.range_min))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            _observe_outside_graph(self, x)
            return x
        if not self.static:
            return super().forward(x)
        if not (self._has_range if torch.compiler.is_compiling() else self.calibrated):
            raise RuntimeError(
                "static activation quantization needs calibration first: "
                "run calibration batches inside fraqat_cli.quant.calibrate_activations(model)"
            )
        if torch.compiler.is_compiling():
            return self.traced_forward(x, value_range=(self.range_min, self.range_max))
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
        self._has_range = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._has_range = self.calibrated

    def extra_repr(self) -> str:
        return super().extra_repr() + (", static" if self.static else ", dynamic")


@torch.compiler.disable
def _observe_outside_graph(quantizer: ActivationQuantizer, x: torch.Tensor) -> None:
    """Calibration's running moments are Python state: kept eagerly even when the block is compiled."""
    quantizer._observe(x)
