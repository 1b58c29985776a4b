"""One run per folder: a lock held for the life of a run, and Hydra's files kept only by a run that trains.

Two `fraqat-train` processes on one folder would overwrite each other's checkpoints while each reports its own
result. `RunLock` makes the second one stop before it touches anything, naming the holder. The lock is an
`flock` on `<run>/.fraqat.lock`, so the kernel releases it when its holder dies however it dies; the file also
records the holder's pid and host, for the message, and a record left by a dead run is taken over with a
warning.

Hydra writes `.hydra/config.yaml` into the run folder before any of our code runs. A run refused (the folder
is held, its stored config differs) or already finished must leave the folder as it was, so where a
`.hydra/` exists already `PendingHydraFiles` sends Hydra's files to a folder of this process's own, and
`HydraFiles` moves them in only once the run is going to train (else removes them).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import open_dict, read_write

from fraqat_cli.cli import warn
from fraqat_cli.errors import ExpectedFailure
from fraqat_cli.files import remove_leftover_temporaries

LOCK_FILE = ".fraqat.lock"
HYDRA_FILES = ".hydra"
PENDING_PREFIX = ".hydra-pending-"


class RunFolderBusy(RuntimeError, ExpectedFailure):
    """Another process holds the run folder; the message names it and the ways on."""


class RunLock:
    """`with RunLock(run_dir):` holds the run folder for this process, or raises `RunFolderBusy`."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.path = Path(run_dir), Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._refuse(fd, read_record(fd))
            except OSError:  # a file system without flock (ENOLCK): the record alone tells, on this host
                if alive_here(holder := read_record(fd)):
                    self._refuse(fd, holder)
            if not same_file(fd, self.path):  # the holder removed the file as we opened it: take the new one
                os.close(fd)
                continue
            self.fd = fd
        self._take_over(read_record(self.fd))
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, record, 0)
        return self

    def _refuse(self, fd: int, holder: dict | None) -> None:
        os.close(fd)
        raise RunFolderBusy(f"run folder {str(self.run_dir)!r} is in use by {describe(holder)}; wait for it to "
                            f"finish, or train into another folder with hydra.run.dir=...")

    def _take_over(self, previous: dict | None) -> None:
        """A record without a live holder: a run that died without releasing (SIGKILL, power cut)."""
        if previous is None:
            return
        if previous.get("host") not in (None, socket.gethostname()):  # its flock may not reach this host
            os.close(self.fd)
            self.fd = None
            raise RunFolderBusy(f"run folder {str(self.run_dir)!r} is locked by {describe(previous)}, which this "
                                f"host cannot check; if that run has ended, remove {str(self.path)!r}")
        warn(f"run folder {str(self.run_dir)!r}: taking over the lock of {describe(previous)}, which is no longer "
             f"running")

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()  # before the flock goes: a waiting process then finds the file gone and retries
        os.close(self.fd)
        self.fd = None


def read_record(fd: int) -> dict | None:
    """The holder's record (pid, host, since) in the lock file, or None when it is empty or unreadable."""
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def alive_here(record: dict | None) -> bool:
    """Whether the record's process runs on this host (another host's cannot be checked: taken as running)."""
    if not record or not isinstance(record.get("pid"), int):
        return False
    if record.get("host") != socket.gethostname():
        return True
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return record["pid"] != os.getpid()


def describe(record: dict | None) -> str:
    if not record:
        return "another fraqat-train process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("since", 0)))
    return f"fraqat-train pid {record.get('pid')} on host {record.get('host')!r} (since {since})"


def same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def first_process() -> bool:
    """True in the process that owns the run folder: not a DDP worker that Lightning (or torchrun) started."""
    return all(int(os.environ.get(name, "0") or 0) == 0 for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


class PendingHydraFiles(Callback):
    """A Hydra callback (`conf/train.yaml`): where the run folder already has Hydra's files, this run's go to
    `.hydra-pending-<pid>/` until `HydraFiles.adopt` (a DDP worker writes none: Lightning passes
    `hydra.output_subdir=null`)."""

    def on_run_start(self, config, **kwargs) -> None:
        subdir = config.hydra.output_subdir
        if subdir is not None and (Path(config.hydra.run.dir) / subdir).is_dir():
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.output_subdir = f"{PENDING_PREFIX}{os.getpid()}"


class HydraFiles:
    """`with HydraFiles(run_dir, subdir) as files:` ... `files.adopt()` when the run trains; a run that leaves
    without adopting them (refused, finished, failed before training) leaves the old `.hydra/` as it was."""

    def __init__(self, run_dir: Path, subdir: str | None) -> None:
        pending = subdir is not None and Path(subdir).name.startswith(PENDING_PREFIX)
        self.run_dir, self.pending = Path(run_dir), Path(run_dir) / subdir if pending else None

    def __enter__(self) -> HydraFiles:
        return self

    def adopt(self) -> None:
        """Replace the run folder's `.hydra/` with this run's."""
        if self.pending is None:
            return
        target, old = self.run_dir / HYDRA_FILES, self.run_dir / f".hydra-old-{os.getpid()}"
        if target.is_dir():
            target.rename(old)
        self.pending.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        self.pending = None

    def __exit__(self, *exc) -> None:
        if self.pending is not None:
            shutil.rmtree(self.pending, ignore_errors=True)


def remove_stale_pending(run_dir: Path) -> None:
    """Pending Hydra folders of earlier processes killed before they trained (this one holds the lock)."""
    for path in Path(run_dir).glob(f"{PENDING_PREFIX}*"):
        if path.name != f"{PENDING_PREFIX}{os.getpid()}" and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def own_run_folder(run_dir: Path):
    """Hold the run folder (`RunLock`; DDP workers share their first process's hold) and keep Hydra's new files
    aside until the run trains (`HydraFiles`)."""
    try:
        subdir = HydraConfig.get().output_subdir
    except ValueError:  # called outside Hydra (tests, sweepers calling train in-process)
        subdir = None
    with HydraFiles(run_dir, subdir) as files, RunLock(run_dir) if first_process() else contextlib.nullcontext():
        yield files


def remove_leftovers(run_dir: Path) -> None:
    """Temporary files of writes killed part-way (a checkpoint can be tens of GB), and Hydra files set aside by
    runs killed before they trained. Safe: this process holds the run folder."""
    if not first_process():
        return
    remove_stale_pending(run_dir)
    for folder in (run_dir / "checkpoints", run_dir):
        count, size = remove_leftover_temporaries(folder)
        if count:
            print(f"removed {count} temporary file(s) of earlier interrupted writes from {str(folder)!r}: "
                  f"{size / 2**20:.1f} MiB freed")
