"""Where to quantize: swap a model's `nn.Linear` layers for `QuantLinear` by name pattern."""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from torch import nn

from fraqat_cli.quant.linear import QuantLinear
from fraqat_cli.quant.spec import PASS_THROUGH_BITS, QuantSpec, validate_bits

# Diffusers DiTs keep 99.9% of their parameters in blocks named `transformer_blocks`
# (FLUX adds `single_transformer_blocks`); embeddings, timestep/caption projections
# and the output layer live outside them and stay in full precision by default.
DEFAULT_INCLUDE = ("*transformer_blocks.*",)


@dataclass(frozen=True)
class QuantConfig:
    """Everything `quantize_model` needs: specs, starting bit-widths, and which layers."""

    weight: QuantSpec = field(default_factory=QuantSpec)
    weight_bits: float | None = 8
    # 8-bit activation codes are rounded to nearest, the usual choice (the paper is silent).
    activation: QuantSpec = field(default_factory=lambda: QuantSpec(granularity="per_tensor", rounding="nearest"))
    activation_bits: float | None = 8
    static_activations: bool = False
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        validate_bits(self.weight_bits)
        validate_bits(self.activation_bits)
        for name in ("include", "exclude"):
            patterns = getattr(self, name)
            if isinstance(patterns, str):
                raise ValueError(f"{name} must be a list of patterns, not the single string {patterns!r}")
            object.__setattr__(self, name, tuple(patterns))
        if not self.include:
            raise ValueError("include is empty; give at least one module-name pattern, e.g. '*'")


@dataclass(frozen=True)
class QuantizationSummary:
    """How much of a model is quantized: layer counts and parameter counts."""

    quantized_layers: int
    linear_layers: int
    quantized_params: int
    total_params: int

    @property
    def quantized_fraction(self) -> float:
        return self.quantized_params / max(self.total_params, 1)

    def __str__(self) -> str:
        return (
            f"{self.quantized_layers}/{self.linear_layers} linear layers quantized, "
            f"{self.quantized_params:,}/{self.total_params:,} parameters ({self.quantized_fraction:.1%})"
        )


def _selected(name: str, config: QuantConfig) -> bool:
    return any(fnmatchcase(name, p) for p in config.include) and not any(fnmatchcase(name, p) for p in config.exclude)


def quantize_model(model: nn.Module, config: QuantConfig | None = None) -> QuantizationSummary:
    """Replace the selected `nn.Linear` layers of `model` in place by `QuantLinear`.

    Layers are selected by `fnmatch` patterns on their dotted module names.
    Raises ValueError when a pattern matches no linear layer (a typo would
    otherwise silently leave the model in full precision).
    """
    config = config or QuantConfig()
    linears = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not isinstance(module, QuantLinear)
    }
    for kind in ("include", "exclude"):
        for pattern in getattr(config, kind):
            if not any(fnmatchcase(name, pattern) for name in linears):
                if any(isinstance(m, QuantLinear) for m in model.modules()):
                    raise ValueError(
                        f"{kind} pattern {pattern!r} matches no unquantized linear layer: "
                        f"{type(model).__name__} was already quantized; quantize a fresh copy instead"
                    )
                examples = ", ".join(list(linears)[:5]) or "none"
                raise ValueError(
                    f"{kind} pattern {pattern!r} matches no linear layer of {type(model).__name__}; "
                    f"allowed: fnmatch patterns over names such as {examples}"
                )
    chosen = [name for name in linears if _selected(name, config)]
    if not chosen:
        raise ValueError(
            f"include={list(config.include)} exclude={list(config.exclude)} leave no layer of "
            f"{type(model).__name__} to quantize"
        )
    if config.weight.granularity == "per_group":
        uneven = {
            name: linears[name].in_features for name in chosen if linears[name].in_features % config.weight.group_size
        }
        if uneven:
            name, width = next(iter(uneven.items()))
            raise ValueError(
                f"group_size={config.weight.group_size} does not divide the input width {width} of {name} "
                f"({len(uneven)} layer(s) affected); allowed: a divisor of every quantized layer's input width"
            )
    for name in chosen:
        model.set_submodule(
            name,
            QuantLinear.from_linear(
                linears[name],
                weight_spec=config.weight,
                weight_bits=config.weight_bits,
                activation_spec=config.activation,
                activation_bits=config.activation_bits,
                static_activations=config.static_activations,
            ),
        )
    return summarize(model)


def summarize(model: nn.Module) -> QuantizationSummary:
    """Count quantized layers and parameters of a model (after `quantize_model`)."""
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    return QuantizationSummary(
        quantized_layers=len(quantized),
        linear_layers=sum(isinstance(m, nn.Linear) for m in model.modules()),
        quantized_params=sum(m.weight.numel() for m in quantized),
        total_params=sum(p.numel() for p in model.parameters()),
    )


def set_weight_bits(model: nn.Module, bits: float | None) -> int:
    """Set the weight bit-width of every quantized layer; returns how many layers were set.

    This is the one way a bit-width changes: a schedule decides, a callback calls this.
    """
    bits = validate_bits(bits)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no quantized layer; call quantize_model first")
    for layer in layers:
        layer.weight_quantizer.set_bits(bits)
    return len(layers)


def set_activation_bits(model: nn.Module, bits: float | None) -> int:
    """Set the input-activation bit-width of every quantized layer (None: full-precision activations)."""
    bits = validate_bits(bits)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for layer in layers:
        layer.input_quantizer.set_bits(bits)
    return len(layers)


__all__ = [
    "DEFAULT_INCLUDE",
    "PASS_THROUGH_BITS",
    "QuantConfig",
    "QuantizationSummary",
    "quantize_model",
    "set_activation_bits",
    "set_weight_bits",
    "summarize",
]
