"""The eval's quick look (`grid.png`): teacher and student side by side for the same prompts and seeds, each
tile enlarged to `TILE` px with nearest-neighbour (the tiny models draw 32 px images: a pixel stays a block a
person can see, never a blur that hides quantization damage), with the prompt written under each pair."""

from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw, ImageFont

TILE = 128  # px per image in the grid
PAIRS_PER_ROW = 4
GAP = 8  # px between pairs
INNER = 2  # px between the images of a pair
CAPTION_LINES = 3
LINE_HEIGHT = 13
LABEL_HEIGHT = 14  # the "teacher | student" line above each row


def _font(size: int = 11):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _caption(prompt: str, width: int) -> list[str]:
    """`prompt` wrapped to the pair's width (about 6 px a character), cut at `CAPTION_LINES` lines."""
    lines = textwrap.wrap(prompt, width=max(8, width // 6)) or [""]
    if len(lines) > CAPTION_LINES:
        lines = lines[:CAPTION_LINES]
        lines[-1] = lines[-1][: max(0, len(lines[-1]) - 3)] + "..."
    return lines


def pair_grid(columns: list[tuple[str, list[Image.Image]]], prompts: list[str]) -> Image.Image:
    """A grid of `len(prompts)` cells, `PAIRS_PER_ROW` a row; cell i holds image i of every column (e.g.
    [("teacher", ...), ("student", ...)]) side by side, their names above, and prompt i under them."""
    count = len(prompts)
    if any(len(images) < count for _, images in columns):
        raise ValueError(f"pair_grid: every column needs {count} images; got "
                         f"{', '.join(f'{name} {len(images)}' for name, images in columns)}")
    cell_w = TILE * len(columns) + INNER * (len(columns) - 1)
    cell_h = LABEL_HEIGHT + TILE + CAPTION_LINES * LINE_HEIGHT + 4
    per_row = min(PAIRS_PER_ROW, count)
    rows = -(-count // per_row)
    grid = Image.new("RGB", (per_row * cell_w + (per_row - 1) * GAP, rows * cell_h + (rows - 1) * GAP), "white")
    draw, font = ImageDraw.Draw(grid), _font()
    for i, prompt in enumerate(prompts):
        left, top = (i % per_row) * (cell_w + GAP), (i // per_row) * (cell_h + GAP)
        for j, (name, images) in enumerate(columns):
            tile = images[i].convert("RGB").resize((TILE, TILE), Image.NEAREST)
            grid.paste(tile, (left + j * (TILE + INNER), top + LABEL_HEIGHT))
            label = name if len(name) <= TILE // 6 else name[: TILE // 6 - 3] + "..."
            draw.text((left + j * (TILE + INNER) + 2, top), label, fill="dimgray", font=font)
        for k, line in enumerate(_caption(prompt, cell_w)):
            draw.text((left + 2, top + LABEL_HEIGHT + TILE + 2 + k * LINE_HEIGHT), line, fill="black", font=font)
    return grid
