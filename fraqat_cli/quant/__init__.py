"""FraQAT's quantization core: fractional-bit fake quantization for linear layers.

Imports torch only, so it can be lifted into another project as it is.
"""

from fraqat_cli.quant.fake_quant import code_range, fake_quantize, fake_quantize_spec
from fraqat_cli.quant.linear import (
    ActivationQuantizer,
    FakeQuantizer,
    QuantLinear,
    calibrate_activations,
    weight_bits_of,
)
from fraqat_cli.quant.spec import GRANULARITIES, PASS_THROUGH_BITS, QuantSpec, validate_bits
from fraqat_cli.quant.swap import (
    DEFAULT_INCLUDE,
    QuantConfig,
    QuantizationSummary,
    quantize_model,
    set_activation_bits,
    set_weight_bits,
    summarize,
)

__all__ = [
    "ActivationQuantizer", "DEFAULT_INCLUDE", "FakeQuantizer", "GRANULARITIES", "PASS_THROUGH_BITS",
    "QuantConfig", "QuantLinear", "QuantSpec", "QuantizationSummary", "calibrate_activations",
    "code_range", "fake_quantize", "fake_quantize_spec", "quantize_model", "set_activation_bits",
    "set_weight_bits", "summarize", "validate_bits", "weight_bits_of",
]
