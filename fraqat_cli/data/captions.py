"""Prompt sets: the offline default (captions written from shape attributes) and plain text files.

The offline captions need no download; the same list trains the tiny models'
tokenizers, so every word of a prompt is in their vocabulary. The attribute
lists and the caption wording here are also what `fraqat_cli.data.shapes` draws and
describes, so a prompt and a training image speak the same words.
"""

from __future__ import annotations

import functools
import itertools
import random
from pathlib import Path

from fraqat_cli.cli import warn

SIZES = ("small", "large")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle", "star")
PLACES = ("at the top left", "at the top right", "in the centre", "at the bottom left", "at the bottom right")


def describe(size: str, colour: str, shape: str, place: str) -> str:
    """One object in words: 'a small red circle at the top left'."""
    return f"a {size} {colour} {shape} {place}"


def caption(objects: list[tuple[str, str, str, str]], background: str) -> str:
    """A scene in words, objects as (size, colour, shape, place):
    'a small red circle at the top left and a large blue star in the centre on a green background'."""
    return " and ".join(describe(*obj) for obj in objects) + f" on a {background} background"


def offline_captions(count: int, seed: int = 0) -> list[str]:
    """`count` distinct-as-possible captions such as 'a small red circle at the top left on a blue background'."""
    if count < 1:
        raise ValueError(f"the number of prompts must be positive; got {count}")
    combos = list(itertools.product(SIZES, COLOURS, SHAPES, PLACES, COLOURS))
    combos = [c for c in combos if c[1] != c[4]]  # a shape never vanishes into its background
    rng = random.Random(seed)
    rng.shuffle(combos)
    picked = [combos[i % len(combos)] for i in range(count)]
    return [caption([(size, colour, shape, place)], bg) for size, colour, shape, place, bg in picked]


def tokenizer_corpus() -> list[str]:
    """Every word the offline captions can use, in caption-shaped sentences."""
    return offline_captions(400, seed=1) + [" ".join(SIZES + COLOURS + SHAPES + PLACES)]


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per non-empty line; blank lines are skipped, and how many is said."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist; give a text file with one prompt per line")
    stat = path.stat()
    return list(_prompt_lines(str(path), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=8)
def _prompt_lines(path: str, mtime_ns: int, size: int) -> tuple[str, ...]:
    """The prompts of a file as it is now (its time and size in the key): read, and warned about, once."""
    lines = [line.strip() for line in read_text(Path(path), "prompt file").splitlines()]
    prompts = tuple(line for line in lines if line)
    if not prompts:
        raise ValueError(f"prompt file {path!r} holds no prompt; write one prompt per line")
    if len(prompts) < len(lines):
        warn(f"prompt file {path!r}: {len(lines) - len(prompts)} blank line(s) skipped, {len(prompts)} prompts read")
    return prompts


def read_text(path: Path, what: str) -> str:
    """The text of a UTF-8 file (a byte-order mark allowed); a byte that is not UTF-8 is refused naming the
    file, the line and the column, where a user can find it (not the byte offset Python's decoder gives)."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise ValueError(f"{what} {str(path)!r}, line {line}, column {column}: byte 0x{data[error.start]:02x} is not "
                         f"UTF-8 text; save the file as UTF-8") from None
