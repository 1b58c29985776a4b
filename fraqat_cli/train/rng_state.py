"""Reproducible resume: what a run draws at random, and where it is in its data, travel in `last.ckpt`.

A run killed and resumed any number of times ends bit-identical (on the CPU) to the run never stopped. Two
things make the next step what it would have been:

- the data order is a pure function of `(seed, epoch)` (`TrainingOrder`), and the count of batches already
  trained in the epoch is stored, so a run resumed mid-epoch continues the same permutation where it stopped;
- the random generators the step draws its noise and timesteps from (torch on the CPU, CUDA per device,
  numpy, Python's) are stored at each checkpoint and put back just before the first resumed step
  (`RandomState`), so nothing drawn while the resumed run builds its models shifts them.

What is stored is tensors and plain containers: `torch.load(weights_only=True)` reads it.
"""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch
from torch.utils.data import Sampler

from fraqat_cli.cli import warn


class TrainingOrder(Sampler[int]):
    """The rows of one epoch in a permutation seeded by `(seed, epoch)` alone; `resume_at` skips the rows an
    interrupted run already trained in that epoch (once: the next epoch starts from its first row)."""

    def __init__(self, rows: int, seed: int) -> None:
        self.rows, self.seed, self.epoch = rows, seed, 0
        self._resume: tuple[int, int] | None = None  # (epoch, rows already trained in it)

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at the start of every epoch (`_set_sampler_epoch`)."""
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, rows: int) -> None:
        self._resume = (int(epoch), int(rows))

    def permutation(self, epoch: int) -> list[int]:
        seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
        return torch.randperm(self.rows, generator=torch.Generator().manual_seed(seed)).tolist()

    def __iter__(self):
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start, self._resume = self._resume[1], None
        yield from self.permutation(self.epoch)[start:]

    def __len__(self) -> int:
        return self.rows


class RandomState(L.Callback):
    """Stores the generators' states and the data position in every checkpoint; restores them on resume.

    The states are taken when a checkpoint is written (after a step's last draw: nothing between then and
    the next step draws from them) and put back at the start of the first step after a resume. Under DDP
    every rank's states are stored, and each rank takes back its own. `order`: the training sampler (unused
    where Lightning shards the data itself, under DDP: a `DistributedSampler`, shuffled by seed and epoch).
    """

    def __init__(self, order: TrainingOrder, batch_size: int) -> None:
        self.order, self.batch_size = order, batch_size
        self.epoch, self.batches = 0, 0  # batches trained in `epoch`
        self._pending: list | None = None  # loaded generator states, one per rank, for the next step

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self._pending is not None:
            states, self._pending = self._pending, None
            rank, count = trainer.global_rank, len(states)
            if count == trainer.world_size:
                set_generator_states(states[rank])
            else:
                warn(f"the checkpoint holds the random state of {count} process(es), this run has "
                     f"{trainer.world_size}: the resumed run draws other noise than an uninterrupted one would")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        # The epoch is the one the sampler was given (Lightning's `_set_sampler_epoch`), read at every batch: a run
        # resumed from an epoch's last batch goes on into the next epoch without `on_train_epoch_start`.
        epoch = trainer.fit_loop.epoch_progress.current.processed
        if epoch != self.epoch:
            self.epoch, self.batches = epoch, 0
        self.batches += 1

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches, "ranks": all_ranks(generator_states())}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        self._pending = list(state["ranks"])
        self.order.resume_at(self.epoch, self.batches * self.batch_size)


def generator_states() -> dict:
    """This process's random generators, as tensors and plain numbers."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_generator_states(states: dict) -> None:
    """Put back what `generator_states` took (CUDA only where this process has as many devices)."""
    torch.set_rng_state(states["torch"])
    numpy = states["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["gauss"]))
    python = states["python"]
    random.setstate((python["version"], tuple(python["internal"].tolist()), python["gauss"]))
    cuda = states.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def all_ranks(states: dict) -> list[dict]:
    """Every rank's `states`, in rank order (one process: itself). Checkpoints are written by every rank
    together (Lightning's `save_checkpoint` is collective), so the gather meets all ranks."""
    distributed = torch.distributed
    if not (distributed.is_available() and distributed.is_initialized()) or distributed.get_world_size() == 1:
        return [states]
    gathered: list = [None] * distributed.get_world_size()
    distributed.all_gather_object(gathered, states)
    return gathered
