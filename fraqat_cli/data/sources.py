"""Training data: prompts and the clean latents the noisy inputs are made from.

`PromptOnlySource` (the offline default) needs no dataset: its latents are the
teacher's own samples for the prompts (data-free distillation). `CocoSource`
reads COCO captions and encodes their images with the model's VAE. Either way
the latents are cached on disk in shards (an interrupted run resumes at its last
shard) and served lazily, a row at a time, as (conditioning, latents) rows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fraqat_cli.cache import ShardedStore, sharded_tensors
from fraqat_cli.checks import positive_int
from fraqat_cli.data.captions import offline_captions, read_prompt_file
from fraqat_cli.data.conditioning import encode_device
from fraqat_cli.data.prompt_sets import coco_caption_pairs
from fraqat_cli.models.conditioning import Conditioning
from fraqat_cli.models.generation import generate
from fraqat_cli.models.loading import LoadedModel, model_identity


def _positive_int(name: str, value) -> int:
    return positive_int(f"data.{name}", value)


# Rows per latent shard: 256 SD3.5 latents (16 x 64 x 64 float32) are 64 MB; an interrupted
# generation loses at most one shard's work.
LATENT_SHARD_ROWS = 256


def _latent_store(kind: str, parts: dict, rows: int, shard_rows: int, pipe, device,
                  compute: Callable[[int, int], torch.Tensor], cache_dir: str) -> ShardedStore:
    """A sharded latent cache. Only if something is missing does the pipeline move to
    `encode_device(device)` to compute it; it goes back afterwards (the training loop places the teacher)."""
    home = {}

    def compute_rows(start: int, stop: int) -> dict:
        if not home:
            home["device"] = pipe.device
            pipe.to(encode_device(device))
        return {"latents": compute(start, stop)}

    def finish() -> None:
        if home:
            pipe.to(home["device"])

    return sharded_tensors(cache_dir, kind, parts, rows, shard_rows, compute_rows, finish=finish,
                           description=kind.replace("-", " "))  # the stage's label: "teacher latents"


class PromptOnlySource:
    """Generated (or file) prompts; training latents sampled by the teacher for them."""

    def __init__(
        self,
        num_prompts: int = 64,
        prompt_seed: int = 0,
        prompt_file: str | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        shard_rows: int = LATENT_SHARD_ROWS,
    ) -> None:
        self.num_prompts = _positive_int("num_prompts", num_prompts)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.shard_rows = _positive_int("shard_rows", shard_rows)
        self.prompt_seed, self.prompt_file, self.num_workers = prompt_seed, prompt_file, num_workers

    def prompts(self) -> list[str]:
        if self.prompt_file:
            return read_prompt_file(self.prompt_file)[: self.num_prompts]
        return offline_captions(self.num_prompts, self.prompt_seed)

    def latent_store(self, model: LoadedModel, conditioning: ShardedStore, cache_dir: str, seed: int,
                     device=None) -> ShardedStore:
        """The teacher's latents for every prompt (row i from seed `seed + i`), generated shard by shard
        from conditioning read off the store, on `encode_device(device)`."""
        read = lambda start, stop: Conditioning(conditioning.read(start, stop), conditioning.shared())  # noqa: E731
        return self._latents(model, len(conditioning), read, cache_dir, seed, device)

    def latents(self, model: LoadedModel, conditioning: Conditioning, cache_dir: str, seed: int) -> torch.Tensor:
        """`latent_store` for conditioning already in memory (a few dozen prompts), loaded whole."""
        read = lambda start, stop: conditioning.rows(slice(start, stop))  # noqa: E731
        return self._latents(model, len(conditioning), read, cache_dir, seed, None).load()["latents"]

    def _latents(self, model: LoadedModel, rows: int, read, cache_dir, seed, device) -> ShardedStore:
        model_cfg = model.config
        seeds = [seed + i for i in range(rows)]
        parts = {
            "model": model_identity(model_cfg),
            "cond": self.prompts(),
            "seeds": seeds,
            "sampler": str(model_cfg.sampler),
            "resolution": model_cfg.resolution,
        }

        def sample(start: int, stop: int) -> torch.Tensor:
            return generate(model, read(start, stop), seeds[start:stop], output_type="latent")

        return _latent_store("teacher-latents", parts, rows, self.shard_rows, model.pipe, device, sample, cache_dir)


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
        shard_rows: int = LATENT_SHARD_ROWS,
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
        self.shard_rows = _positive_int("shard_rows", shard_rows)
        self.sample_seed, self.num_workers = sample_seed, num_workers
        self._pairs = None

    def pairs(self) -> list[tuple[str, str]]:
        """(image file name, caption) pairs: each image's first caption, a seeded sample of images."""
        if self._pairs is None:
            self._pairs = coco_caption_pairs(self.captions_file, self.max_images, self.sample_seed)
        return self._pairs

    def prompts(self) -> list[str]:
        return [caption for _, caption in self.pairs()]

    def latent_store(self, model: LoadedModel, conditioning, cache_dir: str, seed: int,
                     device=None) -> ShardedStore:
        """The VAE latents of every image, encoded shard by shard on `encode_device(device)`."""
        model_cfg = model.config
        files = [name for name, _ in self.pairs()]
        parts = {
            "model": model_identity(model_cfg),
            "images": str(self.images_dir),
            "files": files,
            "resolution": model_cfg.resolution,
        }

        @torch.no_grad()
        def encode(start: int, stop: int) -> torch.Tensor:
            chunks = []
            for first in range(start, stop, self.batch_size):
                names = files[first : min(first + self.batch_size, stop)]
                images = torch.stack([load_image(self.images_dir / name, model_cfg.resolution) for name in names])
                chunks.append(model.family.image_latents(model.pipe, images).float().cpu())
            return torch.cat(chunks)

        return _latent_store("image-latents", parts, len(files), self.shard_rows, model.pipe, device, encode,
                             cache_dir)

    def latents(self, model: LoadedModel, conditioning: Conditioning, cache_dir: str, seed: int) -> torch.Tensor:
        """`latent_store`, loaded whole (for small sets)."""
        return self.latent_store(model, None, cache_dir, seed).load()["latents"]


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
    """Rows of (conditioning tensors, clean latents), as dicts of tensors, read lazily from the two stores:
    a rank (or DataLoader worker) holds only the rows it is batching, whatever the size of the prompt set."""

    def __init__(self, conditioning: ShardedStore, latents: ShardedStore) -> None:
        if len(conditioning) != len(latents):
            raise ValueError(
                f"conditioning and latents disagree on the number of rows: {len(conditioning)} != {len(latents)}"
            )
        self.conditioning, self.latents = conditioning, latents

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {**self.conditioning[index], "latents": self.latents[index]["latents"]}
