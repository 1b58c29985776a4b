"""Prompt sets: the offline default (captions written from shape attributes) and plain text files.

The offline captions need no download; the same list trains the tiny models'
tokenizers, so every word of a prompt is in their vocabulary. The attribute
lists and the caption wording here are also what `fraqat_cli.shapes` draws and
describes, so a prompt and a training image speak the same words.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

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
    """One prompt per non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist; give a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {str(path)!r} holds no prompt; write one prompt per line")
    return prompts
