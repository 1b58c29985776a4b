"""The student checkpoint: one owner for what `fraqat-train` writes and `fraqat-eval`/`fraqat-export` read.

A run's `checkpoints/` folder holds two kinds, in one layout (Lightning's):
`state_dict` (the student's tensors, quantizer buffers included, under "student."), `global_step`, and
our record under "fraqat" (the resolved config and the schedule).

- `last.ckpt`, resumable: Lightning's full checkpoint, with the optimizer state, loop position and callbacks.
- `step-NNNNNN.ckpt` every `checkpoint_every_n_steps`: the student alone (unless `checkpoint_optimizer`),
  only the last `keep_checkpoints` kept. The names carry no '=' so they pass through Hydra overrides unquoted.

`resume=auto` takes the newest checkpoint that can be read (`resume_path`), skipping damaged ones with a
warning; no checkpoint with a non-finite weight is ever written, and a write the disk refuses names the
last good one (`AtomicCheckpointIO`).

The bit-width is read from the quantizer buffers: one source. Reading memory-maps the file
(`torch.load(mmap=True, weights_only=True)`), so what is never touched, the optimizer's moments in
particular, is never read into memory. Writes go to a temporary file renamed into place.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fraqat_cli.cli import warn
from fraqat_cli.files import DiskWriteError, atomic_write, free_bytes
from fraqat_cli.stored_config import trusted_config
from fraqat_cli.train.optimizers import allow_state_classes

LAST = "last.ckpt"
STEP_FILENAME = "step-{step:06d}"  # ModelCheckpoint's template: step-000050.ckpt
RECORD = "fraqat"  # our part of a checkpoint: {"config": resolved config, "schedule": repr}
STUDENT = "student."  # the student's keys in a LightningModule state dict
BITS_KEY = "weight_quantizer.bits"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save to a temporary file beside the target and rename it into place; load with weights_only.

    A state with non-finite weights is never written (the good checkpoint it would replace stays); a write
    the disk refuses says which checkpoint is still the last good one. A student-only checkpoint loads as
    a resumable one whose optimizer has no state yet: resuming from it continues from its weights and
    step with AdamW's moments starting from zero (`resume_path` says so).
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        from fraqat_cli.train.divergence import TrainingDiverged, first_non_finite

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


def load_checkpoint(path, map_location="cpu", mapped: bool = False) -> dict:
    """Read a fraqat checkpoint safely (weights_only); a clear error for missing or unreadable files.

    `mapped=True` memory-maps the file instead of reading it: tensors are paged in only when touched.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; give a .ckpt written by fraqat-train")
    if (kind := not_a_torch_file(path)) is not None:  # else torch's cause would be about mmap or pickle
        raise ValueError(f"checkpoint {str(path)!r} cannot be read as a fraqat checkpoint: it is not a torch "
                         f"checkpoint file ({kind}); give a .ckpt written by fraqat-train")
    allow_state_classes(path)  # 8-bit optimizer moments (optim=adamw8bit) are tensor subclasses
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mapped)
    except Exception as error:
        raise ValueError(
            f"checkpoint {str(path)!r} cannot be read as a fraqat checkpoint ({type(error).__name__}: {error})"
        ) from error


# torch.save writes a zip archive; what other files a user may pass as `ckpt` start with, named in the refusal
ZIP_MAGIC = b"PK\x03\x04"
OTHER_MAGIC = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image",
               b"%PDF": "a PDF document"}


