"""Evaluation prompt sets (`conf/prompts/`): a fixed, seeded list of prompts, each with its own seed.

A prompt set may also carry its ground truth (`ScenePrompts.scenes`): then `fraqat-eval` can compare
each image with the scene its prompt describes, not only with the teacher's image.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from fraqat_cli.checks import positive_int
from fraqat_cli.data.captions import offline_captions, read_prompt_file, read_text
from fraqat_cli.data.shapes import Scene, sample_scenes


def _count(count) -> int:
    positive_int("prompts.count", count)
    return count


def offline_prompts(count: int = 64, seed: int = 0) -> list[str]:
    """Captions written from shape attributes: needs no download."""
    return offline_captions(_count(count), seed)


class ScenePrompts(list):
    """The captions of `scenes`, in order, as a plain list of prompts that also holds the scenes themselves."""

    def __init__(self, scenes: list[Scene]) -> None:
        super().__init__(scene.caption for scene in scenes)
        self.scenes = list(scenes)


def shapes_val_prompts(count: int = 64, seed: int = 7) -> ScenePrompts:
    """Validation scenes of the synthetic shapes, one shape each (as the toy teacher was trained): caption
    combinations it never saw, with the scenes as ground truth."""
    return ScenePrompts(sample_scenes("val", _count(count), seed))


def file_prompts(path: str, count: int | None = None) -> list[str]:
    """The first `count` prompts of a text file, one per line."""
    prompts = read_prompt_file(path)
    return prompts[: _count(count)] if count is not None else prompts


def coco_prompts(captions_file: str, count: int = 1000, seed: int = 0) -> list[str]:
    """`count` COCO captions drawn with a fixed seed: one caption per image, images sampled without repeats."""
    return [caption for _, caption in coco_caption_pairs(captions_file, _count(count), seed)]


def coco_caption_pairs(captions_file, count: int, seed: int) -> list[tuple[str, str]]:
    """A seeded sample of `count` images from a COCO captions json, each with its first caption."""
    path = Path(captions_file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"COCO captions file {str(path)!r} does not exist; download annotations_trainval2017.zip "
            f"(or 2014) from https://cocodataset.org/#download and point at annotations/captions_val2017.json "
            f"(captions_train2017.json for training)"
        )
    try:
        data = json.loads(read_text(path, "COCO captions file"))
        files = {image["id"]: image["file_name"] for image in data["images"]}
        first = {}
        for note in data["annotations"]:
            first.setdefault(note["image_id"], note["caption"].strip())
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(
            f"{str(path)!r} is not a COCO captions file (needs 'images' with id/file_name and "
            f"'annotations' with image_id/caption): {error}"
        ) from error
    ids = sorted(i for i in first if i in files)
    random.Random(seed).shuffle(ids)
    return [(files[i], first[i]) for i in ids[:count]]
