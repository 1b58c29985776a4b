"""What to quantize: a frozen, validated description of one fake quantizer.

The spec says *what* (granularity, group size, symmetry, rounding); `fake_quant`
says *how*; `swap` says *where*. Bit-widths are not part of the spec: they are
run-time state on each quantizer, set by a schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

GRANULARITIES = ("per_tensor", "per_channel", "per_group")
# How real-valued codes become integers (fake_quant.code_range has the clamp bounds of each):
# floor: round down, clamp to the codes of the range's own extremes (the paper's INT5.5 [-22, 21]);
# nearest: round to nearest, same kind of clamp ([-22, 22] at 5.5 bits);
# nearest_int_range: round to nearest, clamp symmetric codes to the signed integer range
# [-floor(2^(b-1)), floor(2^(b-1)) - 1] (INT6 [-32, 31], INT5.5 [-22, 21], INT5 [-16, 15]); asymmetric as nearest.
ROUNDINGS = ("floor", "nearest", "nearest_int_range")
# The dtype each scale (and asymmetric offset) is kept on: float32, or the float16 grid that GGUF blocks store
# their scales in (fp16 `d` and `m`), so that a GGUF export holds exactly the weights the student trained with.
SCALE_DTYPES = ("float32", "float16")
# Where a scale comes from (quant/scales.py): max|x| / levels (the paper's), max|x| times a clip ratio searched
# per bit-width to minimise the quantization error, or a trainable parameter with the LSQ gradient.
SCALES = ("max", "mse", "learned")

# Fractional bits are a software construct; 2 bits is the narrowest range that
# still has a positive and a negative code, 16 the widest a float16 scale keeps
# meaningful. 32 and above (or None) means "leave the tensor in full precision".
MIN_BITS = 2.0
MAX_BITS = 16.0
PASS_THROUGH_BITS = 32.0


def validate_bits(bits: float | None) -> float:
    """Return `bits` as a float, or `PASS_THROUGH_BITS` for None / >= 32.

    Raises ValueError for NaN, non-numbers and values outside [2, 16] that are
    not a pass-through request.
    """
    if bits is None:
        return PASS_THROUGH_BITS
    if isinstance(bits, (bool, str, bytes)) or not isinstance(bits, (int, float)):
        try:
            if isinstance(bits, (bool, str, bytes)):
                raise TypeError
            bits = float(bits)  # numpy scalars, 0-d tensors
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(
                f"bits must be a number in [{MIN_BITS:g}, {MAX_BITS:g}], or >= {PASS_THROUGH_BITS:g} "
                f"or None for full precision; got {bits!r}"
            ) from None
    bits = float(bits)
    if math.isnan(bits):
        raise ValueError(f"bits is NaN; allowed: a number in [{MIN_BITS:g}, {MAX_BITS:g}], or >= 32 or None")
    if bits >= PASS_THROUGH_BITS:
        return PASS_THROUGH_BITS
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"bits={bits:g} is out of range; allowed: [{MIN_BITS:g}, {MAX_BITS:g}] for fake quantization, "
            f"or >= {PASS_THROUGH_BITS:g} (or None) for full precision"
        )
    return bits


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is fake-quantized.

    granularity: `per_tensor` (one scale), `per_channel` (one scale per row, i.e.
    per output channel of a weight, per token of an activation) or `per_group`
    (one scale per `group_size` consecutive elements of the last dimension).
    symmetric: narrow symmetric range around zero (True) or the wide asymmetric
    min/max range (False), both as in the FraQAT paper.
    rounding: `nearest_int_range` (default: round to nearest, then clamp to the signed b-bit
    integer range, [-22, 21] at 5.5 bits as the paper; asymmetric codes as `nearest`),
    `nearest` ([-22, 22] at 5.5 bits) or `floor` (round down: also the paper's [-22, 21], but
    every value moves down by half a step on average). At integer bits the two nearest kinds
    give identical codes. The default is the evidence's: on the toy benchmark
    (docs/results/rounding.md) floor students are 2.2x further from the teacher by FID; the nearest kinds tie.
    scale_dtype: `float32`, or `float16`: every scale (and asymmetric offset) is rounded to the nearest
    float16 before the codes are taken, so codes x scale is exactly what a GGUF block (fp16 scale) holds.
    scale: `max` (the paper's max|x| / levels), `mse` (max times a clip ratio searched at each bit-width) or
    `learned` (a trainable scale, LSQ); the last two symmetric only (quant/scales.py says how).
    """

    granularity: Literal["per_tensor", "per_channel", "per_group"] = "per_channel"
    group_size: int | None = None
    symmetric: bool = True
    rounding: Literal["floor", "nearest", "nearest_int_range"] = "nearest_int_range"
    scale_dtype: Literal["float32", "float16"] = "float32"
    scale: Literal["max", "mse", "learned"] = "max"

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"unknown scale {self.scale!r}; allowed: {', '.join(SCALES)}")
        if self.scale != "max" and not self.symmetric:
            raise ValueError(f"scale={self.scale!r} needs the symmetric range (symmetric=true); the asymmetric "
                             f"range's scale is max - min; allowed with symmetric=false: scale='max'")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"unknown scale_dtype {self.scale_dtype!r}; allowed: {', '.join(SCALE_DTYPES)}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; allowed: {', '.join(GRANULARITIES)}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"unknown rounding {self.rounding!r}; allowed: {', '.join(ROUNDINGS)}")
        if self.granularity == "per_group":
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(
                    f"per_group granularity needs a positive integer group_size; got {self.group_size!r}"
                )
        elif self.group_size is not None:
            raise ValueError(
                f"group_size={self.group_size!r} only applies to granularity 'per_group', "
                f"not {self.granularity!r}"
            )
