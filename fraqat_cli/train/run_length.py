"""How long a run is and how big its optimizer steps are: the global batch, accumulation, and steps.

The paper states its budget in epochs (25) and its batch as a global size
(128 or 256 images per optimizer step). Those hold on any number of devices:
gradient accumulation makes up what devices x per-device batch lacks, and the
step count follows from the dataset size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import DictConfig

from fraqat_cli.checks import positive_int, positive_number


@dataclass(frozen=True)
class RunLength:
    devices: int
    per_device_batch: int
    accumulation: int
    samples: int
    steps: int
    epochs: float | None

    @property
    def global_batch(self) -> int:
        return self.devices * self.per_device_batch * self.accumulation

    def __str__(self) -> str:
        batch = (f"global batch {self.global_batch} = {self.devices} device(s) x {self.per_device_batch} per device "
                 f"x {self.accumulation} accumulation")
        if self.epochs is None:
            return f"{batch}; {self.steps:,} steps ({self.steps * self.global_batch / self.samples:.2f} epochs of " \
                   f"{self.samples:,} samples)"
        return f"{batch}; {self.epochs:g} epochs of {self.samples:,} samples = {self.steps:,} steps"


def check_run_length(cfg: DictConfig) -> None:
    """The settings alone, before any model is built (divisibility needs the device count: `run_length`)."""
    if cfg.get("global_batch_size") is not None:
        positive_int("global_batch_size", cfg.global_batch_size, or_null=True)
    if cfg.get("epochs") is not None:
        positive_number("epochs", cfg.epochs, or_null=True)


def run_length(cfg: DictConfig, devices: int, samples: int) -> RunLength:
    """Accumulation from `global_batch_size` (when set) and steps from `epochs` (when set), else as configured."""
    per_device = cfg.data.batch_size
    accumulation = cfg.trainer.accumulate_grad_batches
    if cfg.get("global_batch_size") is not None:
        target = positive_int("global_batch_size", cfg.global_batch_size, or_null=True)
        per_step = devices * per_device
        if target % per_step:
            raise ValueError(
                f"global_batch_size={target} is not a multiple of devices x data.batch_size = {devices} x "
                f"{per_device} = {per_step}; allowed: a multiple of {per_step} (or change data.batch_size)"
            )
        accumulation = target // per_step
    epochs = cfg.get("epochs")
    steps = cfg.trainer.max_steps
    if epochs is not None:
        epochs = positive_number("epochs", epochs, or_null=True)
        steps = max(1, math.ceil(epochs * samples / (devices * per_device * accumulation)))
    return RunLength(devices, per_device, accumulation, samples, steps, epochs)


def short_schedule_warning(schedule, steps: int) -> str | None:
    """One line when `steps` is too short for the schedule's stages (some bit-widths never occur), naming them
    and the budget that holds them all; None when every stage gets a step (or the schedule has no stages)."""
    skipped = schedule.skipped_stages(steps) if hasattr(schedule, "skipped_stages") else []
    if not skipped:
        return None
    bits = ", ".join(f"{s.bits:g}" for s in skipped)
    return (f"{steps} steps are too few for schedule {schedule.name}'s {len(schedule.stages)} stages: "
            f"{bits} bits never occur; every stage gets a step from {schedule.steps_for_every_stage()} steps on")
