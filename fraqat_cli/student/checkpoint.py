"""The stored student: one owner for the checkpoint files `fraqat-train` writes and `fraqat-eval`/`fraqat-export`
read, with no Lightning in the way.

A run's `checkpoints/` folder holds two kinds, in one layout (Lightning's):
`state_dict` (the student's tensors, quantizer buffers included, under "student."), `global_step`, and
our record under "fraqat" (the resolved config and the schedule).

- `last.ckpt`, resumable: Lightning's full checkpoint, with the optimizer state, loop position and callbacks.
- `step-NNNNNN.ckpt` every `checkpoint.every_n_steps`: the student alone (unless `checkpoint.optimizer`),
  only the last `checkpoint.keep` kept. The names carry no '=' so they pass through Hydra overrides unquoted.

The bit-width is read from the quantizer buffers: one source. Reading memory-maps the file
(`torch.load(mmap=True, weights_only=True)`), so what is never touched, the optimizer's moments in
particular, is never read into memory. Writes go to a temporary file renamed into place.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import mmap
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fraqat_cli.files import atomic_write
from fraqat_cli.stored_config import trusted_config

LAST = "last.ckpt"
RECORD = "fraqat"  # our part of a checkpoint: {"config": resolved config, "schedule": repr}
STUDENT = "student."  # the student's keys in a LightningModule state dict
BITS_KEY = "weight_quantizer.bits"

# Classes an optimizer here puts in its state (hence in `last.ckpt`), allowed through `torch.load(weights_only=
# True)` once their module is imported: torchao registers its own with `torch.serialization.add_safe_globals`.
STATE_CLASSES = {
    "torchao.optim.subclass_8bit.OptimState8bit": "torchao.optim.subclass_8bit",
}


def allow_state_classes(path) -> None:
    """Make the optimizer-state classes that the checkpoint at `path` names loadable with weights_only, by
    importing their modules (which allow-list them). Only the classes in `STATE_CLASSES`: anything else the
    file names is still refused by `torch.load`."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a torch zip file: torch.load says so, with the caller's message
        return
    for module in sorted({STATE_CLASSES[n] for n in names if n in STATE_CLASSES}):
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ValueError(f"checkpoint {str(path)!r} holds {module} optimizer state; "
                              f"reading it needs torchao: pip install 'torchao>=0.10'") from error



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
    raw = load_checkpoint(path, mapped=True)
    return int(raw.get("global_step", 0)), raw[RECORD]["config"]


def describe_last_good(checkpoint_dir: Path) -> str:
    """Which checkpoint of the run folder is still good, in words, for an error that stops the run."""
    for path in checkpoint_files(checkpoint_dir):
        try:
            step, resumable = read_head(path)
        except ValueError:
            continue
        return f"the last good checkpoint is {str(path)!r} (step {step}{'' if resumable else ', the student alone'})"
    return f"no good checkpoint in {str(checkpoint_dir)!r} yet"
