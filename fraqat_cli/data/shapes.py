"""A synthetic text-to-image dataset: coloured shapes on 32x32 backgrounds, captioned from their attributes.

No image set can be downloaded here, so the toy teacher (`conf/model/toy.yaml`)
learns from scenes drawn with PIL: one (or two) of `SHAPES` in one of
`COLOURS`, `SIZES` and `PLACES` (the vocabulary of `fraqat_cli.data.captions`), on a
plain or lightly textured background of another colour. A scene is a pure
function of `(split, seed, two_shape_share, index)`, so the same seed gives the
same pixels (and a longer list starts with the shorter one).

Train and validation never share an image: a caption belongs to one split only
(decided by a hash of its text), so validation captions are attribute
combinations the teacher never saw in training.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image, ImageDraw

from fraqat_cli.cache import cached_tensors
from fraqat_cli.data.captions import COLOURS, PLACES, SHAPES, SIZES, caption

RESOLUTION = 32
SPLITS = ("train", "val")
VAL_EVERY = 10  # one caption hash in ten is validation: ~10% of the attribute combinations
PALETTE = {  # RGB, far apart so that every pixel has one nearest colour name
    "red": (215, 35, 35), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (245, 215, 40),
    "purple": (140, 60, 190), "orange": (245, 135, 25), "white": (240, 240, 240), "black": (20, 20, 20),
}
CENTRES = {  # (x, y) in pixels of the 32x32 image, continuous coordinates (pixel i spans [i, i + 1))
    "at the top left": (9.5, 9.5), "at the top right": (22.5, 9.5), "in the centre": (16.0, 16.0),
    "at the bottom left": (9.5, 22.5), "at the bottom right": (22.5, 22.5),
}
RADII = {"small": 4.5, "large": 7.0}  # pixels; the outer radius of a star is 1.15 times this
TEXTURES = ("plain", "noise", "gradient", "stripes")  # "lightly": at most about +-10 grey levels
SUPERSAMPLE = 4  # shapes are drawn 4x larger and box-filtered down: anti-aliased edges
VERSION = 1  # bump when rendering changes, so cached images are redrawn
ATTRIBUTES = ("colour", "shape", "place", "size")  # what a caption says about its (first) shape

assert set(PALETTE) == set(COLOURS) and set(CENTRES) == set(PLACES), "shapes.py and prompts.py disagree"


@dataclass(frozen=True)
class ShapeObject:
    size: str
    colour: str
    shape: str
    place: str
    dx: float = 0.0  # offset of the centre from the place's centre, pixels
    dy: float = 0.0
    scale: float = 1.0  # radius factor around the size's radius

    @property
    def centre(self) -> tuple[float, float]:
        x, y = CENTRES[self.place]
        return x + self.dx, y + self.dy

    @property
    def radius(self) -> float:
        return RADII[self.size] * self.scale


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    background: str
    texture: str
    texture_seed: int

    @property
    def caption(self) -> str:
        return caption([(o.size, o.colour, o.shape, o.place) for o in self.objects], self.background)


def split_of(text: str) -> str:
    """The split a caption belongs to: a stable hash of its text, not Python's salted `hash`."""
    digest = int(hashlib.md5(text.encode()).hexdigest(), 16)
    return "val" if digest % VAL_EVERY == 0 else "train"


def _random_object(rng: random.Random) -> ShapeObject:
    return ShapeObject(
        rng.choice(SIZES), rng.choice(COLOURS), rng.choice(SHAPES), rng.choice(PLACES),
        dx=rng.uniform(-1, 1), dy=rng.uniform(-1, 1), scale=rng.uniform(0.9, 1.1),
    )


def _apart(a: ShapeObject, b: ShapeObject) -> bool:
    """Two shapes neither touch nor share a place or colour (a star reaches 1.15 radii out)."""
    (xa, ya), (xb, yb) = a.centre, b.centre
    distance = ((xa - xb) ** 2 + (ya - yb) ** 2) ** 0.5
    return a.place != b.place and a.colour != b.colour and distance > 1.15 * (a.radius + b.radius)


