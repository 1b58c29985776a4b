"""Which layers of a student deploy, and at what settings: the checks every export format shares.

Fractional bit-widths are a training device (the curriculum passes through
them); hardware has integer codes only, so a student still at 5.5 bits is not
deployable. Neither is a student with no quantized weight (the `fp` schedule).
"""

from __future__ import annotations

from dataclasses import asdict

from torch import nn

from fraqat_cli.quant import LAYER_KINDS, PASS_THROUGH_BITS, QuantizedLayer


def integer_bits(bits: float) -> int | None:
    """`bits` as an int when it is one (float32 buffers hold integers exactly), else None."""
    return int(bits) if float(bits).is_integer() else None


def deployable_layers(student: nn.Module, source: str, kinds: tuple[str, ...] = LAYER_KINDS,
                      target: str = "this format") -> dict[str, QuantizedLayer]:
    """The student's quantized layers by name; ValueError (naming `source`) when it cannot deploy, or when
    one is of a layer kind outside `kinds` (what `target`, the chosen format or runtime, can express)."""
    layers = {name: m for name, m in student.named_modules() if isinstance(m, QuantizedLayer)}
    quantized = {name: m for name, m in layers.items() if m.weight_bits < PASS_THROUGH_BITS}
    if not quantized:
        raise ValueError(
            f"{source} is not a quantized student: none of its {len(layers)} quantizable layers has quantized weights "
            f"(a schedule=fp run?); export a checkpoint trained with a quantizing schedule (e.g. fractional)"
        )
    fractional = {name: m.weight_bits for name, m in quantized.items() if integer_bits(m.weight_bits) is None}
    if fractional:
        name, bits = next(iter(fractional.items()))
        raise ValueError(
            f"{source} is at a fractional weight bit-width ({bits:g} bits in {name} and {len(fractional) - 1} other "
            f"layer(s)); only integer bit-widths deploy. Export a checkpoint from the end of the schedule "
            f"(its last stage is at integer bits, e.g. checkpoints/last.ckpt of a finished run)"
        )
    foreign = {name: m.kind for name, m in quantized.items() if m.kind not in kinds}
    if foreign:
        name, kind = next(iter(foreign.items()))
        raise ValueError(
            f"{source} has quantized {kind} layers ({name} and {len(foreign) - 1} other(s)), which {target} cannot "
            f"express; it expresses {', '.join(kinds)}. Export another format, or train with quantizer.layers "
            f"limited to those kinds")
    for name, m in quantized.items():
        act = m.input_quantizer.current_bits
        if act < PASS_THROUGH_BITS and integer_bits(act) is None:
            raise ValueError(f"{source}: {name} has fractional activation bits {act:g}, which no runtime deploys; "
                             f"allowed: integer activation bits (4 or 8 for ONNX). Export a checkpoint from the end of "
                             f"the activation schedule (its last stage is at integer bits)")
    return quantized


def layer_record(layer: QuantizedLayer) -> dict:
    """The settings a runtime needs to reproduce one layer (JSON-able). `shape` is the weight's own;
    codes and scales are laid out over its matrix view (output channel x the rest)."""
    act = layer.input_quantizer
    act_bits = act.current_bits
    return {
        "kind": layer.kind,
        "bits": integer_bits(layer.weight_bits),
        "shape": list(layer.weight.shape),
        **asdict(layer.weight_quantizer.spec),
        "activation": {
            "bits": integer_bits(act_bits) if act_bits < PASS_THROUGH_BITS else None,
            **asdict(act.spec),
            "static": act.static,
            "range": [float(act.range_min), float(act.range_max)] if act.static and act.calibrated else None,
        },
    }
