"""fraqat-plan's trace at the start of a GPU run (`conf/callbacks/default.yaml`: `memory_check`)."""

from __future__ import annotations

import lightning as L
import torch
from omegaconf import OmegaConf

from fraqat_cli.cli import warn
from fraqat_cli.plan.command import _size, layout_of, per_device, trace_run, training_samples
from fraqat_cli.plan.trace import example_row


class MemoryCheck(L.Callback):
    """Before the student moves onto the GPU, trace one step of this very run (the config its checkpoints record)
    and warn when its peak will not fit the GPU's memory. Advice only: it never fails a run, and one process a
    machine (local rank 0) traces, since the others would trace the same step."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or trainer.local_rank != 0 or not torch.cuda.is_available():
            return
        cfg = OmegaConf.create(pl_module.record["config"])
        if str(cfg.trainer.accelerator) == "cpu":
            return
        try:
            layout, samples = layout_of(cfg), training_samples(cfg)
            trace, _ = trace_run(cfg, layout, samples, example_row(cfg.model))
            peak, memory = per_device(trace, layout)["peak"], torch.cuda.get_device_properties(0).total_memory
        except Exception as error:  # the plan is advice: a config it cannot trace still trains
            warn(f"could not plan this run's memory ({type(error).__name__}: {error})")
            return
        if peak > memory:
            warn(f"this run's traced peak is {_size(peak)} per device, more than this GPU's {_size(memory)}; "
                 f"fraqat-plan with the same overrides lists the options that would make it fit")
