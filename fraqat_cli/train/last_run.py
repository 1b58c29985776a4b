"""`runs/last`: a link to the newest run folder, so the run just trained is easy to name.

Run folders carry their start time (`runs/<run_name>_<date>_<time>/`, `conf/train.yaml`), so two runs never
share a folder; `fraqat-eval ckpt=runs/last` and `fraqat-export ckpt=runs/last` then find the latest without
anyone copying a timestamp. The link is relative (the `runs/` tree can move) and replaced atomically (two
runs starting together leave one valid link, never a half-made one).
"""

from __future__ import annotations

import os
from pathlib import Path

from fraqat_cli.cli import warn


def point_last_run(link: str | os.PathLike | None, run_dir: Path) -> None:
    """Make `link` (e.g. `runs/last`) point at `run_dir`; None: no link. A real file or folder at `link` is
    left alone, with a warning: it is the user's."""
    if link is None:
        return
    link, run_dir = Path(link).expanduser(), Path(run_dir).resolve()
    if link.exists() and not link.is_symlink():
        warn(f"last_run_link={str(link)!r} is a file or folder, not a link: left as it is (last_run_link=null "
             f"stops this warning)")
        return
    if link.is_symlink() and link.resolve() == run_dir:  # hydra.run.dir=runs/last: the run is the last already
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    staged = link.with_name(f".{link.name}.{os.getpid()}")
    staged.unlink(missing_ok=True)
    staged.symlink_to(os.path.relpath(run_dir, link.parent.resolve()))
    os.replace(staged, link)  # atomic: the old link or the new one, never none
