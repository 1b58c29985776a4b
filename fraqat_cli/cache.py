"""A disk cache of tensors keyed by what produced them (text embeddings, latents).

Text encoders and VAEs are the heaviest parts of a pipeline; running them once
per model and prompt set, and keeping only their outputs, keeps them out of
memory during training. Files are safetensors, written atomically.

Small entries are one file (`cached_tensors`); entries that grow with the prompt
set (text conditioning, clean latents) are sharded stores (`sharded_tensors`):
written shard by shard under an inter-process lock, resumable, and read one row
at a time (`ShardedStore`).
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from tqdm import tqdm

from fraqat_cli.checks import positive_int
from fraqat_cli.files import atomic_write


def cache_key(parts: dict) -> str:
    """A stable hash of JSON-able parts (configs, prompt lists, seeds)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cached_tensors(directory: str | Path, kind: str, parts: dict, compute: Callable[[], dict]) -> dict:
    """Load `kind` tensors for `parts` from the cache, computing and storing them on a miss."""
    path = Path(directory).expanduser() / f"{kind}-{cache_key(parts)}.safetensors"
    if path.is_file():
        return load_file(str(path))
    tensors = {name: t.detach().contiguous().cpu() for name, t in compute().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))
    return tensors


# --- sharded stores: caches too big to hold in memory --------------------------------------------------------

INDEX = "index.json"


def cache_lock(target: Path) -> FileLock:
    """An inter-process lock beside `target`: DDP ranks or concurrent runs that need the same cache entry
    compute it once (the first to take the lock), the others wait and then read it. An flock, so a killed
    holder releases it; filelock falls back to a lock file where the file system has no flock."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(target) + ".lock")


def sharded_tensors(
    directory: str | Path,
    kind: str,
    parts: dict,
    rows: int,
    shard_rows: int,
    compute_rows: Callable[[int, int], dict],
    compute_shared: Callable[[], dict] | None = None,
    finish: Callable[[], None] | None = None,
    description: str | None = None,
) -> ShardedStore:
    """The store of `rows` rows of `kind` tensors for `parts`, computing whatever is missing.

    `compute_rows(start, stop)` returns tensors with `stop - start` rows (batch first); each call's result is
    written at once as its own shard, so an interrupted computation resumes at the first missing shard.
    `compute_shared()` gives tensors common to every row (e.g. the negative prompt's conditioning).
    `finish()` runs after any computation (to free the models that did it). The index is written last:
    a store with an index is complete.
    """
    positive_int("shard rows", shard_rows)
    folder = Path(directory).expanduser() / f"{kind}-{cache_key(parts)}"
    if ShardedStore.is_complete(folder):
        return ShardedStore(folder)
    with cache_lock(folder):
        if ShardedStore.is_complete(folder):  # another process built it while this one waited
            return ShardedStore(folder)
        try:
            _build_store(folder, rows, shard_rows, compute_rows, compute_shared, description or kind)
        finally:
            if finish is not None:
                finish()
    return ShardedStore(folder)


def _build_store(folder: Path, rows: int, shard_rows: int, compute_rows, compute_shared, description: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shared = None
    if compute_shared is not None:
        shared = "shared.safetensors"
        if not (folder / shared).is_file():
            _save(folder / shared, compute_shared())
    shards = [(start, min(start + shard_rows, rows)) for start in range(0, rows, shard_rows)]
    names = [f"shard-{start:09d}-{stop:09d}.safetensors" for start, stop in shards]
    missing = [(span, name) for span, name in zip(shards, names) if not (folder / name).is_file()]
    done = rows - sum(stop - start for (start, stop), _ in missing)
    with tqdm(total=rows, initial=done, desc=description, unit="row", disable=None) as progress:
        for (start, stop), name in missing:
            tensors = compute_rows(start, stop)
            wrong = {k: tuple(v.shape) for k, v in tensors.items() if v.dim() == 0 or len(v) != stop - start}
            if wrong:
                raise ValueError(f"{description}: rows {start}:{stop} should have {stop - start} rows; got {wrong}")
            _save(folder / name, tensors)
            progress.update(stop - start)
    for stale in set(folder.glob("shard-*.safetensors")) - {folder / n for n in names}:
        stale.unlink()  # shards of an earlier layout (another shard size)
    index = {
        "rows": rows,
        "shared": shared,
        "shards": [{"file": n, "start": a, "stop": b} for (a, b), n in zip(shards, names)],
    }
    atomic_write(folder / INDEX, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=1)))


def _save(path: Path, tensors: dict) -> None:
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))


class ShardedStore(Dataset):
    """Rows of named tensors spread over safetensors shards, read one row (or range) at a time.

    Nothing is held open between reads: each read maps the shard, copies the rows out and unmaps it, so
    memory does not grow with the store, and the store pickles into DataLoader workers as a folder name.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = json.loads((self.folder / INDEX).read_text())
        self.rows, self.shared_file = index["rows"], index["shared"]
        self.files = [s["file"] for s in index["shards"]]
        self.starts = [s["start"] for s in index["shards"]]

    @staticmethod
    def is_complete(folder: Path) -> bool:
        """An index, and every file it names on disk."""
        if not (folder / INDEX).is_file():
            return False
        index = json.loads((folder / INDEX).read_text())
        names = [s["file"] for s in index["shards"]] + ([index["shared"]] if index["shared"] else [])
        return all((folder / name).is_file() for name in names)

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """Row `index` of every tensor, without the batch dimension."""
        if not -self.rows <= index < self.rows:
            raise IndexError(f"row {index} is out of range for a store of {self.rows} rows")
        index %= self.rows
        shard = bisect.bisect_right(self.starts, index) - 1
        offset = index - self.starts[shard]
        with safe_open(self.folder / self.files[shard], framework="pt") as f:
            return {k: f.get_slice(k)[offset : offset + 1][0] for k in f.keys()}

    def read(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Rows `start:stop` of every tensor (batch first), read only from the shards that hold them."""
        start, stop = max(start, 0), min(stop, self.rows)
        parts: dict[str, list[torch.Tensor]] = {}
        for shard, first in enumerate(self.starts):
            last = self.starts[shard + 1] if shard + 1 < len(self.starts) else self.rows
            if last <= start or first >= stop:
                continue
            with safe_open(self.folder / self.files[shard], framework="pt") as f:
                for k in f.keys():
                    parts.setdefault(k, []).append(f.get_slice(k)[max(start, first) - first : min(stop, last) - first])
        return {k: torch.cat(v) for k, v in parts.items()}

    def load(self) -> dict[str, torch.Tensor]:
        """Every row in memory: for small stores (a few dozen evaluation prompts)."""
        return self.read(0, self.rows)

    def shared(self) -> dict[str, torch.Tensor]:
        """The tensors common to every row (empty when the store has none)."""
        return load_file(str(self.folder / self.shared_file)) if self.shared_file else {}
