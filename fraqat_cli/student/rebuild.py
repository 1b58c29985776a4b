"""Rebuild a trained student from its checkpoint without copying any weight of the teacher: its structure is
taken on the meta device (no memory) and the checkpoint's tensors are assigned into it, one at a time cast to
where they are used (evaluation and export)."""

from __future__ import annotations

import torch
from torch import nn

from fraqat_cli.quant import PASS_THROUGH_BITS, FakeQuantizer, QuantizedLayer
from fraqat_cli.student.build import model_skeleton, quantize_student
from fraqat_cli.student.checkpoint import StudentCheckpoint, release_pages
from fraqat_cli.student.finite import first_non_finite
from fraqat_cli.student.lora import merge_lora_state


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
