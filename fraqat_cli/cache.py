"""A disk cache of tensors keyed by what produced them (text embeddings, latents).

Text encoders and VAEs are the heaviest parts of a pipeline; running them once
per model and prompt set, and keeping only their outputs, keeps them out of
memory during training. Files are safetensors, written atomically.

Small entries are one file (`cached_tensors`); entries that grow with the prompt
set (text conditioning, clean latents) are sharded stores (`sharded_tensors`):
written shard by shard under an inter-process lock, resumable, and read one row
at a time (`ShardedStore`).

Entries prove themselves before use: every file carries its entry's key in its
metadata, and a file that cannot be read (truncated by a full disk or a partial
copy), holds another entry or has the wrong number of rows is recomputed in place,
with a warning that names it. A store's index is data, not a list of paths to trust: every file it names must
lie inside the entry's own folder (`index_files`), so a crafted or damaged index makes its entry corrupt and
recomputed, and never has a file outside read or deleted.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from fraqat_cli.checks import positive_int
from fraqat_cli.cli import warn
from fraqat_cli.files import atomic_write
from fraqat_cli.progress import Progress

KEY_FIELD = "fraqat_cache_key"  # in each file's safetensors metadata (and index.json): the entry it belongs to


def cache_key(parts: dict) -> str:
    """A stable hash of JSON-able parts (configs, prompt lists, seeds)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cached_tensors(directory: str | Path, kind: str, parts: dict, compute: Callable[[], dict]) -> dict:
    """Load `kind` tensors for `parts` from the cache, computing and storing them on a miss."""
    key = cache_key(parts)
    path = Path(directory).expanduser() / f"{kind}-{key}.safetensors"
    if path.is_file():
        problem = file_problem(path, key)
        if problem is None:
            return load_file(str(path))
        warn(f"cache entry {str(path)!r}: {problem}; recomputing it")
    tensors = {name: t.detach().contiguous().cpu() for name, t in compute().items()}
    _save(path, tensors, key)
    return tensors


def file_problem(path: Path, key: str, rows: int | None = None) -> str | None:
    """Why the cache file `path` cannot serve entry `key` (unreadable, another entry's, not `rows` rows
    of every tensor), or None. Reads the header only."""
    try:
        with safe_open(path, framework="pt") as f:
            stored = (f.metadata() or {}).get(KEY_FIELD, key)  # files of older versions carry no key
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as error:  # safetensors' own error type, or the OS's
        return f"it cannot be read ({str(error).strip().splitlines()[0]})"
    if stored != key:
        return f"it belongs to cache entry {stored}, not {key}"
    if not shapes:
        return "it holds no tensor"
    wrong = {name: shape for name, shape in shapes.items() if rows is not None and (not shape or shape[0] != rows)}
    return f"its tensors should have {rows} rows; got {wrong}" if wrong else None


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
    key = cache_key(parts)
    folder = Path(directory).expanduser() / f"{kind}-{key}"
    if ShardedStore.is_complete(folder) and not store_problems(folder, key):
        return ShardedStore(folder)
    with cache_lock(folder):
        # another process may have built (or repaired) it while this one waited
        problems = store_problems(folder, key) if (folder / INDEX).is_file() else []
        if not problems and ShardedStore.is_complete(folder):
            return ShardedStore(folder)
        for path, problem in problems:
            warn(f"cache entry {str(path)!r}: {problem}; recomputing it")
            path.unlink(missing_ok=True)
        (folder / INDEX).unlink(missing_ok=True)  # rewritten last, once every file is whole again
        try:
            _build_store(folder, key, rows, shard_rows, compute_rows, compute_shared, description or kind)
        finally:
            if finish is not None:
                finish()
    return ShardedStore(folder)


