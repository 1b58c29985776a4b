"""Files that appear whole or not at all: every checkpoint, cache entry, export and result goes through here.

A write that the disk refuses (full, over quota, read-only, no permission) is raised as `DiskWriteError`: one
line naming the file, the reason in words and, when known, the bytes it needed and the bytes free.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from fraqat_cli.errors import ExpectedFailure

# errno -> the reason in words, for the failures that are the disk's, not the program's
DISK_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file is larger than the file system allows",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}
# `atomic_write`'s temporary files: `.<name>.<8 characters of mkstemp>.tmp` beside the file they become.
TEMP_SUFFIX = ".tmp"
TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX))
# A writer that reports a failed write without its OSError (torch.save: "unexpected pos") is taken to have hit a
# full disk when the folder has less than this left at the moment it failed.
NEARLY_FULL_BYTES = 1 << 20


class DiskWriteError(OSError, ExpectedFailure):
    """A file could not be written for a reason that lies with the disk; the message says which and where."""

    def __init__(self, path: Path, code: int, needed: int | None = None, free: int | None = None,
                 note: str | None = None, folder: bool = False, reason: str | None = None) -> None:
        self.path, self.needed, self.free, self.reason = Path(path), needed, free, reason
        detail = []
        if needed:
            detail.append(f"it needs {_mib(needed)}")
        if free is not None and code in (errno.ENOSPC, errno.EDQUOT):
            detail.append(f"{_mib(free)} free")
        where = f"in folder {str(self.path)!r}" if folder else repr(str(self.path))
        message = f"cannot write {where}: {reason or DISK_REASONS[code]}"
        message += f" ({', '.join(detail)})" if detail else ""
        super().__init__(code, message + (f"; {note}" if note else ""))

    def with_note(self, note: str) -> DiskWriteError:
        """The same error with `note` (e.g. which checkpoint is still good) after the reason."""
        return DiskWriteError(self.path, self.errno, self.needed, self.free, note, reason=self.reason)

    def __str__(self) -> str:
        return self.strerror


def atomic_write(path: Path, write: Callable[[str], None], size: int | None = None) -> None:
    """Call `write(tmp_path)` beside `path`, flush it to disk, and only then rename it over `path`.

    The file and its folder are fsynced around the rename, so a power cut leaves either the old file or
    the new one, never an empty or truncated one under the final name. A failed write removes the
    temporary file and re-raises; a failure of the disk's making as `DiskWriteError` (`size`: the bytes
    the file needs, when the caller knows them).
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; the result should not be
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except Exception as error:
        code = disk_errno(error, path.parent)  # before the partial file goes: a full disk shows as ~0 bytes free
        free = free_bytes(path.parent)
        if tmp is not None:
            free = None if free is None else free + _size(tmp)  # free once the partial file is gone
            Path(tmp).unlink(missing_ok=True)
        if code is None or isinstance(error, DiskWriteError):
            raise
        raise DiskWriteError(path, code, size, free) from error
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def disk_errno(error: BaseException, folder: Path) -> int | None:
    """The errno of `error` when the disk caused it: an OSError with a disk errno anywhere in its chain (or
    "os error N" in a message, as safetensors words it), or any failure while `folder` is all but full.
    None when the cause lies elsewhere."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_REASONS:
            return seen.errno
        found = re.search(r"os error (\d+)", str(seen))
        if found and int(found.group(1)) in DISK_REASONS:
            return int(found.group(1))
        seen = seen.__cause__ or seen.__context__
    free = free_bytes(folder)
    return errno.ENOSPC if free is not None and free < NEARLY_FULL_BYTES else None


def free_bytes(folder: Path) -> int | None:
    """Bytes free to this user in `folder` (or its nearest existing parent); None when it cannot be told."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def check_writable(folder: Path, note: str | None = None) -> None:
    """Create `folder` if needed and write (then remove) a file in it: a run that could not save its results
    learns it before it starts, as a `DiskWriteError` naming the folder (and `note`: what to do)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        if (in_the_way := not_a_folder(folder)) is not None:  # mkdir's FileExistsError, or ELOOP: name the cause
            raise DiskWriteError(folder, error.errno, note=note, folder=True, reason=in_the_way) from error
        if error.errno not in DISK_REASONS:
            raise
        raise DiskWriteError(folder, error.errno, note=note, folder=True) from error


def not_a_folder(folder: Path) -> str | None:
    """Why `folder` (or the nearest of its parents that exists) cannot be a folder, in words; None when nothing
    is in the way."""
    for path in (Path(folder), *Path(folder).parents):
        if not os.path.lexists(path):
            continue
        if os.path.isdir(path):  # follows links: a loop or a dangling link is not one
            return None
        try:
            os.stat(path)
        except OSError as error:
            if error.errno == errno.ELOOP:
                return f"{str(path)!r} is a symbolic link that loops back on itself"
            if os.path.islink(path):
                return f"{str(path)!r} is a symbolic link to {os.readlink(path)!r}, which does not exist"
            return None
        return f"{str(path)!r} is a file, not a folder"
    return None


def remove_leftover_temporaries(folder: Path) -> tuple[int, int]:
    """Remove the temporary files that writes killed part-way (`atomic_write`) left in `folder`: (files, bytes).

    Only for a folder no live writer uses (a run folder whose lock this process holds)."""
    count = size = 0
    for path in Path(folder).iterdir() if Path(folder).is_dir() else ():
        if TEMPORARY.fullmatch(path.name) and path.is_file() and not path.is_symlink():
            size += _size(str(path))
            path.unlink(missing_ok=True)
            count += 1
    return count, size


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
