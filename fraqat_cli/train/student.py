"""Make the student: a float32 copy of the teacher with fake-quantized linear layers; or rebuild a trained one.

Training copies the teacher (float32 master weights). Evaluation and export rebuild a trained student
from its checkpoint without copying any weight of the teacher: its structure is taken on the meta device
(no memory) and the checkpoint's tensors are assigned into it, one at a time cast to where they are used.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from importlib import resources

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fraqat_cli.checks import positive_int
from fraqat_cli.quant import (
    DEFAULT_INCLUDE,
    PASS_THROUGH_BITS,
    FakeQuantizer,
    QuantConfig,
    QuantizationSummary,
    QuantizedLayer,
    QuantSpec,
    quantize_model,
)
from fraqat_cli.train.checkpointing import StudentCheckpoint, release_pages
from fraqat_cli.train.lora import merge_lora_state


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
    transformer blocks) which layers, `weight_bits` at what width. A quantizer config saved by an older
    version (no `_target_`, fewer keys) takes what it lacks from `_base.yaml`."""
    from fraqat_cli.cli import instantiate_or_raise

    node = OmegaConf.create(OmegaConf.to_container(quantizer, resolve=True) if isinstance(quantizer, DictConfig)
                            else dict(quantizer))
    if "_target_" not in node:
        node = OmegaConf.merge(_base_quantizer(), {"granularity": "per_channel"}, node)
    selection = selection or {}
    include, exclude = selection.get("include") or DEFAULT_INCLUDE, selection.get("exclude") or ()
    return instantiate_or_raise(node, weight_bits=weight_bits, include=list(include), exclude=list(exclude))


def _base_quantizer() -> DictConfig:
    return OmegaConf.load(resources.files("fraqat_cli.conf") / "quantizer" / "_base.yaml")


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


def rebuild_student(checkpoint: StudentCheckpoint, skeleton: nn.Module, *, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu", bake: bool = False) -> nn.Module:
    """The student stored in `checkpoint`, with the structure of `skeleton` (the teacher or its skeleton).

    dtype None keeps the stored float32 master weights; on the CPU they are the checkpoint's own
    memory-mapped tensors, not copies (export). `bake`: each quantized weight is fake-quantized once, in
    float32 from its master weight exactly as in training, then cast to `dtype` (evaluation): the student
    multiplies by the very weights it trained with, rounded once to `dtype`. Quantizer buffers stay float32.
    A checkpoint with a NaN or infinite tensor (a diverged run's) is refused.
    """
    refuse_non_finite(checkpoint)
    student = model_skeleton(skeleton)
    quantize_student(student, checkpoint.config.quantizer, checkpoint.config.get("selection"),
                     checkpoint.weight_bits or PASS_THROUGH_BITS)
    quantizers = {f"{name}.{key}" for name, m in student.named_modules() if isinstance(m, FakeQuantizer)
                  for key, _ in [*m.named_buffers(recurse=False), *m.named_parameters(recurse=False)]}
    quantized = {f"{name}.weight": m for name, m in student.named_modules() if isinstance(m, QuantizedLayer)}
    release = bake and checkpoint.mapped  # the student gets its own copies: the file's pages go as read
    stored, merged = merge_lora_state(checkpoint.state)  # LoRA-QAT: each W + scale B A, computed as in training
    fresh = {stored[k].data_ptr() for k in merged}  # new memory, not the file's: never released
    state = {}
    for key, tensor in stored.items():
        if bake and key in quantized:
            state[key] = tensor  # baked below, one layer at a time, from the float32 master weight
            continue
        if key in quantizers or not tensor.is_floating_point():
            value = tensor.to(device)
        else:
            value = tensor.to(device=device, dtype=dtype or tensor.dtype)
        if release and tensor.data_ptr() not in fresh:
            value = value.clone() if value.data_ptr() == tensor.data_ptr() else value
            release_pages(tensor)
        state[key] = value
    _check_fits(student, state, checkpoint, skeleton)
    student.load_state_dict(state, assign=True)
    _restore_computed_buffers(student, state, device, dtype)
    del state
    if bake:
        _bake(quantized.values(), device, dtype, release, fresh)
    leftover = [name for name, t in [*student.named_parameters(), *student.named_buffers()] if t.is_meta]
    if leftover:
        raise ValueError(f"checkpoint {str(checkpoint.path)!r} leaves {leftover[:5]} of the student empty")
    return student.requires_grad_(False).eval()



def refuse_non_finite(checkpoint: StudentCheckpoint) -> None:
    """A checkpoint with a NaN or infinite tensor (a diverged run's) is refused, naming the tensor."""
    from fraqat_cli.train.divergence import first_non_finite

    if (bad := first_non_finite(checkpoint.state)) is not None:
        raise ValueError(f"checkpoint {str(checkpoint.path)!r} holds non-finite weights ({bad!r} has NaN or inf): "
                         f"the run that wrote it diverged; use an earlier checkpoint of that run")


def _check_fits(student: nn.Module, state: dict, checkpoint: StudentCheckpoint, skeleton: nn.Module) -> None:
    wanted = student.state_dict(keep_vars=True)
    missing, unexpected = sorted(wanted.keys() - state.keys()), sorted(state.keys() - wanted.keys())
    misshapen = sorted(k for k in wanted.keys() & state.keys() if wanted[k].shape != state[k].shape)
    if missing or unexpected or misshapen:
        raise ValueError(f"checkpoint {str(checkpoint.path)!r} does not fit {type(skeleton).__name__} "
                         f"built from its config: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                         f"of another shape {misshapen[:3]}")


def _restore_computed_buffers(student: nn.Module, state: dict, device, dtype) -> None:
    """The non-persistent buffers (tables computed at construction), as the training student had them."""
    for name, buffer in student.named_buffers():
        if name not in state and not buffer.is_meta:
            owner, _, attr = name.rpartition(".")
            cast = (dtype or torch.float32) if buffer.is_floating_point() else buffer.dtype
            setattr(student.get_submodule(owner), attr, buffer.to(device=device, dtype=cast))


@torch.no_grad()
def _bake(layers, device, dtype, release: bool, fresh: set[int]) -> None:
    """Each quantized weight fake-quantized once, in float32 from its master weight, then cast to `dtype`."""
    for layer in layers:
        master = layer.freeze(device, dtype)
        if release and master.data_ptr() not in fresh:
            release_pages(master)
