"""Turn a `conf/quantizer/*` entry (plus the model's layer patterns) into a `QuantConfig`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fraqat_cli.quant import DEFAULT_INCLUDE, QuantConfig, QuantSpec


def build_quant_config(
    quantizer: Mapping,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    weight_bits: float | None = 8,
) -> QuantConfig:
    """Patterns in the quantizer entry win over the model's (`include`/`exclude` arguments)."""
    return QuantConfig(
        weight=QuantSpec(
            granularity=quantizer["granularity"],
            group_size=quantizer.get("group_size"),
            symmetric=bool(quantizer.get("symmetric", True)),
            rounding=quantizer.get("rounding", "floor"),
        ),
        weight_bits=weight_bits,
        activation=QuantSpec(
            granularity=quantizer.get("activation_granularity", "per_tensor"),
            symmetric=bool(quantizer.get("activation_symmetric", True)),
            rounding=quantizer.get("activation_rounding", "nearest"),
        ),
        activation_bits=quantizer.get("activation_bits", 8),
        static_activations=bool(quantizer.get("static_activations", False)),
        include=tuple(quantizer.get("include") or include or DEFAULT_INCLUDE),
        exclude=tuple(quantizer.get("exclude") or exclude or ()),
    )
