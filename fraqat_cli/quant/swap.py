"""Where to quantize: swap a model's layers of the chosen kinds (linear, pointwise and depthwise
convolutions) for their fake-quantized versions, by name pattern."""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from torch import nn

from fraqat_cli.quant.conv import QuantConv2d, conv_kind
from fraqat_cli.quant.linear import QuantizedLayer, QuantLinear
from fraqat_cli.quant.spec import PASS_THROUGH_BITS, QuantSpec, validate_bits

# Diffusers DiTs keep 99.9% of their parameters in blocks named `transformer_blocks`
# (FLUX adds `single_transformer_blocks`); embeddings, timestep/caption projections
# and the output layer live outside them and stay in full precision by default.
DEFAULT_INCLUDE = ("*transformer_blocks.*",)
# Layer kinds a quantizer can select: `nn.Linear`; 1x1 convolutions (a matrix product at every pixel: most
# of Sana's feed-forward); depthwise convolutions (Sana's 3x3 between them: 2-5% of its block weights).
LAYER_KINDS = ("linear", "pointwise_conv", "depthwise_conv")
DEFAULT_LAYERS = ("linear",)  # the paper's "linear layers only"


def layer_kind(module: nn.Module) -> str | None:
    """The kind of `module` in LAYER_KINDS (quantized or not), or None when no kind covers it."""
    if isinstance(module, nn.Linear):
        return "linear"
    return conv_kind(module)


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
    layers: tuple[str, ...] = DEFAULT_LAYERS

    def __post_init__(self) -> None:
        validate_bits(self.weight_bits)
        validate_bits(self.activation_bits)
        if isinstance(self.layers, str):
            raise ValueError(f"layers must be a list of layer kinds, not the single string {self.layers!r}; "
                             f"allowed kinds: {', '.join(LAYER_KINDS)}")
        object.__setattr__(self, "layers", tuple(self.layers))
        unknown = [k for k in self.layers if k not in LAYER_KINDS]
        if unknown or not self.layers:
            raise ValueError(f"layers={list(self.layers)} names unknown layer kind(s) {unknown}; "
                             f"allowed: a non-empty list of {', '.join(LAYER_KINDS)}")
        for name in ("include", "exclude"):
            patterns = getattr(self, name)
            if isinstance(patterns, str):
                raise ValueError(f"{name} must be a list of patterns, not the single string {patterns!r}")
            object.__setattr__(self, name, tuple(patterns))
        if not self.include:
            raise ValueError("include is empty; give at least one module-name pattern, e.g. '*'")


@dataclass(frozen=True)
class QuantizationSummary:
    """How much of a model is quantized: layer counts (of the selected kinds) and parameter counts."""

    quantized_layers: int
    eligible_layers: int  # layers of the selected kinds, quantized or not
    quantized_params: int
    total_params: int
    kinds: tuple[str, ...] = DEFAULT_LAYERS

    @property
    def quantized_fraction(self) -> float:
        return self.quantized_params / max(self.total_params, 1)

    def __str__(self) -> str:
        what = "linear" if self.kinds == ("linear",) else "/".join(self.kinds)
        return (
            f"{self.quantized_layers}/{self.eligible_layers} {what} layers quantized, "
            f"{self.quantized_params:,}/{self.total_params:,} parameters ({self.quantized_fraction:.1%})"
        )


def _selected(name: str, config: QuantConfig) -> bool:
    return any(fnmatchcase(name, p) for p in config.include) and not any(fnmatchcase(name, p) for p in config.exclude)


def quantize_model(model: nn.Module, config: QuantConfig | None = None) -> QuantizationSummary:
    """Replace the layers of `model` of the kinds `config.layers` names (`QuantLinear` for `nn.Linear`,
    `QuantConv2d` for pointwise and depthwise convolutions) in place.

    Layers are selected by `fnmatch` patterns on their dotted module names.
    Raises ValueError when a pattern matches no layer of those kinds (a typo would
    otherwise silently leave the model in full precision).
    """
    config = config or QuantConfig()
    what = "linear" if config.layers == ("linear",) else "/".join(config.layers)
    linears = {
        name: module
        for name, module in model.named_modules()
        if layer_kind(module) in config.layers and not isinstance(module, QuantizedLayer)
    }
    for kind in ("include", "exclude"):
        for pattern in getattr(config, kind):
            if not any(fnmatchcase(name, pattern) for name in linears):
                if any(isinstance(m, QuantizedLayer) for m in model.modules()):
                    raise ValueError(
                        f"{kind} pattern {pattern!r} matches no unquantized {what} layer: "
                        f"{type(model).__name__} was already quantized; quantize a fresh copy instead"
                    )
                examples = ", ".join(list(linears)[:5]) or "none"
                raise ValueError(
                    f"{kind} pattern {pattern!r} matches no {what} layer of {type(model).__name__}; "
                    f"allowed: fnmatch patterns over names such as {examples}"
                )
    chosen = [name for name in linears if _selected(name, config)]
    if not chosen:
        raise ValueError(
            f"include={list(config.include)} exclude={list(config.exclude)} leave no layer of "
            f"{type(model).__name__} to quantize"
        )
    if config.weight.granularity == "per_group":
        uneven = {name: width for name in chosen
                  if (width := linears[name].weight[0].numel()) % config.weight.group_size}
        if uneven:
            name, width = next(iter(uneven.items()))
            raise ValueError(
                f"group_size={config.weight.group_size} does not divide the input width {width} of {name} "
                f"({len(uneven)} layer(s) affected); allowed: a divisor of every quantized layer's input width"
            )
    settings = dict(weight_spec=config.weight, weight_bits=config.weight_bits, activation_spec=config.activation,
                    activation_bits=config.activation_bits, static_activations=config.static_activations)
    for name in chosen:
        layer = linears[name]
        swapped = (QuantLinear.from_linear(layer, **settings) if isinstance(layer, nn.Linear)
                   else QuantConv2d.from_conv(layer, **settings))
        model.set_submodule(name, swapped)
    return summarize(model, config.layers)


def summarize(model: nn.Module, kinds: tuple[str, ...] = DEFAULT_LAYERS) -> QuantizationSummary:
    """Count quantized layers and parameters of a model (after `quantize_model`); eligible layers are
    those of `kinds`."""
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLayer)]
    return QuantizationSummary(
        quantized_layers=len(quantized),
        eligible_layers=sum(layer_kind(m) in kinds for m in model.modules()),
        quantized_params=sum(m.weight.numel() for m in quantized),
        total_params=sum(p.numel() for p in model.parameters()),
        kinds=tuple(kinds),
    )


def set_weight_bits(model: nn.Module, bits: float | None) -> int:
    """Set the weight bit-width of every quantized layer; returns how many layers were set.

    This is the one way a bit-width changes: a schedule decides, a callback calls this.
    """
    bits = validate_bits(bits)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no quantized layer; call quantize_model first")
    for layer in layers:
        layer.weight_quantizer.set_bits(bits)
    return len(layers)


def set_activation_bits(model: nn.Module, bits: float | None) -> int:
    """Set the input-activation bit-width of every quantized layer (None: full-precision activations)."""
    bits = validate_bits(bits)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLayer)]
    for layer in layers:
        layer.input_quantizer.set_bits(bits)
    return len(layers)


__all__ = [
    "DEFAULT_INCLUDE",
    "DEFAULT_LAYERS",
    "LAYER_KINDS",
    "PASS_THROUGH_BITS",
    "QuantConfig",
    "QuantizationSummary",
    "quantize_model",
    "set_activation_bits",
    "set_weight_bits",
    "summarize",
    "layer_kind",
]