def store_problems(folder: Path, key: str) -> list[tuple[Path, str]]:
    """The files of a complete store that cannot serve entry `key`, each with why: the index unreadable or
    another entry's, a file unreadable or another entry's, a shard with the wrong rows, or one whose tensors
    differ in names or shapes from the other shards'. Reads headers only."""
    try:
        index = json.loads((folder / INDEX).read_text())
        files = index_files(folder, index)
        spans = [(path, s["stop"] - s["start"]) for path, s in zip(files, index["shards"])]
        shared = files[-1] if index["shared"] else None
    except OutsideEntry as error:
        return [(folder / INDEX, str(error))]
    except (ValueError, KeyError, TypeError) as error:
        return [(folder / INDEX, f"it cannot be read ({error})")]
    if index.get(KEY_FIELD, key) != key:
        return [(folder / INDEX, f"it belongs to cache entry {index[KEY_FIELD]}, not {key}")]
    problems = [(path, p) for path, rows in spans if (p := file_problem(path, key, rows)) is not None]  # missing too
    if shared is not None and (p := file_problem(shared, key)) is not None:
        problems.append((shared, p))
    whole = [path for path, _ in spans if path not in {bad for bad, _ in problems}]
    layouts = {path: _layout(path) for path in whole}
    usual = Counter(layouts.values()).most_common(1)[0][0] if layouts else None
    problems += [(path, f"its tensors {dict(layout)} differ from the other shards' {dict(usual)}")
                 for path, layout in layouts.items() if layout != usual]
    return problems


class OutsideEntry(ValueError):
    """An index names a file that does not lie inside its entry's folder."""


def index_files(folder: Path, index: dict) -> list[Path]:
    """The files an index names (its shards in order, then the shared file), each one checked to lie inside
    `folder` once resolved: an absolute name, `..`, or a symlink that leads out raises `OutsideEntry` before
    anything is read or removed, since a cache may be shared between users and runs."""
    names = [s["file"] for s in index["shards"]] + ([index["shared"]] if index["shared"] else [])
    outside = next((name for name in names if not inside(folder, name)), None)
    if outside is not None:
        raise OutsideEntry(f"it names {outside!r}, which is not a file inside its folder; only the entry's own "
                           f"files are read or removed")
    return [folder / name for name in names]


def inside(folder: Path, name) -> bool:
    """Whether `folder / name` is a file name that, symlinks followed, stays strictly inside `folder`."""
    if not isinstance(name, str) or not name:
        return False
    try:
        resolved = (folder / name).resolve()
        return resolved.is_relative_to(folder.resolve()) and not resolved.is_dir()  # the folder itself, too
    except (OSError, RuntimeError):  # a symlink loop
        return False


def _layout(path: Path) -> tuple:
    """Names, dtypes and per-row shapes of a shard's tensors."""
    with safe_open(path, framework="pt") as f:
        return tuple(sorted((n, (str(f.get_slice(n).get_dtype()), *f.get_slice(n).get_shape()[1:])) for n in f.keys()))


def _build_store(folder: Path, key: str, rows: int, shard_rows: int, compute_rows, compute_shared,
                 description: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shards = [(start, min(start + shard_rows, rows)) for start in range(0, rows, shard_rows)]
    names = [f"shard-{start:09d}-{stop:09d}.safetensors" for start, stop in shards]
    missing = [((a, b), name) for (a, b), name in zip(shards, names) if not _whole(folder / name, key, b - a)]
    done = rows - sum(stop - start for (start, stop), _ in missing)
    shared = "shared.safetensors" if compute_shared is not None else None
    # the line opens before the first computation: loading the models that compute is part of the stage
    with Progress(description, rows, unit="rows", initial=done) as progress:
        if shared is not None and not _whole(folder / shared, key):
            _save(folder / shared, compute_shared(), key)
        for (start, stop), name in missing:
            tensors = compute_rows(start, stop)
            wrong = {k: tuple(v.shape) for k, v in tensors.items() if v.dim() == 0 or len(v) != stop - start}
            if wrong:
                raise ValueError(f"{description}: rows {start}:{stop} should have {stop - start} rows; got {wrong}")
            _save(folder / name, tensors, key)
            progress.update(stop - start)
    for stale in set(folder.glob("shard-*.safetensors")) - {folder / n for n in names}:
        stale.unlink()  # shards of an earlier layout (another shard size)
    index = {
        KEY_FIELD: key,
        "rows": rows,
        "shared": shared,
        "shards": [{"file": n, "start": a, "stop": b} for (a, b), n in zip(shards, names)],
    }
    atomic_write(folder / INDEX, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=1)))


