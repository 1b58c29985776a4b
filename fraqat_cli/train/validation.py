"""The held-out distillation loss the paper compares schedules by.

A share of the training rows (the paper holds out 2.5% of its prompts) is never trained on. Every
`every_n_steps` and at the end, the student's distillation loss on those rows is measured with noise and
timesteps fixed per row, so two runs (other schedules, other seeds) are measured on the same draws and
the curve moves only because the student does.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch.utils.data import Dataset, Subset, default_collate

VALIDATION_KEY = "val/loss"


def held_out_rows(rows: int, share: float, seed: int) -> list[int]:
    """The rows held out of `rows`: `share` of them (at least one when `share` > 0, never all of them), drawn
    by a permutation seeded with `seed` alone, so every run of the same data holds out the same rows."""
    if not 0 <= share < 1:
        raise ValueError(f"validation.share must be in [0, 1); got {share!r}")
    if share == 0 or rows < 2:
        return []
    count = min(rows - 1, max(1, math.ceil(share * rows)))
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:count].tolist())


def split_rows(dataset: Dataset, share: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """(training rows, held-out rows or None); disjoint, and the same for the same data, share and seed."""
    held = held_out_rows(len(dataset), share, seed)
    if not held:
        return dataset, None
    kept = sorted(set(range(len(dataset))) - set(held))
    return Subset(dataset, kept), Subset(dataset, held)


class HeldOutLoss(L.Callback):
    """Logs `val/loss` (the output MSE to the teacher on the held-out rows) every `every_n_steps` optimizer
    steps and after the last, and keeps the curve; it travels in last.ckpt, so a resumed run continues it.

    Every rank measures all held-out rows the same way (a sharded student needs every rank in its forward);
    the rows are few.
    """

    def __init__(self, rows: Dataset, every_n_steps: int, batch_size: int, seed: int) -> None:
        self.rows, self.every_n_steps, self.batch_size, self.seed = rows, every_n_steps, batch_size, seed
        self.curve: dict[int, float] = {}

    @torch.no_grad()
    def measure(self, module) -> float:
        """Mean over held-out rows of the distillation loss with each row's fixed noise and timestep."""
        was_training = module.student.training
        module.student.eval()
        total, count = 0.0, 0
        try:
            with module.trainer.precision_plugin.forward_context():
                for start in range(0, len(self.rows), self.batch_size):
                    indices = range(start, min(start + self.batch_size, len(self.rows)))
                    batch = default_collate([self.rows[i] for i in indices])
                    batch = {k: v.to(module.device) for k, v in batch.items()}
                    generators = [torch.Generator().manual_seed(self.seed * 1_000_003 + i) for i in indices]
                    loss = module.distillation_loss(batch, generators=generators)["output_loss"]
                    total, count = total + float(loss) * len(indices), count + len(indices)
        finally:
            module.student.train(was_training)
        return total / count

    def record(self, trainer, module) -> None:
        step = trainer.global_step
        if step in self.curve:
            return
        self.curve[step] = self.measure(module)
        if trainer.logger:
            trainer.logger.log_metrics({VALIDATION_KEY: self.curve[step]}, step=step)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step and step % self.every_n_steps == 0:  # once per optimizer step: `record` skips a step it has
            self.record(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        self.record(trainer, module)

    def summary(self) -> dict:
        if not self.curve:
            return {}
        last = max(self.curve)
        return {"validation_loss": self.curve[last], "validation_rows": len(self.rows),
                "validation_curve": [[step, self.curve[step]] for step in sorted(self.curve)]}

    def state_dict(self) -> dict:
        return {"curve": [[step, loss] for step, loss in sorted(self.curve.items())]}

    def load_state_dict(self, state: dict) -> None:
        self.curve = {int(step): float(loss) for step, loss in state.get("curve", [])}
