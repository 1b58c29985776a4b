"""Metrics for a prompt set that carries its ground truth (`prompts=shapes_val`): `fid_val` and attribute accuracy.

When the scene each prompt describes is known, a model's images can be compared with those scenes, not only
with its teacher's images: a student can be close to its teacher and both far from what was asked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fraqat_cli.cache import cache_key
from fraqat_cli.data.shapes import RESOLUTION, VERSION, Scene, attribute_accuracies, render
from fraqat_cli.files import atomic_write


def scene_image_files(scenes: list[Scene], cache_dir: str | Path) -> list[Path]:
    """The scenes as `render` draws them, one PNG each in `cache_dir/scene-images/<key>/`, drawn once.

    The key is the scenes themselves (what count and seed drew) and the renderer's VERSION; each file is
    written atomically, so an interrupted run leaves no half image and the next one completes the folder.
    """
    key = cache_key({"scenes": [repr(scene) for scene in scenes], "version": VERSION})
    folder = Path(cache_dir).expanduser() / "scene-images" / key
    files = [folder / f"{i:05d}.png" for i in range(len(scenes))]
    for scene, file in zip(scenes, files):
        if not file.is_file():
            atomic_write(file, lambda tmp, s=scene: Image.fromarray(render(s)).save(tmp, format="PNG"))
    return files


def attribute_scores(images: list[Image.Image], scenes: list[Scene]) -> dict[str, float]:
    """`attribute_accuracy`, the mean over colour, shape, place and size, and each `<attribute>_accuracy`.

    A text-alignment score with no classifier to train or trust: an image is right on an attribute when it
    lies nearer (mean squared error) its own caption's rendering than any one-word change of it
    (`shapes.closest_value`). Images of another size are box-filtered to 32x32 first.
    """
    per_attribute = attribute_accuracies([_at_scene_resolution(image) for image in images], scenes)
    return {
        "attribute_accuracy": float(np.mean(list(per_attribute.values()))),
        **{f"{attribute}_accuracy": value for attribute, value in per_attribute.items()},
    }


def _at_scene_resolution(image: Image.Image) -> np.ndarray:
    """uint8 (32, 32, 3), box-filtered down if the model draws larger images than the scenes."""
    image = image.convert("RGB")
    if image.size != (RESOLUTION, RESOLUTION):
        image = image.resize((RESOLUTION, RESOLUTION), Image.BOX)
    return np.asarray(image)
