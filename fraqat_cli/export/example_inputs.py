"""Example inputs an export is traced and checked with: real prompt conditioning, seeded noise latents."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from fraqat_cli.data.captions import offline_captions
from fraqat_cli.data.conditioning import prompt_conditioning
from fraqat_cli.models.conditioning import conditioning_of


def example_inputs(model_cfg: DictConfig, pipe, example_cfg: DictConfig, cache_dir: str) -> dict[str, torch.Tensor]:
    """{latents, timestep, conditioning...}: the graph's inputs, in order, for `example_cfg.batch_size` prompts.

    Latents are (B, C, H, W) at the model's resolution; timesteps spread over the schedule.
    """
    batch = example_cfg.batch_size
    cond = prompt_conditioning(model_cfg, offline_captions(batch, seed=example_cfg.seed), cache_dir).positive
    size = model_cfg.resolution // pipe.vae_scale_factor
    generator = torch.Generator().manual_seed(example_cfg.seed)
    latents = torch.randn(batch, pipe.vae.config.latent_channels, size, size, generator=generator)
    timestep = torch.linspace(100.0, 900.0, batch)
    return {"latents": latents, "timestep": timestep, **{k: v.float() if v.is_floating_point() else v
                                                          for k, v in cond.items()}}


def student_prediction(transformer: torch.nn.Module, family, example: dict[str, torch.Tensor]) -> torch.Tensor:
    kwargs = family.transformer_kwargs(example["latents"], example["timestep"], conditioning_of(example))
    return transformer(**kwargs, return_dict=False)[0]


def relative_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    """||got - expected|| / ||expected|| (L2 over every element)."""
    if got.shape != expected.shape:
        raise ValueError(f"exported model's output has shape {tuple(got.shape)}, the student's {tuple(expected.shape)}")
    return float((got.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-30))