def not_a_torch_file(path: Path) -> str | None:
    """What `path` is instead of a torch checkpoint (a zip archive), in words; None when it starts as one."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(ZIP_MAGIC):
        return None
    if not head:
        return "it is empty"
    return next((name for magic, name in OTHER_MAGIC.items() if head.startswith(magic)), "it does not start as one")


def stamp_record(checkpoint: dict, record: dict) -> None:
    """Put our record (plain containers: the resolved config, the schedule) into a checkpoint being saved."""
    checkpoint[RECORD] = dict(record)


@dataclass
class StudentCheckpoint:
    """A trained student as stored: config, state (weights and quantizer buffers), step.

    `state` has the student's own keys (no "student." prefix); read from a file its tensors are
    memory-mapped. `resumable` says whether the file also holds optimizer state (never read here).
    """

    config: DictConfig
    state: dict[str, torch.Tensor]
    step: int
    path: Path | None = None
    resumable: bool = False
    schedule: str | None = None
    mapped: bool = False  # `state` is a read-only view of the file (see `release_pages`)

    @property
    def bits(self) -> tuple[float, ...]:
        """The distinct weight bit-widths of the quantized layers (32 means full precision)."""
        return tuple(sorted({float(v) for k, v in self.state.items() if k.endswith(BITS_KEY)}))

    @property
    def weight_bits(self) -> float | None:
        """The student's weight bit-width (the lowest, should its layers differ); None without quantized layers."""
        return self.bits[0] if self.bits else None

    @classmethod
    def read(cls, path, model: DictConfig | None = None) -> StudentCheckpoint:
        """Map `path` (either kind) and keep the student's part; ValueError when it is not a fraqat checkpoint.

        The stored config is data (`fraqat_cli.stored_config`): one naming code fraqat's conf/ does not use is
        refused. `model` (the user's `model=` from the command line) replaces the stored model config.
        """
        path = Path(path).expanduser()
        raw = load_checkpoint(path, mapped=True)
        if not isinstance(raw, dict) or not isinstance(raw.get(RECORD), dict) or "config" not in raw[RECORD] \
                or not isinstance(raw[RECORD]["config"], dict) or "state_dict" not in raw:
            raise ValueError(f"{str(path)!r} is not a fraqat-train checkpoint (it has no {RECORD!r} record)")
        state = {k.removeprefix(STUDENT): v for k, v in raw["state_dict"].items() if k.startswith(STUDENT)}
        config = trusted_config(raw[RECORD]["config"], f"checkpoint {str(path)!r}", model)
        return cls(config=config, state=state, step=int(raw.get("global_step", 0)),
                   path=path, resumable="optimizer_states" in raw, schedule=raw[RECORD].get("schedule"), mapped=True)

    @classmethod
    def of_student(cls, student: nn.Module, config: DictConfig | dict, step: int, schedule: str | None = None):
        """The checkpoint of an in-memory student (its tensors shared, not copied)."""
        config = config if OmegaConf.is_config(config) else OmegaConf.create(config)
        return cls(config=config, state=student.state_dict(), step=step, schedule=schedule)

    def write(self, path) -> Path:
        """Write the student-only kind to `path`, atomically, in the layout `read` and Lightning share."""
        path = Path(path).expanduser()
        payload = {
            "global_step": self.step,
            "state_dict": {STUDENT + k: v for k, v in self.state.items()},
            RECORD: {"config": OmegaConf.to_container(self.config, resolve=True), "schedule": self.schedule},
        }
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
        return path

    @staticmethod
    def locate(path) -> tuple[list[Path], Path | None]:
        """Checkpoint files `path` names, and the sweep folder when it is one.

        A file is itself; a run folder (or its `checkpoints/`) gives its `last.ckpt`; a multirun
        folder gives every job's `last.ckpt`.
        """
        path = Path(str(path)).expanduser()
        if path.is_symlink():  # runs/last: the run folder it names (labels and exports go by the real one)
            path = path.resolve()
        if path.is_file():
            return [path], None
        for last in (path / "checkpoints" / LAST, path / LAST):
            if last.is_file():
                return [last], None
        jobs = sorted(path.glob(f"*/checkpoints/{LAST}"))
        if jobs:
            return jobs, path
        raise FileNotFoundError(
            f"ckpt={str(path)!r} holds no checkpoint; allowed: a .ckpt file, a run folder (with checkpoints/{LAST}), "
            f"a multirun folder of such runs, or 'teacher'"
        )

    @staticmethod
    def run_folder(path: Path) -> Path:
        """The run folder of a checkpoint file (`<run>/checkpoints/x.ckpt`), else the file's own folder."""
        path = Path(path)
        return path.parent.parent if path.parent.name == "checkpoints" else path.parent

    @property
    def label(self) -> str:
        """A short name: the run folder's for `last.ckpt`, `<run>-step-NNNNNN` for a step checkpoint."""
        if self.path is None:
            return f"step-{self.step:06d}"
        run = self.path.parent.parent.name if self.path.parent.name == "checkpoints" else ""
        if self.path.name == LAST:
            return run or self.path.stem
        return f"{run}-{self.path.stem}" if run else self.path.stem


