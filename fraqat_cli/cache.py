"""A disk cache of tensors keyed by what produced them (text embeddings, latents).

Text encoders and VAEs are the heaviest parts of a pipeline; running them once
per model and prompt set, and keeping only their outputs, keeps them out of
memory during training. Files are safetensors, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def cache_key(parts: dict) -> str:
    """A stable hash of JSON-able parts (configs, prompt lists, seeds)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` and move the result over `path` only once it is complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; the result should not be
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cached_tensors(directory: str | Path, kind: str, parts: dict, compute: Callable[[], dict]) -> dict:
    """Load `kind` tensors for `parts` from the cache, computing and storing them on a miss."""
    path = Path(directory).expanduser() / f"{kind}-{cache_key(parts)}.safetensors"
    if path.is_file():
        return load_file(str(path))
    tensors = {name: t.detach().contiguous().cpu() for name, t in compute().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))
    return tensors


def split_batch(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries named `prefix/...`, with the prefix removed."""
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + "/")}
