"""Training data: prompts and the clean latents the noisy inputs are made from.

`PromptOnlySource` (the offline default) needs no dataset: its latents are the
teacher's own samples for the prompts (data-free distillation). `CocoSource`
reads COCO captions and encodes their images with the model's VAE. Either way
the result is cached on disk and served as (conditioning, latents) rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fraqat_cli.cache import cached_tensors
from fraqat_cli.models import model_identity
from fraqat_cli.prompt_sets import coco_caption_pairs
from fraqat_cli.prompts import offline_captions, read_prompt_file
from fraqat_cli.sampling import generate


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"data.{name} must be a positive integer; got {value!r}")
    return value


class PromptOnlySource:
    """Generated (or file) prompts; training latents sampled by the teacher for them."""

    def __init__(
        self,
        num_prompts: int = 64,
        prompt_seed: int = 0,
        prompt_file: str | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
    ) -> None:
        self.num_prompts = _positive_int("num_prompts", num_prompts)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.prompt_seed, self.prompt_file, self.num_workers = prompt_seed, prompt_file, num_workers

    def prompts(self) -> list[str]:
        if self.prompt_file:
            return read_prompt_file(self.prompt_file)[: self.num_prompts]
        return offline_captions(self.num_prompts, self.prompt_seed)

    def latents(self, pipe, family, model_cfg, cond, negative, cache_dir: str, seed: int) -> torch.Tensor:
        seeds = [seed + i for i in range(len(next(iter(cond.values()))))]
        parts = {
            "model": model_identity(model_cfg),
            "cond": self.prompts(),
            "seeds": seeds,
            "sampler": str(model_cfg.sampler),
            "resolution": model_cfg.resolution,
        }
        return cached_tensors(
            cache_dir,
            "teacher-latents",
            parts,
            lambda: {"latents": generate(pipe, family, model_cfg, cond, negative, seeds, output_type="latent")},
        )["latents"]


class CocoSource:
    """COCO captions (one per image, images drawn with a fixed seed) and their VAE latents."""

    def __init__(
        self,
        captions_file: str,
        images_dir: str,
        max_images: int = 10000,
        sample_seed: int = 0,
        batch_size: int = 8,
        num_workers: int = 0,
    ) -> None:
        self.captions_file, self.images_dir = Path(captions_file).expanduser(), Path(images_dir).expanduser()
        if not self.captions_file.is_file():
            raise FileNotFoundError(
                f"COCO captions file {str(self.captions_file)!r} does not exist; download "
                f"annotations_trainval2017.zip from https://cocodataset.org/#download and set "
                f"data.captions_file to its annotations/captions_train2017.json (or captions_train2014.json)"
            )
        if not self.images_dir.is_dir():
            raise FileNotFoundError(
                f"COCO images folder {str(self.images_dir)!r} does not exist; download train2017.zip from "
                f"https://cocodataset.org/#download and set data.images_dir to the unpacked folder"
            )
        self.max_images = _positive_int("max_images", max_images)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.sample_seed, self.num_workers = sample_seed, num_workers
        self._pairs = None

    def pairs(self) -> list[tuple[str, str]]:
        """(image file name, caption) pairs: each image's first caption, a seeded sample of images."""
        if self._pairs is None:
            self._pairs = coco_caption_pairs(self.captions_file, self.max_images, self.sample_seed)
        return self._pairs

    def prompts(self) -> list[str]:
        return [caption for _, caption in self.pairs()]

    def latents(self, pipe, family, model_cfg, cond, negative, cache_dir: str, seed: int) -> torch.Tensor:
        files = [name for name, _ in self.pairs()]
        parts = {
            "model": model_identity(model_cfg),
            "images": str(self.images_dir),
            "files": files,
            "resolution": model_cfg.resolution,
        }

        def encode() -> dict:
            chunks = []
            for start in range(0, len(files), self.batch_size):
                images = torch.stack(
                    [
                        load_image(self.images_dir / name, model_cfg.resolution)
                        for name in files[start : start + self.batch_size]
                    ]
                )
                with torch.no_grad():
                    chunks.append(family.image_latents(pipe, images).float().cpu())
            return {"latents": torch.cat(chunks)}

        return cached_tensors(cache_dir, "image-latents", parts, encode)["latents"]


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """An RGB image resized (shorter side) and centre-cropped to `resolution`, in [-1, 1], (3, R, R)."""
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} named in the captions file is missing from the images folder")
    image = Image.open(path).convert("RGB")
    scale = resolution / min(image.size)
    image = image.resize(
        (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))), Image.BICUBIC
    )
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (R, R, 3)
    return torch.from_numpy(array).permute(2, 0, 1)


class ConditionedLatents(Dataset):
    """Rows of (conditioning tensors, clean latents), as dicts of tensors."""

    def __init__(self, cond: dict[str, torch.Tensor], latents: torch.Tensor) -> None:
        sizes = {len(v) for v in cond.values()} | {len(latents)}
        if len(sizes) != 1:
            raise ValueError(f"conditioning and latents disagree on the number of rows: {sorted(sizes)}")
        self.cond, self.latents = cond, latents

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {**{k: v[index] for k, v in self.cond.items()}, "latents": self.latents[index]}
