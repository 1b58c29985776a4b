"""Low-rank QAT (`trainable=lora`): each quantized layer trains a low-rank update inside its quantizer.

The quantized layer computes `Q(W + scale * B A)` (EfficientDM's QALoRA; the FraQAT paper's SVDQAT baseline
is a low-rank QAT too): W is frozen, only A (rank x in) and B (out x rank) train, B starts at zero so the
student starts exactly as full QAT does, and scale = alpha / rank. The update lives in a
`torch.nn.utils.parametrize` parametrization of the layer's `weight`, so the quantized layers need no change
and the bit schedule applies as it is. Merged into W (`merge_lora`, `merge_lora_state`), the update becomes
part of the deployed integer codes: the deployed model is exactly the trained one.

The frozen base W stays in the teacher's 16-bit dtype (`trainable.lora.base_dtype: teacher`): the student's
float32 copy of a bf16 teacher holds bf16 values upcast, so the 16-bit base loses nothing, and halves what the
largest part of a LoRA student holds (FLUX.1-schnell: 23.8 GB instead of 47.6 GB). The fake quantizer never
reads a float32 copy of the base: the parametrization hands it W + scale B A computed in float32 layer by layer
(`merged_weight`), a temporary of one layer that exists while that layer computes (and, under gradient
checkpointing, again while its block recomputes). Its values are those the float32 base gave, bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import nn
from torch.nn.utils import parametrize

from fraqat_cli.checks import positive_int, positive_number
from fraqat_cli.quant import FakeQuantizer

# State-dict keys of a parametrized weight (torch's naming; the update is the weight's only parametrization).
ORIGINAL = ".parametrizations.weight.original"
UPDATE = ".parametrizations.weight.0."


def merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: torch.Tensor):
    """W + scale * B A, shaped like W (a linear (out, in) or a convolution (out, in, k, k) weight), computed in
    float32 outside autocast: training, `merge_lora` and `merge_lora_state` all compute it here, bit for bit.
    A 16-bit W gives a float32 result (the update is never rounded to 16 bits), a float32 or float64 W its own."""
    device = weight.device.type
    if device != "meta" and torch.is_autocast_enabled(device):
        with torch.autocast(device_type=device, enabled=False):
            return merged_weight(weight, lora_A, lora_B, scale)
    update = (lora_B.float() @ lora_A.float()).view(weight.shape) * scale  # (out, in...)
    return (weight.float() + update).to(torch.promote_types(weight.dtype, torch.float32))


class LowRankUpdate(nn.Module):
    """The parametrization W -> W + (alpha / rank) B A; A (rank, in) Kaiming-uniform as nn.Linear's, B zero."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float) -> None:
        super().__init__()
        fan_in = weight[0].numel()
        self.lora_A = nn.Parameter(torch.empty(rank, fan_in, device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(weight.shape[0], rank, device=weight.device, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.register_buffer("scale", torch.tensor(alpha / rank, dtype=torch.float32, device=weight.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return merged_weight(weight, self.lora_A, self.lora_B, self.scale)


@dataclass(frozen=True)
class LoraSummary:
    layers: int
    rank: int
    alpha: float
    trainable_params: int
    total_params: int

    def __str__(self) -> str:
        return (f"LoRA-QAT rank {self.rank} (alpha {self.alpha:g}) on {self.layers} quantized layers: "
                f"{self.trainable_params:,} trainable parameters "
                f"({self.trainable_params / self.total_params:.1%} of {self.total_params:,})")


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Layers whose `weight` passes through a weight quantizer (QuantLinear and any other quantized layer)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(getattr(m, "weight_quantizer", None), FakeQuantizer) and isinstance(m.weight, torch.Tensor)}


def add_lora(model: nn.Module, rank: int, alpha: float, layers=("*",),
             base_dtype: torch.dtype | None = None) -> LoraSummary:
    """Put a low-rank update inside the weight quantizer of every quantized layer whose name matches an fnmatch
    pattern in `layers`; the base weights keep their values (freezing them is the trainable patterns' job), stored
    in `base_dtype` when given (the teacher's 16-bit dtype: the values it holds anyway)."""
    positive_int("trainable.lora.rank", rank)
    positive_number("trainable.lora.alpha", alpha)
    candidates = quantized_layers(model)
    chosen = {n: m for n, m in candidates.items() if any(fnmatchcase(n, p) for p in layers)}
    if not chosen:
        raise ValueError(f"trainable.lora.layers {list(layers)} match no quantized layer; allowed: fnmatch patterns "
                         f"over names such as {', '.join(list(candidates)[:3]) or '(the model has none)'}")
    added = 0
    for layer in chosen.values():
        update = LowRankUpdate(layer.weight, rank, float(alpha))
        parametrize.register_parametrization(layer, "weight", update)
        if base_dtype is not None:
            base = layer.parametrizations.weight.original
            base.data = base.data.to(base_dtype)  # the same Parameter, now 16-bit: modules and hooks still see it
        added += update.lora_A.numel() + update.lora_B.numel()
    total = sum(p.numel() for p in model.parameters())
    return LoraSummary(len(chosen), rank, float(alpha), added, total)


def merge_lora(model: nn.Module) -> int:
    """Bake every low-rank update into its layer's weight (a plain parameter again); returns how many."""
    merged = 0
    for module in list(model.modules()):
        if parametrize.is_parametrized(module, "weight") and any(
                isinstance(p, LowRankUpdate) for p in module.parametrizations["weight"]):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            merged += 1
    return merged


def merge_lora_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """A LoRA student's state dict with each update merged into its weight (`<layer>.weight`), the keys of a
    student without LoRA; and the set of merged keys (new tensors: the rest are `state`'s own). A state
    without LoRA comes back as it is."""
    merged, out = set(), {}
    for key, tensor in state.items():
        if key.endswith(ORIGINAL):
            layer = key.removesuffix(ORIGINAL)
            out[f"{layer}.weight"] = merged_weight(tensor, *(state[layer + UPDATE + k]
                                                             for k in ("lora_A", "lora_B", "scale")))
            merged.add(f"{layer}.weight")
        elif UPDATE not in key:
            out[key] = tensor
    return out, merged


def lora_from_config(student: nn.Module, trainable_cfg, teacher_dtype: torch.dtype) -> LoraSummary | None:
    """`trainable=lora`'s updates on `student` (conf/trainable/lora.yaml: rank, alpha, layers, base_dtype), as
    training and `fraqat-plan` both build it; None, and no change, for the other trainable options."""
    lora = trainable_cfg.get("lora")
    if not lora:
        return None
    settings = {k: v for k, v in lora.items() if k != "base_dtype"}
    return add_lora(student, **settings, base_dtype=base_dtype(lora.get("base_dtype", "float32"), teacher_dtype))


BASE_DTYPES = ("teacher", "float32")


def base_dtype(name, teacher_dtype: torch.dtype) -> torch.dtype | None:
    """`trainable.lora.base_dtype`: `teacher` keeps the frozen base in the teacher's dtype when it is 16-bit,
    `float32` (None: no change) in the student's float32."""
    if name not in BASE_DTYPES:
        raise ValueError(f"trainable.lora.base_dtype={name!r} is not allowed; allowed: {', '.join(BASE_DTYPES)}")
    if name == "teacher" and teacher_dtype in (torch.bfloat16, torch.float16):
        return teacher_dtype
    return None


def check_lora_settings(trainable_cfg) -> None:
    """`trainable.lora`'s rank, alpha and base dtype, refused before any model is built (the layers are checked on
    the model)."""
    lora = trainable_cfg.get("lora")
    if lora:
        positive_int("trainable.lora.rank", lora.get("rank"))
        positive_number("trainable.lora.alpha", lora.get("alpha"))
        base_dtype(lora.get("base_dtype", "float32"), torch.float32)
