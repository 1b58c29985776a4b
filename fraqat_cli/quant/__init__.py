"""FraQAT's quantization core: fractional-bit fake quantization for linear layers and 1x1/depthwise convolutions.

Imports torch only, so it can be lifted into another project as it is.
"""

from fraqat_cli.quant.conv import QuantConv2d, conv_kind
from fraqat_cli.quant.fake_quant import code_range, fake_quantize, fake_quantize_spec
from fraqat_cli.quant.linear import (
    ActivationQuantizer,
    FakeQuantizer,
    QuantizedLayer,
    QuantizedWeight,
    QuantLinear,
    calibrate_activations,
    weight_bits_of,
)
from fraqat_cli.quant.spec import GRANULARITIES, PASS_THROUGH_BITS, SCALES, QuantSpec, validate_bits
from fraqat_cli.quant.swap import (
    DEFAULT_INCLUDE,
    DEFAULT_LAYERS,
    LAYER_KINDS,
    QuantConfig,
    QuantizationSummary,
    layer_kind,
    quantize_model,
    set_activation_bits,
    set_weight_bits,
    summarize,
)

__all__ = [
    "ActivationQuantizer", "DEFAULT_INCLUDE", "DEFAULT_LAYERS", "FakeQuantizer", "GRANULARITIES", "LAYER_KINDS",
    "PASS_THROUGH_BITS", "QuantConfig", "QuantConv2d", "QuantLinear", "QuantSpec", "QuantizationSummary",
    "QuantizedLayer", "QuantizedWeight", "SCALES",
    "calibrate_activations", "code_range", "conv_kind", "fake_quantize", "fake_quantize_spec",
    "layer_kind", "quantize_model", "set_activation_bits", "set_weight_bits", "summarize", "validate_bits",
    "weight_bits_of",
]
