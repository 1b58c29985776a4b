"""Writing checkpoints during training: Lightning's side of the stored student (`fraqat_cli.student.checkpoint`
owns the files' layout and reading them).

`last.ckpt` every `checkpoint.every_n_steps` (resumable), step checkpoints pruned to the last `checkpoint.keep`.
`resume=auto` takes the newest checkpoint that can be read (`resume_path`), skipping damaged ones with a
warning; no checkpoint with a non-finite weight is ever written, and a write the disk refuses names the
last good one (`AtomicCheckpointIO`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig
from torch import nn

from fraqat_cli.checks import positive_int
from fraqat_cli.cli import warn
from fraqat_cli.files import DiskWriteError, atomic_write, free_bytes
from fraqat_cli.student.checkpoint import LAST, checkpoint_files, describe_last_good, load_checkpoint, read_head
from fraqat_cli.student.finite import first_non_finite
from fraqat_cli.train.divergence import TrainingDiverged
from fraqat_cli.train.optimizers import optimizer_name, state_bytes

STEP_FILENAME = "step-{step:06d}"  # ModelCheckpoint's template: step-000050.ckpt


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save to a temporary file beside the target and rename it into place; load with weights_only.

    A state with non-finite weights is never written (the good checkpoint it would replace stays); a write
    the disk refuses says which checkpoint is still the last good one. A student-only checkpoint loads as
    a resumable one whose optimizer has no state yet: resuming from it continues from its weights and
    step with AdamW's moments starting from zero (`resume_path` says so).
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        if (bad := first_non_finite(checkpoint.get("state_dict", {}))) is not None:
            raise TrainingDiverged(f"refusing to write {str(path)!r}: the student's weights are not finite "
                                   f"({bad!r}); {describe_last_good(path.parent)}")
        try:
            atomic_write(path, lambda tmp: torch.save(checkpoint, tmp), size=payload_bytes(checkpoint))
        except DiskWriteError as error:
            raise error.with_note(describe_last_good(path.parent)) from error.__cause__

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        checkpoint = load_checkpoint(path, map_location or "cpu")
        if isinstance(checkpoint, dict) and "loops" in checkpoint and "optimizer_states" not in checkpoint:
            checkpoint.update(optimizer_states=[], lr_schedulers=[])  # Lightning restores none: a fresh AdamW
        return checkpoint


def payload_bytes(checkpoint) -> int:
    """The bytes a checkpoint dict takes on disk, from its tensors and the framing measured below."""
    if isinstance(checkpoint, torch.Tensor):
        return checkpoint.numel() * checkpoint.element_size() + FRAMING_BYTES_PER_TENSOR
    if isinstance(checkpoint, dict):
        return sum(payload_bytes(v) for v in checkpoint.values())
    if isinstance(checkpoint, (list, tuple)):
        return sum(payload_bytes(v) for v in checkpoint)
    return 0


def resume_path(resume, checkpoint_dir: Path) -> str | None:
    """`resume`: null (start fresh), `auto`, `force` (as auto; `run_config.check_same_run` then lets a run of
    another config continue) or a path.

    `auto` resumes from the newest checkpoint of the run folder that can be read: `last.ckpt` (written
    after the step checkpoints of its step, so never older), else the step checkpoints, newest first.
    Each one that cannot be read is skipped with a warning naming it; when none can be read, one error.
    """
    if resume in (None, False, "null", "none"):
        return None
    if resume in ("auto", "force"):
        unreadable = []
        for path in checkpoint_files(checkpoint_dir):
            try:
                step, resumable = read_head(path)
            except ValueError as error:
                warn(f"skipping {error}")
                unreadable.append(path.name)
                continue
            if unreadable or not resumable:
                warn(f"resuming from {str(path)!r} (step {step}), the newest checkpoint that can be read"
                     + ("" if resumable else _FRESH_OPTIMIZER))
            return str(path)
        if unreadable:
            raise ValueError(f"no checkpoint in {str(checkpoint_dir)!r} can be read ({', '.join(unreadable)}); "
                             f"move them away, or start afresh with resume=null")
        return None
    path = Path(str(resume)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"resume={str(resume)!r} is not a checkpoint file; allowed: null, auto, force, or a .ckpt path"
        )
    step, resumable = read_head(path)
    if not resumable:
        warn(f"resuming from {str(path)!r} (step {step})" + _FRESH_OPTIMIZER)
    return str(path)


_FRESH_OPTIMIZER = (": it holds the student alone, so its weights, step and bit-width continue and AdamW's moments "
                    "start from zero")
# --- writing during training ----------------------------------------------------------------------------------


def check_checkpoint_settings(checkpoint: DictConfig) -> None:
    """The `checkpoint` node: `every_n_steps` (>= 1), `keep` (>= 0), `optimizer` (a bool), refused with the
    allowed values before any model is built."""
    positive_int("checkpoint.every_n_steps", checkpoint.every_n_steps)
    keep = checkpoint.keep
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise ValueError(f"checkpoint.keep must be an integer >= 0 (0: last.ckpt only); got {keep!r}")
    if not isinstance(checkpoint.optimizer, bool):
        raise ValueError(f"checkpoint.optimizer must be true or false; got {checkpoint.optimizer!r}")


class FinalCheckpoint(Callback):
    """Write `last.ckpt` when training ends on a step that is not a multiple of `every` (ModelCheckpoint
    writes it only on those), so that it always holds the final student."""

    def __init__(self, path: Path, every: int) -> None:
        self.path, self.every = Path(path), every

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step % self.every:
            trainer.save_checkpoint(self.path)


def checkpoint_callbacks(checkpoint: DictConfig, checkpoint_dir: Path) -> list[Callback]:
    """Lightning callbacks for both kinds: step checkpoints (pruned to the last `checkpoint.keep`) first,
    so that `last.ckpt`, written after them, records which step files exist for a resumed run to prune."""
    every = checkpoint.every_n_steps
    callbacks: list[Callback] = []
    if checkpoint.keep > 0:
        # monitor the step, highest kept: ModelCheckpoint's top-k then keeps the most recent ones.
        callbacks.append(ModelCheckpoint(
            dirpath=checkpoint_dir, filename=STEP_FILENAME, auto_insert_metric_name=False, every_n_train_steps=every,
            monitor="step", mode="max", save_top_k=checkpoint.keep,
            save_weights_only=not checkpoint.optimizer,
            # A run killed between a step file and last.ckpt resumes before that step and writes it again:
            # the new file replaces the old one instead of appearing beside it as step-NNNNNN-v1.ckpt.
            enable_version_counter=False,
        ))
    # last.ckpt is always replaced, never versioned: after a resume that could not restore this callback's state
    # (from a step checkpoint, past a damaged last.ckpt) a versioned last-v1.ckpt would hide the new state.
    callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, every_n_train_steps=every, save_last=True, save_top_k=0,
                                     enable_version_counter=False))
    callbacks.append(FinalCheckpoint(checkpoint_dir / LAST, every))
    return callbacks


# What a torch checkpoint adds to its tensors' bytes, measured on this project's checkpoints (torch 2.14): per
# stored tensor its zip record (headers, 64-byte alignment) and pickle entry, ~312 bytes; once per file the
# config record, loop and callback states, ~12-16 KB.
FRAMING_BYTES_PER_TENSOR = 320
FRAMING_BYTES_PER_FILE = 16 * 1024


def report_checkpoint_space(checkpoint: DictConfig, optim: DictConfig, student: nn.Module,
                            checkpoint_dir: Path) -> CheckpointSizes:
    """Print the size of one checkpoint of each kind, and warn before training when they will not fit."""
    sizes = checkpoint_sizes(student, optim)
    print(sizes)
    if (problem := checkpoint_space_warning(checkpoint, sizes, checkpoint_dir)) is not None:
        warn(problem)
    return sizes


def checkpoint_space_warning(checkpoint: DictConfig, sizes: CheckpointSizes, checkpoint_dir: Path) -> str | None:
    """Why the run's checkpoints will not fit in the free space of `checkpoint_dir`, or None.

    At its fullest the folder holds `checkpoint.keep` step files and `last.ckpt`, plus the new file being
    written beside the one it replaces; what is there already counts as taken.
    """
    keep = checkpoint.keep
    step = sizes.resumable_bytes if checkpoint.optimizer else sizes.student_bytes
    peak = max((keep + 1) * step + sizes.resumable_bytes, keep * step + 2 * sizes.resumable_bytes) if keep else \
        2 * sizes.resumable_bytes
    present = sum(p.stat().st_size for p in checkpoint_files(checkpoint_dir))
    free = free_bytes(checkpoint_dir)
    if free is None or free >= peak - present:
        return None
    return (f"checkpoints folder {str(checkpoint_dir)!r} has {free / 2**20:.1f} MiB free, but this run's checkpoints "
            f"need up to {(peak - present) / 2**20:.1f} MiB more ({LAST} {sizes.resumable_bytes / 2**20:.1f} MiB "
            f"written beside the previous one, {keep} step checkpoint(s) of {step / 2**20:.1f} MiB); the run will "
            f"stop when the disk fills: free space, or lower checkpoint.keep")


@dataclass(frozen=True)
class CheckpointSizes:
    """Bytes of one checkpoint of each kind, estimated before any is written."""

    student_bytes: int
    resumable_bytes: int
    trainable_params: int
    optimizer: str = "AdamW"

    def __str__(self) -> str:
        return (f"checkpoint sizes: student-only {self.student_bytes / 2**20:.2f} MiB (step-NNNNNN.ckpt); "
                f"resumable {self.resumable_bytes / 2**20:.2f} MiB ({LAST}: + {self.optimizer} state of "
                f"{self.trainable_params:,} trainable parameters)")


def checkpoint_sizes(student: nn.Module, optim_cfg=None) -> CheckpointSizes:
    """Sizes of the two kinds for `student` as it will be saved: every tensor of its state dict (shared
    storage counted once); the resumable kind adds the state of the optimizer `optim_cfg` configures
    (`optimizers.state_bytes`: AdamW's two moments, or AdamW8bit's 8-bit ones; None: AdamW)."""
    storages = {}
    for tensor in student.state_dict().values():
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    trainable = [p for p in student.parameters() if p.requires_grad]
    student_bytes = sum(storages.values()) + FRAMING_BYTES_PER_TENSOR * len(storages) + FRAMING_BYTES_PER_FILE
    optimizer_bytes = sum(size + FRAMING_BYTES_PER_TENSOR * tensors
                          for size, tensors in (state_bytes(optim_cfg, p) for p in trainable))
    return CheckpointSizes(student_bytes, student_bytes + optimizer_bytes, sum(p.numel() for p in trainable),
                           optimizer_name(optim_cfg))