def sample_scenes(split: str, count: int, seed: int = 0, two_shape_share: float = 0.0) -> list[Scene]:
    """`count` scenes of `split`, drawn from `seed`; a `two_shape_share` of them hold two shapes."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    if count < 1:
        raise ValueError(f"count must be a positive integer; got {count!r}")
    if not 0.0 <= two_shape_share <= 1.0:
        raise ValueError(f"two_shape_share must lie in [0, 1]; got {two_shape_share!r}")
    rng = random.Random(f"shapes-{seed}-{split}")  # a string seed is hashed stably by `random`
    scenes = []
    while len(scenes) < count:
        objects = [_random_object(rng)]
        if rng.random() < two_shape_share:
            objects.append(_random_object(rng))
            if not _apart(*objects):
                continue  # draw the pair again: some first shapes (e.g. one in the centre) fit no second
        background = rng.choice([c for c in COLOURS if c not in {o.colour for o in objects}])
        scene = Scene(tuple(objects), background, rng.choice(TEXTURES), rng.randrange(2**31))
        if split_of(scene.caption) == split:
            scenes.append(scene)
    return scenes


def _shape_mask(obj: ShapeObject) -> np.ndarray:
    """Coverage of each pixel by the shape, (32, 32) float32 in [0, 1]."""
    size = RESOLUTION * SUPERSAMPLE
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    (cx, cy), r = (c * SUPERSAMPLE for c in obj.centre), obj.radius * SUPERSAMPLE

    def ring(radii: list[float], start_deg: float) -> list[tuple[float, float]]:
        step = 2 * np.pi / len(radii)
        return [(cx + q * np.cos(np.radians(start_deg) + i * step), cy + q * np.sin(np.radians(start_deg) + i * step))
                for i, q in enumerate(radii)]

    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif obj.shape == "square":
        half = 0.88 * r  # about the circle's area
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=255)
    elif obj.shape == "triangle":
        draw.polygon(ring([1.2 * r] * 3, -90), fill=255)  # pointing up, centroid at the centre
    elif obj.shape == "star":
        draw.polygon(ring([1.15 * r, 0.48 * r] * 5, -90), fill=255)  # five points, one up
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; known: {SHAPES}")
    return np.asarray(canvas.resize((RESOLUTION, RESOLUTION), Image.BOX), dtype=np.float32) / 255.0


def _background(scene: Scene) -> np.ndarray:
    """The background colour with its light texture, (32, 32, 3) float32 in [0, 255]."""
    rng = np.random.default_rng(scene.texture_seed)
    base = np.broadcast_to(np.array(PALETTE[scene.background], np.float32), (RESOLUTION, RESOLUTION, 3))
    y, x = np.mgrid[0:RESOLUTION, 0:RESOLUTION].astype(np.float32) / (RESOLUTION - 1)
    if scene.texture == "plain":
        shade = np.zeros_like(x)
    elif scene.texture == "noise":
        shade = rng.normal(0.0, 4.0, x.shape)
    elif scene.texture == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        shade = 10.0 * ((x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle))
    elif scene.texture == "stripes":
        period, phase = rng.uniform(4, 8), rng.uniform(0, 2 * np.pi)
        shade = 6.0 * np.sin(2 * np.pi * (x + y) * (RESOLUTION - 1) / period + phase)
    else:
        raise ValueError(f"unknown texture {scene.texture!r}; known: {TEXTURES}")
    return base + shade[..., None]


def render(scene: Scene) -> np.ndarray:
    """The scene's image, (32, 32, 3) uint8 RGB."""
    image = _background(scene)
    for obj in scene.objects:
        alpha = _shape_mask(obj)[..., None]
        image = image * (1.0 - alpha) + np.array(PALETTE[obj.colour], np.float32) * alpha
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def shapes_dataset(split: str, count: int, seed: int = 0, cache_dir: str | None = None,
                   two_shape_share: float = 0.0) -> tuple[np.ndarray, list[str]]:
    """(images uint8 (N, 32, 32, 3), captions) of `split`; with `cache_dir`, images are drawn once and cached."""
    scenes = sample_scenes(split, count, seed, two_shape_share)
    captions = [scene.caption for scene in scenes]
    draw = lambda: {"images": torch.from_numpy(np.stack([render(scene) for scene in scenes]))}
    if cache_dir is None:
        return draw()["images"].numpy(), captions

    parts = {"split": split, "count": count, "seed": seed, "two_shape_share": two_shape_share, "version": VERSION}
    return cached_tensors(cache_dir, "shapes", parts, draw)["images"].numpy(), captions


def to_model_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) images -> float32 (N, 3, H, W) in [-1, 1], the range the VAE reads and writes."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def nearest_colour(rgb) -> str:
    """The palette name closest to an RGB triple."""
    names = list(PALETTE)
    distances = ((np.array([PALETTE[n] for n in names], np.float32) - np.asarray(rgb, np.float32)) ** 2).sum(-1)
    return names[int(distances.argmin())]


def dominant_colour(image: np.ndarray, background: str) -> str | None:
    """The most frequent palette colour among pixels not nearest to `background`; None if there are none.

    `image` is uint8 (H, W, 3). This is how a caption's colour is checked in a generated image.
    """
    palette = np.array([PALETTE[n] for n in PALETTE], np.float32)  # (K, 3)
    pixels = image.reshape(-1, 3).astype(np.float32)  # (HW, 3)
    names = np.array(list(PALETTE))[((pixels[:, None] - palette[None]) ** 2).sum(-1).argmin(1)]  # (HW,)
    names = names[names != background]
    if names.size == 0:
        return None
    values, counts = np.unique(names, return_counts=True)
    return str(values[counts.argmax()])


def closest_value(image: np.ndarray, scene: Scene, attribute: str) -> str:
    """The value of the first shape's `attribute` ("colour", "shape", "place" or "size") whose rendering lies
    nearest `image` (uint8 (32, 32, 3), mean squared error), all else as in `scene`.

    Checks a generated image against its caption with no classifier to train: a right
    answer means the image looks more like its caption than like any one-word change of it.
    """
    options = {"colour": [c for c in COLOURS if c != scene.background], "shape": list(SHAPES),
               "place": list(PLACES), "size": list(SIZES)}
    if attribute not in options:
        raise ValueError(f"attribute must be one of {sorted(options)}; got {attribute!r}")
    first = replace(scene.objects[0], dx=0.0, dy=0.0, scale=1.0)
    plain = replace(scene, texture="plain")
    target = image.astype(np.float32)
    errors = [((render(replace(plain, objects=(replace(first, **{attribute: value}),))) - target) ** 2).mean()
              for value in options[attribute]]
    return options[attribute][int(np.argmin(errors))]


def attribute_accuracies(images: list[np.ndarray], scenes: list[Scene]) -> dict[str, float]:
    """Per attribute, the share of images whose `closest_value` is their scene's first shape's own value.

    `images` are uint8 (32, 32, 3), image i drawn for the caption of scene i. The rendered scenes
    themselves score about 0.99, not 1: a small circle and square lie close within the ±1 px, ±10% jitter.
    """
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images for {len(scenes)} scenes; give one image per scene")
    return {attribute: float(np.mean([closest_value(image, scene, attribute) == getattr(scene.objects[0], attribute)
                                      for image, scene in zip(images, scenes)]))
            for attribute in ATTRIBUTES}
