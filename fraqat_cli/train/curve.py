"""`training.png`: the training loss, the held-out validation loss and the weight bits against the step.

The picture that says whether a run converged and where the schedule's bit drops cost it loss. The points
travel in last.ckpt (`state_dict`), so a resumed run draws its whole history."""

from __future__ import annotations

import io
from pathlib import Path

import lightning as L
import matplotlib
import matplotlib.pyplot as plt

from fraqat_cli.files import atomic_write

CURVE_FILE = "training.png"


class TrainingCurve(L.Callback):
    """Keeps (step, loss, bits) once per optimizer step: three floats a step (a 100k-step run: a few MB)."""

    def __init__(self) -> None:
        self.points: list[tuple[int, float, float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.points and self.points[-1][0] >= step:  # mid-accumulation: no optimizer step yet
            return
        metrics = trainer.callback_metrics
        if "train/loss" in metrics and "train/weight_bits" in metrics:
            self.points.append((step, float(metrics["train/loss"]), float(metrics["train/weight_bits"])))

    def state_dict(self) -> dict:
        return {"points": [list(p) for p in self.points]}

    def load_state_dict(self, state: dict) -> None:
        self.points = [(int(s), float(loss), float(bits)) for s, loss, bits in state.get("points", [])]


def draw_training_curve(points: list[tuple[int, float, float]], validation: list[list[float]], path: Path) -> None:
    """Loss (log scale; validation as dots) above the weight bits, sharing the step axis, as a PNG."""

    matplotlib.use("Agg")

    steps, losses, bits = zip(*points) if points else ((), (), ())
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 4.5), height_ratios=[2, 1])
    top.plot(steps, losses, color="#4477aa", linewidth=1, label="training loss")
    if validation:
        top.plot(*zip(*validation), "o-", color="#ee6677", markersize=4, label="validation loss (held out)")
    if any(v > 0 for v in losses) or validation:
        top.set_yscale("log")
    top.set_ylabel("distillation loss (MSE)")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    bottom.step(steps, bits, where="post", color="#228833")
    bottom.set_ylabel("weight bits")
    bottom.set_xlabel("optimizer step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