def release_pages(tensor: torch.Tensor) -> None:
    """Let the kernel take back the resident pages of a memory-mapped checkpoint tensor once it has been
    copied, so that rebuilding a student from a mapped file never holds the file and the copy at once.

    Only for tensors of `StudentCheckpoint.read` (private, never-written file mappings: the pages are clean
    and would be read from the file again if touched; on anonymous memory this would zero live data). Only
    whole pages inside the tensor are released. Linux `madvise(MADV_DONTNEED)`; a no-op elsewhere.
    """
    if sys.platform != "linux" or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = tensor.data_ptr()
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = (start + tensor.numel() * tensor.element_size()) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


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
STEP_FILE = re.compile(r"step-(\d+)\.ckpt")


def checkpoint_files(checkpoint_dir: Path) -> list[Path]:
    """The run's checkpoints, newest first: `last.ckpt`, then the step checkpoints by falling step."""
    checkpoint_dir = Path(checkpoint_dir)
    steps = sorted((int(m.group(1)), p) for p in checkpoint_dir.glob("step-*.ckpt")
                   if (m := STEP_FILE.fullmatch(p.name)))
    last = [checkpoint_dir / LAST] if (checkpoint_dir / LAST).is_file() else []
    return last + [p for _, p in reversed(steps)]


def read_head(path: Path) -> tuple[int, bool]:
    """(step, resumable) of a readable fraqat checkpoint; ValueError naming the file when it cannot be read."""
    try:
        raw = load_checkpoint(path, mapped=True)
    except ValueError as error:
        cause = str(error.__cause__ or error).strip().splitlines()[0].split(". ")[0]  # torch adds advice after it
        raise ValueError(f"checkpoint {str(path)!r}: it cannot be read ({cause})") from error
    if not isinstance(raw, dict) or "state_dict" not in raw or RECORD not in raw:
        raise ValueError(f"checkpoint {str(path)!r}: it is not a fraqat-train checkpoint")
    return int(raw.get("global_step", 0)), "optimizer_states" in raw


def stored_run(path) -> tuple[int, dict]:
    """(step, resolved config) a readable fraqat checkpoint records: plain data, compared, never instantiated."""
    from fraqat_cli.moved_modules import upgrade_stored_config  # names from before a module moved

    raw = load_checkpoint(path, mapped=True)
    return int(raw.get("global_step", 0)), upgrade_stored_config(raw[RECORD]["config"])


def describe_last_good(checkpoint_dir: Path) -> str:
    """Which checkpoint of the run folder is still good, in words, for an error that stops the run."""
    for path in checkpoint_files(checkpoint_dir):
        try:
            step, resumable = read_head(path)
        except ValueError:
            continue
        return f"the last good checkpoint is {str(path)!r} (step {step}{'' if resumable else ', the student alone'})"
    return f"no good checkpoint in {str(checkpoint_dir)!r} yet"


# --- writing during training ----------------------------------------------------------------------------------


def check_checkpoint_settings(cfg: DictConfig) -> None:
    """`keep_checkpoints` (>= 0) and `checkpoint_optimizer` (a bool), refused with the allowed values."""
    keep = cfg.keep_checkpoints
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise ValueError(f"keep_checkpoints must be an integer >= 0 (0: last.ckpt only); got {keep!r}")
    if not isinstance(cfg.checkpoint_optimizer, bool):
        raise ValueError(f"checkpoint_optimizer must be true or false; got {cfg.checkpoint_optimizer!r}")


