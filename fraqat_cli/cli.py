"""What the entry points share: turn expected failures into one clear line and a non-zero exit."""

from __future__ import annotations

import sys
from collections.abc import Callable

from hydra.errors import InstantiationException

EXIT_BAD_INPUT = 2


def instantiate_or_raise(config, **kwargs):
    """`hydra.utils.instantiate`, re-raising a bad value or a missing file as itself, not wrapped."""
    from hydra.utils import instantiate

    try:
        return instantiate(config, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, (ValueError, FileNotFoundError)):
            raise error.__cause__ from None
        raise


def run_reporting_errors(program: str, work: Callable[[], object]):
    """Run `work`; a bad value, a missing file or an unloadable model exits with status 2 and its message."""
    from fraqat_cli.models import ModelLoadError

    expected = (ValueError, FileNotFoundError, ModelLoadError)
    try:
        return work()
    except InstantiationException as error:
        cause = error.__cause__ if isinstance(error.__cause__, expected) else error
        print(f"{program}: error: {cause}", file=sys.stderr)
    except expected as error:
        print(f"{program}: error: {error}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
