"""A run stopped and resumed, in a real Lightning loop, trains the rows the run never stopped trains, step for step:
also where a stop falls on an epoch's last batch (Lightning then goes on into the next epoch without calling
`on_train_epoch_start`) and the resumed run is stopped again."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from fraqat_cli.train.rng_state import RandomState, TrainingOrder

# our sampler resumes mid-epoch (TrainingOrder.resume_at), which Lightning cannot see
pytestmark = pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch")

ROWS, BATCH, STEPS = 15, 4, 9  # drop_last: 3 batches an epoch, so steps 3 and 6 end an epoch


class RowRecorder(L.LightningModule):
    """Trains a linear layer on row indices and records which rows each step trained."""

    def __init__(self, seen: list) -> None:
        super().__init__()
        self.layer, self.seen = torch.nn.Linear(1, 1), seen

    def training_step(self, batch, batch_idx):
        (rows,) = batch
        self.seen.append(sorted(rows.tolist()))
        return self.layer(rows.float()[:, None]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class Killed(Exception):
    """The kill a stop stands for (SIGKILL: no shutdown, nothing written after the last checkpoint)."""


class StopBefore(L.Callback):
    """A kill after `step`'s checkpoint: raised at the start of the step after it."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Killed(f"at step {self.step}")


def train(checkpoints, seen: list, resume: bool, stop: int | None = None) -> None:
    order = TrainingOrder(ROWS, seed=5)
    loader = DataLoader(TensorDataset(torch.arange(ROWS)), batch_size=BATCH, sampler=order, drop_last=True)
    callbacks = [RandomState(order, BATCH), ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=1,
                                                             save_last=True, save_top_k=0)]
    trainer = L.Trainer(max_steps=STEPS, callbacks=[*callbacks, *([StopBefore(stop)] if stop else [])],
                        logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    module = RowRecorder(seen)
    trainer.fit(module, loader, ckpt_path=str(checkpoints / "last.ckpt") if resume else None)


@pytest.mark.parametrize("stops", [[3, 4], [2, 3, 6, 7], [1, 5]])
def test_a_run_stopped_and_resumed_trains_the_rows_of_the_run_never_stopped(tmp_path, stops):
    whole: list = []
    train(tmp_path / "whole", whole, resume=False)
    assert len(whole) == STEPS

    stopped: list = []
    for i, step in enumerate(stops):
        with pytest.raises(Killed):
            train(tmp_path / "stopped", stopped, resume=i > 0, stop=step)
        assert len(stopped) == step, f"stopped at {stops}: the run before step {step} trained {len(stopped)} steps"
    train(tmp_path / "stopped", stopped, resume=True)
    assert stopped == whole, f"stopped at {stops}"
