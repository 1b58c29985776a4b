"""The one error type the entry points treat as the user's to fix rather than the code's."""

from __future__ import annotations


class ExpectedFailure(Exception):
    """A failure that lies with the input, the disk or the run rather than the code: the entry points print
    its message as one line and exit with status 2. Each layer derives its own (`ModelLoadError`,
    `DiskWriteError`, `TrainingDiverged`), so the entry points need to know none of them."""
