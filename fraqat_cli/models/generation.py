"""Generate with a family's own diffusers pipeline from cached conditioning, one seed per prompt."""

from __future__ import annotations

import torch
from PIL import Image

from fraqat_cli.models.conditioning import Conditioning
from fraqat_cli.models.loading import LoadedModel


@torch.no_grad()
def generate(model: LoadedModel, conditioning: Conditioning, seeds: list[int], output_type: str = "pil",
             batch_size: int = 8, resolution: int | None = None):
    """Images (PIL list) or latents (tensor in (B, C, H, W) layout) for every prompt of `conditioning`, drawn
    by `model.pipe`'s transformer.

    Row i is drawn from `torch.Generator().manual_seed(seeds[i])`, so a prompt's
    image does not depend on its batch neighbours.
    """
    if len(conditioning) != len(seeds):
        raise ValueError(f"generate: {len(conditioning)} conditioning rows but {len(seeds)} seeds; "
                         f"give one seed per row")
    pipe, family, model_cfg = model.pipe, model.family, model.config
    resolution = resolution or model_cfg.resolution
    sampler = model_cfg.sampler
    device, dtype = pipe.transformer.device, pipe.transformer.dtype
    to_pipe = lambda t: t.to(device, dtype) if t.is_floating_point() else t.to(device)  # noqa: E731
    outputs = []
    for start in range(0, len(seeds), batch_size):
        rows = slice(start, start + batch_size)
        kwargs = family.pipeline_kwargs(
            {k: to_pipe(v) for k, v in conditioning.rows(rows).positive.items()},
            {k: to_pipe(v) for k, v in conditioning.negative.items()},
        )
        result = pipe(
            **kwargs,
            height=resolution,
            width=resolution,
            num_inference_steps=sampler.num_inference_steps,
            guidance_scale=sampler.guidance_scale,
            generator=[torch.Generator().manual_seed(int(s)) for s in seeds[rows]],
            output_type=output_type,
            max_sequence_length=model_cfg.max_sequence_length,
            **sampler.get("extra", {}),
        ).images
        if output_type == "latent":
            outputs.append(family.from_pipeline_latents(pipe, result, resolution).float().cpu())
        else:
            outputs.extend(result)
    return torch.cat(outputs) if output_type == "latent" else outputs


def image_grid(images, columns: int | None = None):
    """Paste equally sized PIL images into one grid image, row by row."""

    columns = columns or min(len(images), 4)
    rows = -(-len(images) // columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def student_grid_maker(model: LoadedModel, conditioning: Conditioning, count: int, seed: int):
    """A function student -> grid image of the first `count` prompts, drawn by the student inside the
    teacher's pipeline.

    The student keeps its float32 master weights; the pipeline (VAE, latents, conditioning) runs in the
    teacher's dtype, so the student runs under autocast to that dtype, as it does in bf16-mixed training.
    """

    pipe = model.pipe

    def make(student):
        teacher, was_training = pipe.transformer, student.training
        device = next(student.parameters()).device
        pipe.vae.to(device)
        pipe.transformer = student.eval()
        try:
            with torch.autocast(device.type, dtype=teacher.dtype, enabled=teacher.dtype != student.dtype):
                images = generate(model, conditioning.rows(slice(0, count)), list(range(seed, seed + count)))
        finally:
            pipe.transformer = teacher
            student.train(was_training)
        return image_grid(images)

    return make
