"""Make the student: a float32 copy of the teacher transformer with fake-quantized linear layers."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from omegaconf import DictConfig
from torch import nn

from fraqat_cli.quant import PASS_THROUGH_BITS, QuantizationSummary, quantize_model
from fraqat_cli.quantizer import build_quant_config


def build_student(teacher: nn.Module, quantizer_cfg: DictConfig, model_cfg: DictConfig,
                  start_bits: float) -> tuple[nn.Module, QuantizationSummary]:
    """Copy `teacher`, keep float32 master weights, quantize the layers the configs select.

    `start_bits` is the schedule's first bit-width. A schedule that never
    quantizes (`fp`) also leaves activations in full precision: the reference
    student is the teacher itself, trained.
    """
    student = copy.deepcopy(teacher).train()
    if student.dtype != torch.float32:
        student.to(torch.float32)
    student.requires_grad_(True)
    config = build_quant_config(
        quantizer_cfg,
        include=model_cfg.quantize.get("include"),
        exclude=model_cfg.quantize.get("exclude"),
        weight_bits=start_bits,
    )
    if start_bits >= PASS_THROUGH_BITS:
        config = replace(config, activation_bits=None)
    return student, quantize_model(student, config)


def restore_student(config: DictConfig, state: dict, teacher: nn.Module) -> nn.Module:
    """The student saved in a fraqat-train checkpoint (`state`), float32 master weights and bit-widths as trained."""
    bits = state["fraqat"]["weight_bits"][0]
    student, _ = build_student(teacher, config.quantizer, config.model, start_bits=bits)
    weights = {k.removeprefix("student."): v for k, v in state["state_dict"].items() if k.startswith("student.")}
    student.load_state_dict(weights)
    return student.eval()
