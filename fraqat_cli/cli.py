"""What the entry points share: one clear line and a non-zero exit for expected failures, and a quiet console."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf.errors import MissingMandatoryValue

from fraqat_cli.entry import refuse_missing
from fraqat_cli.errors import ExpectedFailure
from fraqat_cli.files import DiskWriteError, check_writable

EXIT_BAD_INPUT = 2


def instantiate_or_raise(config, **kwargs):
    """`hydra.utils.instantiate`, re-raising a bad value or a missing file as itself, not wrapped."""
    try:
        return instantiate(config, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, (ValueError, FileNotFoundError)):
            raise error.__cause__ from None
        raise


def run_reporting_errors(program: str, work: Callable[[], object]):
    """Run `work`; a bad value, a missing file, a missing mandatory setting or an `ExpectedFailure` (an
    unloadable model, a write the disk refused, a diverged run) exits with status 2 and its message."""
    expected = (ValueError, FileNotFoundError, MissingMandatoryValue, ExpectedFailure)
    try:
        return work()
    except InstantiationException as error:
        cause = error.__cause__ if isinstance(error.__cause__, expected) else error
        print(f"{program}: error: {_message(cause)}", file=sys.stderr)
    except expected as error:
        print(f"{program}: error: {_message(error)}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


class WritableRunFolder(Callback):
    """A Hydra callback: Hydra writes its own files into the run (or sweep) folder before the program's code
    runs, so a folder that refuses writes is refused here, in one line with exit status 2, not in Hydra's
    traceback. (A subclass of Hydra's `Callback`, whose other hooks do nothing: Hydra warns at every run
    about a hook a callback lacks.)"""

    def __init__(self, program: str) -> None:
        self.program = program

    def on_run_start(self, config, **kwargs) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config, **kwargs) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")

    def _check(self, folder: str, key: str) -> None:
        try:
            check_writable(Path(folder), f"choose another {key}")
        except DiskWriteError as error:
            print(f"{self.program}: error: {error}", file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)


class RequiredKeys(Callback):
    """A Hydra callback: a key the config leaves at `???` (fraqat-eval's `ckpt`) is refused in one line, exit 2,
    before Hydra creates the run folder and before the command imports torch (`fraqat_cli.entry`)."""

    def __init__(self, program: str) -> None:
        self.program = program

    def on_run_start(self, config, **kwargs) -> None:
        refuse_missing(self.program, config)

    def on_multirun_start(self, config, **kwargs) -> None:
        self.on_run_start(config)


def warn(message: str) -> None:
    """One line on stderr, where a user watching a run (or a scheduler's log) looks for trouble."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _message(error: BaseException) -> str:
    """One line; a value the config marks `???` names the key and how to give it."""
    if isinstance(error, MissingMandatoryValue):
        key = error.full_key or "a value"
        return f"{key} is required and has no default; give it on the command line, e.g. {key}=..."
    return str(error)


def quiet_console() -> None:
    """What a user reads is progress, results and where files went. Libraries' banners, tips and notices
    about their own internals are silenced at their source; warnings about the user's run stay.
    wandb logs offline unless WANDB_MODE says otherwise (never blocking on a login)."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    # Redirected, stdout is block-buffered and stderr is not: a log holding both (a SLURM job's) would show the
    # run's own lines after the progress lines they came before. A line at a time keeps them in order.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    # torchao (for optim=adamw8bit), which diffusers and transformers import when it is installed, registers
    # enums with torch's pytree, and torch logs a deprecation for each: about torchao's internals, not the run
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated")  # the shipped FID Inception
    # diffusers releases before `dtype=` (fraqat_cli.models.dtype_keyword passes it where it is taken) warn of
    # torch_dtype in their own loaders' internals
    warnings.filterwarnings("ignore", message=r"`torch_dtype` is deprecated", category=FutureWarning)
    # imported here, not at the top: Hydra builds this module's callbacks (a missing key refused) before the
    # command's heavy imports, and a refusal should not wait for diffusers
    import diffusers
    import transformers  # as diffusers above

    diffusers.utils.logging.set_verbosity_error()  # dtype-cast notices about tiny twins' float32 parts
    diffusers.utils.logging.disable_progress_bar()  # "Loading pipeline components" bars
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars of small text encoders


def quiet_lightning() -> None:
    """`quiet_console` for the commands that use Lightning (training, planning, a logger): its device summary,
    seed and tips are silenced. Lightning is imported here, not at the top: reading, evaluating and exporting a
    student never need it, and it sets its loggers to INFO when imported, so it is imported before they are set."""
    import lightning  # noqa: F401

    for name in ("lightning.pytorch", "lightning.fabric"):  # logged twice under Hydra
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # Lightning on torch >= 2.9
