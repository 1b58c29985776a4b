"""Turn a `conf/quantizer/*` entry and a `conf/selection/*` entry into a `QuantConfig`."""

from __future__ import annotations

from collections.abc import Mapping

from fraqat_cli.quant import DEFAULT_INCLUDE, DEFAULT_LAYERS, QuantConfig, QuantSpec


def build_quant_config(
    quantizer: Mapping, selection: Mapping | None = None, weight_bits: float | None = 8
) -> QuantConfig:
    """`quantizer` says how (granularity, symmetry, rounding, activations); `selection` says which layers
    (include/exclude patterns; None: the transformer blocks)."""
    selection = selection or {}
    return QuantConfig(
        weight=QuantSpec(
            granularity=quantizer["granularity"],
            group_size=quantizer.get("group_size"),
            symmetric=bool(quantizer.get("symmetric", True)),
            rounding=quantizer.get("rounding", QuantSpec.rounding),  # the configs set it; else QuantSpec's default
        ),
        weight_bits=weight_bits,
        activation=QuantSpec(
            granularity=quantizer.get("activation_granularity", "per_tensor"),
            symmetric=bool(quantizer.get("activation_symmetric", True)),
            rounding=quantizer.get("activation_rounding", "nearest"),
        ),
        activation_bits=quantizer.get("activation_bits", 8),
        static_activations=bool(quantizer.get("static_activations", False)),
        include=tuple(selection.get("include") or DEFAULT_INCLUDE),
        layers=_kinds(quantizer.get("layers", DEFAULT_LAYERS)),  # linear, pointwise_conv, depthwise_conv
        exclude=tuple(selection.get("exclude") or ()),
    )


def _kinds(layers):
    """A list of layer kinds as a tuple; a lone string passes as it is, for QuantConfig to name in its error."""
    return layers if isinstance(layers, str) else tuple(layers)
