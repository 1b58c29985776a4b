"""Make the student: a float32 copy of the teacher with fake-quantized layers, from the `quantizer` and
`selection` config nodes; or its empty skeleton, for a stored student to be rebuilt into."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fraqat_cli.checks import positive_int
from fraqat_cli.cli import instantiate_or_raise
from fraqat_cli.quant import DEFAULT_INCLUDE, QuantConfig, QuantizationSummary, QuantSpec, quantize_model


def quant_config(*, granularity: str, group_size: int | None, symmetric: bool, rounding: str,
                 activation_bits: float | None, activation_granularity: str, activation_symmetric: bool,
                 activation_rounding: str, static_activations: bool, calibration_batches: int, layers,
                 weight_bits: float | None, include=DEFAULT_INCLUDE, exclude=(),
                 scale_dtype: str = "float32", scale: str = "max") -> QuantConfig:
    """The `_target_` of `conf/quantizer/_base.yaml`: its flat keys (the names users override) as the quantization
    core's `QuantConfig`. `weight_bits` comes from the schedule, `include`/`exclude` from `conf/selection`.
    `scale_dtype` defaults to float32 and `scale` to max: a checkpoint saved before a key existed trained so."""
    if static_activations:
        positive_int("quantizer.calibration_batches", calibration_batches)
    return QuantConfig(
        weight=QuantSpec(granularity=granularity, group_size=group_size, symmetric=bool(symmetric), rounding=rounding,
                         scale_dtype=scale_dtype, scale=scale),
        weight_bits=weight_bits,
        activation=QuantSpec(granularity=activation_granularity, symmetric=bool(activation_symmetric),
                             rounding=activation_rounding),
        activation_bits=activation_bits,
        static_activations=bool(static_activations),
        include=tuple(include),
        exclude=tuple(exclude),
        layers=layers if isinstance(layers, str) else tuple(layers),  # a lone string: QuantConfig names it
    )


def build_quant_config(quantizer: Mapping, selection: Mapping | None = None,
                       weight_bits: float | None = 8) -> QuantConfig:
    """`quantizer` (a `conf/quantizer` entry) says how, `selection` (a `conf/selection` entry; None: the
    transformer blocks) which layers, `weight_bits` at what width."""
    node = OmegaConf.create(OmegaConf.to_container(quantizer, resolve=True) if isinstance(quantizer, DictConfig)
                            else dict(quantizer))
    selection = selection or {}
    include, exclude = selection.get("include") or DEFAULT_INCLUDE, selection.get("exclude") or ()
    return instantiate_or_raise(node, weight_bits=weight_bits, include=list(include), exclude=list(exclude))


def quantize_student(model: nn.Module, quantizer_cfg: DictConfig, selection_cfg: DictConfig | None,
                     start_bits: float) -> QuantizationSummary:
    """Swap the layers `selection_cfg` names for fake-quantized ones at `start_bits` (the schedule's first
    width). Activations follow `quantizer.activation_bits` alone (null: full precision)."""
    return quantize_model(model, build_quant_config(quantizer_cfg, selection_cfg, weight_bits=start_bits))


def build_student(teacher: nn.Module, quantizer_cfg: DictConfig, selection_cfg: DictConfig | None,
                  start_bits: float) -> tuple[nn.Module, QuantizationSummary]:
    """Copy `teacher`, keep float32 master weights, quantize the layers `selection_cfg` names.

    `start_bits` is the schedule's first bit-width.
    """
    student = copy.deepcopy(teacher).train()
    if student.dtype != torch.float32:
        student.to(torch.float32)
    student.requires_grad_(True)
    return student, quantize_student(student, quantizer_cfg, selection_cfg, start_bits)


def model_skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and persistent buffers are empty meta tensors (no memory), ready
    for `load_state_dict(assign=True)`. Non-persistent buffers (tables computed at construction, which no
    checkpoint holds) are copied as they are. A skeleton passed in is copied again, still without memory."""
    empty = {}
    for tensor in model.state_dict(keep_vars=True).values():
        meta = torch.empty_like(tensor, device="meta")
        empty[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(model, empty)
