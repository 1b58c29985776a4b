"""Lightning callbacks: the bit schedule, sample images from the student, and step time and memory."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import lightning as L
import torch

from fraqat_cli.quant import set_activation_bits, set_weight_bits


class BitScheduleCallback(L.Callback):
    """Before every step, set the student's weight bit-width to `schedule(step, max_steps)` and, given an
    `activation_schedule`, its activation bit-width to `activation_schedule(step, max_steps)`; log both.

    The bit-widths are functions of the global step alone, so a resumed run
    continues at the bit-widths the interrupted one had reached.
    """

    def __init__(self, schedule, activation_schedule=None) -> None:
        self.schedule, self.activation_schedule = schedule, activation_schedule
        self.activation_bits: float | None = None

    def apply(self, trainer: L.Trainer, module: L.LightningModule) -> float:
        step = min(trainer.global_step, trainer.max_steps - 1)
        bits = self.schedule(step, trainer.max_steps)
        set_weight_bits(module.student, bits)
        if self.activation_schedule is not None:
            self.activation_bits = self.activation_schedule(step, trainer.max_steps)
            set_activation_bits(module.student, self.activation_bits)
        return bits

    def on_fit_start(self, trainer, module) -> None:
        if trainer.max_steps is None or trainer.max_steps < 1:
            raise ValueError(f"trainer.max_steps must be a positive number of steps; got {trainer.max_steps}")
        self.apply(trainer, module)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        bits = self.apply(trainer, module)
        module.log("train/weight_bits", bits, on_step=True, on_epoch=False, batch_size=1)
        if self.activation_bits is not None:  # 32: full precision
            module.log("train/activation_bits", self.activation_bits, on_step=True, on_epoch=False, batch_size=1)


class SampleImagesCallback(L.Callback):
    """Every `every_n_steps`, draw images of fixed prompts with the student and save/log a grid."""

    def __init__(self, make_grid, every_n_steps: int, out_dir: str | Path) -> None:
        self.make_grid, self.every_n_steps, self.out_dir = make_grid, every_n_steps, Path(out_dir)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps <= 0 or step % self.every_n_steps:
            return
        # A sharded student's forward gathers its blocks from every rank: all ranks draw, rank 0 saves.
        if not trainer.is_global_zero and not getattr(trainer.strategy, "samples_on_every_rank", False):
            return
        grid = self.make_grid(module.student)
        if not trainer.is_global_zero:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"step_{step:06d}.png"
        grid.save(path)
        log_image = getattr(trainer.logger, "log_image", None)
        if log_image is not None:
            log_image(key="samples", images=[grid], step=step)


class StepStats(L.Callback):
    """Wall time of each training batch (forward, backward, optimizer; not the sample grids or checkpoints
    that follow it) and the accelerator's peak memory: what a user sizing a real run needs to know."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self._started = 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        self.durations.append(time.perf_counter() - self._started)

    def summary(self) -> dict:
        stats = {"seconds_per_batch": statistics.median(self.durations) if self.durations else None}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            stats["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return stats
