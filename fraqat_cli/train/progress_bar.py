"""The training bar: optimizer step of the run's total, ETA, loss and weight bits, in one `Progress` line.

Lightning's own bar counts batches of an epoch (`Epoch 2/-2 ... 6/6` in a run sized in steps) and has no room
for the weight bit-width, the one number this tool is about; redirected, it writes nothing useful."""

from __future__ import annotations

from lightning.pytorch.callbacks import ProgressBar

from fraqat_cli.progress import Progress


class TrainingProgress(ProgressBar):
    """`[training] 25/50 steps (50%), 0:02 elapsed, ETA 0:02, loss 0.0101, bits 4.75` (rank 0 only)."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled, self._line, self._step = True, None, 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, module) -> None:
        self._step = trainer.global_step
        self._line = Progress("training", trainer.max_steps, unit="steps", initial=self._step,
                              enabled=self._enabled and trainer.is_global_zero)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self._line is None or trainer.global_step == self._step:  # mid-accumulation: no optimizer step yet
            return
        metrics = trainer.callback_metrics
        loss, bits = metrics.get("train/loss"), metrics.get("train/weight_bits")
        self._line.update(trainer.global_step - self._step, loss=None if loss is None else float(loss),
                          bits=None if bits is None else float(bits))
        self._step = trainer.global_step

    def on_train_end(self, trainer, module) -> None:
        if self._line is not None:
            self._line.close()
            self._line = None