def _whole(path: Path, key: str, rows: int | None = None) -> bool:
    """A file already there (an interrupted build's) that can serve; one that cannot is named and replaced."""
    if not path.is_file():
        return False
    problem = file_problem(path, key, rows) if inside(path.parent, path.name) else "it leads outside its folder"
    if problem is not None:
        warn(f"cache entry {str(path)!r}: {problem}; recomputing it")
    return problem is None


def _save(path: Path, tensors: dict, key: str) -> None:
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={KEY_FIELD: key}), size=size)


class ShardedStore(Dataset):
    """Rows of named tensors spread over safetensors shards, read one row (or range) at a time.

    Nothing is held open between reads: each read maps the shard, copies the rows out and unmaps it, so
    memory does not grow with the store, and the store pickles into DataLoader workers as a folder name.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = json.loads((self.folder / INDEX).read_text())
        try:
            index_files(self.folder, index)  # checked again: another process may have rewritten it since
        except OutsideEntry as error:
            raise ValueError(f"cache file {str(self.folder / INDEX)!r}: {error}; run again to recompute it") from error
        self.rows, self.shared_file = index["rows"], index["shared"]
        self.files = [s["file"] for s in index["shards"]]
        self.starts = [s["start"] for s in index["shards"]]

    @staticmethod
    def is_complete(folder: Path) -> bool:
        """An index, and every file it names on disk."""
        try:
            files = index_files(folder, json.loads((folder / INDEX).read_text()))
        except (OSError, ValueError, KeyError, TypeError):  # missing, or damaged (`store_problems` says how)
            return False
        return all(path.is_file() for path in files)

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """Row `index` of every tensor, without the batch dimension."""
        if not -self.rows <= index < self.rows:
            raise IndexError(f"row {index} is out of range for a store of {self.rows} rows")
        index %= self.rows
        shard = bisect.bisect_right(self.starts, index) - 1
        offset = index - self.starts[shard]
        with self._open(self.files[shard]) as f:
            return {k: f.get_slice(k)[offset : offset + 1][0] for k in f.keys()}

    def read(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Rows `start:stop` of every tensor (batch first), read only from the shards that hold them."""
        start, stop = max(start, 0), min(stop, self.rows)
        parts: dict[str, list[torch.Tensor]] = {}
        for shard, first in enumerate(self.starts):
            last = self.starts[shard + 1] if shard + 1 < len(self.starts) else self.rows
            if last <= start or first >= stop:
                continue
            with self._open(self.files[shard]) as f:
                for k in f.keys():
                    parts.setdefault(k, []).append(f.get_slice(k)[max(start, first) - first : min(stop, last) - first])
        return {k: torch.cat(v) for k, v in parts.items()}

    def _open(self, name: str):
        """A shard, opened; damaged since the store was checked (another process, the disk), it is named."""
        try:
            return safe_open(self.folder / name, framework="pt")
        except Exception as error:
            raise ValueError(f"cache file {str(self.folder / name)!r} cannot be read "
                             f"({str(error).strip().splitlines()[0]}); run again to recompute it") from error

    def load(self) -> dict[str, torch.Tensor]:
        """Every row in memory: for small stores (a few dozen evaluation prompts)."""
        return self.read(0, self.rows)

    def shared(self) -> dict[str, torch.Tensor]:
        """The tensors common to every row (empty when the store has none)."""
        return load_file(str(self.folder / self.shared_file)) if self.shared_file else {}