class FinalCheckpoint(Callback):
    """Write `last.ckpt` when training ends on a step that is not a multiple of `every` (ModelCheckpoint
    writes it only on those), so that it always holds the final student."""

    def __init__(self, path: Path, every: int) -> None:
        self.path, self.every = Path(path), every

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step % self.every:
            trainer.save_checkpoint(self.path)


def checkpoint_callbacks(cfg: DictConfig, checkpoint_dir: Path) -> list[Callback]:
    """Lightning callbacks for both kinds: step checkpoints (pruned to the last `keep_checkpoints`) first,
    so that `last.ckpt`, written after them, records which step files exist for a resumed run to prune."""
    check_checkpoint_settings(cfg)
    every = cfg.checkpoint_every_n_steps
    callbacks: list[Callback] = []
    if cfg.keep_checkpoints > 0:
        # monitor the step, highest kept: ModelCheckpoint's top-k then keeps the most recent ones.
        callbacks.append(ModelCheckpoint(
            dirpath=checkpoint_dir, filename=STEP_FILENAME, auto_insert_metric_name=False, every_n_train_steps=every,
            monitor="step", mode="max", save_top_k=cfg.keep_checkpoints,
            save_weights_only=not cfg.checkpoint_optimizer,
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


def report_checkpoint_space(cfg: DictConfig, student: nn.Module, checkpoint_dir: Path) -> CheckpointSizes:
    """Print the size of one checkpoint of each kind, and warn before training when they will not fit."""
    sizes = checkpoint_sizes(student, cfg.get("optim"))
    print(sizes)
    if (problem := checkpoint_space_warning(cfg, sizes, checkpoint_dir)) is not None:
        warn(problem)
    return sizes


def checkpoint_space_warning(cfg: DictConfig, sizes: CheckpointSizes, checkpoint_dir: Path) -> str | None:
    """Why the run's checkpoints will not fit in the free space of `checkpoint_dir`, or None.

    At its fullest the folder holds `keep_checkpoints` step files and `last.ckpt`, plus the new file being
    written beside the one it replaces; what is there already counts as taken.
    """
    keep = cfg.keep_checkpoints
    step = sizes.resumable_bytes if cfg.checkpoint_optimizer else sizes.student_bytes
    peak = max((keep + 1) * step + sizes.resumable_bytes, keep * step + 2 * sizes.resumable_bytes) if keep else \
        2 * sizes.resumable_bytes
    present = sum(p.stat().st_size for p in checkpoint_files(checkpoint_dir))
    free = free_bytes(checkpoint_dir)
    if free is None or free >= peak - present:
        return None
    return (f"checkpoints folder {str(checkpoint_dir)!r} has {free / 2**20:.1f} MiB free, but this run's checkpoints "
            f"need up to {(peak - present) / 2**20:.1f} MiB more ({LAST} {sizes.resumable_bytes / 2**20:.1f} MiB "
            f"written beside the previous one, {keep} step checkpoint(s) of {step / 2**20:.1f} MiB); the run will "
            f"stop when the disk fills: free space, or lower keep_checkpoints")


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
    from fraqat_cli.train.optimizers import optimizer_name, state_bytes

    storages = {}
    for tensor in student.state_dict().values():
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    trainable = [p for p in student.parameters() if p.requires_grad]
    student_bytes = sum(storages.values()) + FRAMING_BYTES_PER_TENSOR * len(storages) + FRAMING_BYTES_PER_FILE
    optimizer_bytes = sum(size + FRAMING_BYTES_PER_TENSOR * tensors
                          for size, tensors in (state_bytes(optim_cfg, p) for p in trainable))
    return CheckpointSizes(student_bytes, student_bytes + optimizer_bytes, sum(p.numel() for p in trainable),
                           optimizer_name(optim_cfg))
