"""Checkpoints written atomically and read without unpickling arbitrary objects.

Lightning's checkpoint holds the student's state (quantizer buffers included),
the optimizer, the loop position and our resolved config as plain containers,
so `torch.load(weights_only=True)` reads it back.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from fraqat_cli.cache import atomic_write

LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save to a temporary file beside the target and rename it into place; load with weights_only."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        atomic_write(Path(path), lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return load_checkpoint(path, map_location or "cpu")


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a fraqat checkpoint safely; a clear error for missing or unreadable files."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; give a .ckpt written by fraqat-train")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise ValueError(
            f"checkpoint {str(path)!r} cannot be read as a fraqat checkpoint ({type(error).__name__}: {error})"
        ) from error


def resume_path(resume, checkpoint_dir: Path) -> str | None:
    """`resume`: null (start fresh), `auto` (the run folder's last checkpoint, if any) or a path."""
    if resume in (None, False, "null", "none"):
        return None
    if resume == "auto":
        last = checkpoint_dir / LAST
        return str(last) if last.is_file() else None
    path = Path(str(resume)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"resume={str(resume)!r} is not a checkpoint file; allowed: null, auto, or a .ckpt path"
        )
    return str(path)
