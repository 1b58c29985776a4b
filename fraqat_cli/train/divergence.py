"""The divergence guard: a run whose loss or student weights stop being finite stops there, not days later.

Without it a mistyped learning rate trains to the end, writes NaN checkpoints over the good ones and a NaN
`final_loss`. `DivergenceGuard` checks the loss after every batch and the student's weights after every
optimizer step, before Lightning's checkpoint callbacks (which it orders last) can save them, and stops the
run with `TrainingDiverged`: one line with the step, the last finite loss, the last good checkpoint and what
to change. Optionally (`divergence.factor`) a loss far above its running median stops it too.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from pathlib import Path

import lightning as L

from fraqat_cli.errors import ExpectedFailure
from fraqat_cli.student.checkpoint import describe_last_good
from fraqat_cli.student.finite import all_finite


class TrainingDiverged(RuntimeError, ExpectedFailure):
    """The run stopped because its loss or weights diverged; the message is one line a user can act on."""


class LossWatch:
    """The loss as training goes: the last finite value and its step, and a spike test against the running
    median of the last `window` finite losses (`factor` None: no spike test)."""

    def __init__(self, factor: float | None = None, window: int = 50) -> None:
        if factor is not None and (isinstance(factor, bool) or not factor > 1):
            raise ValueError(f"divergence.factor must be a number > 1 or null (off); got {factor!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"divergence.window must be a positive integer; got {window!r}")
        self.factor, self.recent = factor, deque(maxlen=window)
        self.last_finite: tuple[int, float] | None = None  # (step, loss)

    def check(self, step: int, loss: float) -> str | None:
        """Why `loss` at `step` means divergence, or None (then it joins the record)."""
        if not math.isfinite(loss):
            return f"the loss is {loss}"
        if self.factor is not None and len(self.recent) == self.recent.maxlen:
            median = statistics.median(self.recent)
            if median > 0 and loss > self.factor * median:  # a student equal to its teacher has median 0
                return f"the loss {loss:.4g} is over {self.factor:g} x its running median {median:.4g}"
        self.recent.append(loss)
        self.last_finite = (step, loss)
        return None


class DivergenceGuard(L.Callback):
    """Stop training with `TrainingDiverged` at the first non-finite loss or weight (or loss spike).

    checkpoint_dir: where the last good checkpoint is looked for, to name it. hint: what to try, e.g.
    "a lower optim.lr (now 1e+06)".
    """

    def __init__(self, checkpoint_dir: Path, hint: str, factor: float | None = None, window: int = 50) -> None:
        self.checkpoint_dir, self.hint = Path(checkpoint_dir), hint
        self.watch = LossWatch(factor, window)
        self._step = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._step = trainer.global_step  # the step this batch trains (the bit schedule's and the log's)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        reason = None if loss is None else self.watch.check(self._step, float(loss))
        if reason is None and trainer.global_step != self._step and not all_finite(module.student.parameters()):
            reason = "the student's weights are not finite after the update"
        # every rank stops together (a loss can go bad on one rank only)
        if trainer.strategy.reduce_boolean_decision(reason is not None, all=False):
            raise TrainingDiverged(self.message(self._step, reason or "another rank's loss or weights are not finite"))

    def message(self, step: int, reason: str) -> str:
        last = self.watch.last_finite
        before = f"last finite loss {last[1]:.4g} at step {last[0]}" if last else "no finite loss before it"
        return (f"training diverged at step {step}: {reason} ({before}); {describe_last_good(self.checkpoint_dir)}; "
                f"try {self.hint}")


def divergence_hint(optim, trainer) -> str:
    """What to change, from the run's own settings (the `optim` and `trainer` nodes): the learning rate always,
    the precision when reduced."""
    hint = f"a lower optim.lr (now {optim.lr:g})"
    precision = str(trainer.get("precision", "32-true"))
    if not precision.startswith("32"):
        hint += f" or trainer.precision=32-true (now {precision})"
    return hint


def check_divergence_settings(divergence) -> None:
    """The `divergence` node's `factor` and `window`, refused with the allowed values before any model is built."""
    LossWatch(divergence.factor, divergence.window)


def divergence_guard(divergence, hint: str, checkpoint_dir: Path) -> DivergenceGuard | None:
    """The guard the `divergence` node asks for (None when `divergence.enabled` is false); `hint`: what to change
    (`divergence_hint`)."""
    if not divergence.enabled:
        return None
    return DivergenceGuard(checkpoint_dir, hint, divergence.factor, divergence.window)
