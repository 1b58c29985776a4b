"""What differs between model families: prompt encoding, transformer inputs, latent layout.

Each family speaks to its own diffusers pipeline and transformer class; training, evaluation and export
only call the `Family` methods, so they never branch on a name. Conditioning is a dict of tensors with
the batch first, so it caches and batches like any other data. A new family is one class here (usually a
`DiTFamily` subclass overriding `encode_prompts` and `transformer_kwargs`) plus one `conf/model/*.yaml`
naming it as `family: {_target_: ...}`; docs/adding-a-family.md walks through one.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from diffusers import FluxPipeline


@runtime_checkable
class Family(Protocol):
    """What the stages ask of a model family."""

    text_parts: tuple[str, ...]  # the pipeline components that encode prompts (left out once they are cached)

    def encode_prompts(self, pipe, prompts: list[str], max_sequence_length: int,
                       device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """Conditioning of `prompts`, batch first, keyed as the pipeline's own `prompt_embeds`-style arguments."""

    def transformer_kwargs(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> dict:
        """The transformer's call arguments for clean-layout latents (B, C, H, W), timesteps in [0, 1000)."""

    def pipeline_kwargs(self, cond: dict, negative: dict | None) -> dict:
        """Pipeline arguments that stand in for prompts, from cached conditioning."""

    def image_latents(self, pipe, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) as the latents the transformer denoises."""

    def from_pipeline_latents(self, pipe, latents: torch.Tensor, resolution: int) -> torch.Tensor:
        """Latents returned by `pipe(..., output_type="latent")` in (B, C, H, W) layout."""


def _vae_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """Encode images in [-1, 1] (B, 3, H, W) into the latent space the transformer sees."""
    encoded = vae.encode(images.to(vae.device, vae.dtype))
    raw = encoded.latent if hasattr(encoded, "latent") else encoded.latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (raw - shift) * vae.config.scaling_factor


class DiTFamily:
    """`Family`'s shared behaviour; subclasses set `text_parts` and the conditioning keys."""

    text_parts: tuple[str, ...] = ("tokenizer", "text_encoder")

    def encode_prompts(
        self, pipe, prompts: list[str], max_sequence_length: int, device: torch.device | None = None
    ) -> dict[str, torch.Tensor]:
        """Conditioning of `prompts` (batch first) on `device`: where the text encoders are (the caller moves
        them there), or the pipeline's own execution device when None."""
        raise NotImplementedError

    def transformer_kwargs(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> dict:
        raise NotImplementedError

    def pipeline_kwargs(self, cond: dict, negative: dict | None) -> dict:
        """Pipeline arguments that stand in for prompts, from cached conditioning."""
        kwargs = dict(cond)  # cached keys are named as the pipelines' own arguments
        if negative:
            kwargs["negative_prompt"] = None  # the embeddings below stand in for it
            kwargs.update(
                {"negative_" + k: v.expand(len(next(iter(cond.values()))), *v.shape[1:]) for k, v in negative.items()}
            )
        return kwargs

    def image_latents(self, pipe, images: torch.Tensor) -> torch.Tensor:
        return _vae_latents(pipe.vae, images)

    def from_pipeline_latents(self, pipe, latents: torch.Tensor, resolution: int) -> torch.Tensor:
        """Latents returned by `pipe(..., output_type="latent")` in (B, C, H, W) layout."""
        return latents


class SanaFamily(DiTFamily):
    # Sana prepends a long "complex human instruction" to prompts by default; we encode the prompt alone.
    encode_kwargs = {"complex_human_instruction": None}

    def encode_prompts(self, pipe, prompts, max_sequence_length, device=None):
        embeds, mask, _, _ = pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
            device=device,
            **self.encode_kwargs,
        )
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    def transformer_kwargs(self, latents, timesteps, cond):
        return {
            "hidden_states": latents,
            "encoder_hidden_states": cond["prompt_embeds"],
            "encoder_attention_mask": cond["prompt_attention_mask"],
            "timestep": timesteps,
        }


class PixArtFamily(SanaFamily):
    """Sana's prompt encoding and inputs, plus the (unused at fixed resolution) size conditioning."""

    encode_kwargs = {}

    def transformer_kwargs(self, latents, timesteps, cond):
        kwargs = super().transformer_kwargs(latents, timesteps, cond)
        kwargs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
        return kwargs


class SD3Family(DiTFamily):
    text_parts = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "tokenizer_3", "text_encoder_3")

    def encode_prompts(self, pipe, prompts, max_sequence_length, device=None):
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts,
            prompts,
            prompts,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
            device=device,
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def transformer_kwargs(self, latents, timesteps, cond):
        return {
            "hidden_states": latents,
            "encoder_hidden_states": cond["prompt_embeds"],
            "pooled_projections": cond["pooled_prompt_embeds"],
            "timestep": timesteps,
        }


class FluxFamily(DiTFamily):
    """FLUX packs 2x2 latent patches into tokens and takes positions as ids; timesteps in [0, 1]."""

    text_parts = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")

    def encode_prompts(self, pipe, prompts, max_sequence_length, device=None):
        embeds, pooled, _ = pipe.encode_prompt(
            prompts, prompts, max_sequence_length=max_sequence_length, device=device
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def transformer_kwargs(self, latents, timesteps, cond):
        batch, channels, height, width = latents.shape
        packed = FluxPipeline._pack_latents(latents, batch, channels, height, width)  # (B, HW/4, 4C)
        image_ids = FluxPipeline._prepare_latent_image_ids(
            batch, height // 2, width // 2, latents.device, latents.dtype
        )
        text_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3, device=latents.device, dtype=latents.dtype)
        return {
            "hidden_states": packed,
            "encoder_hidden_states": cond["prompt_embeds"],
            "pooled_projections": cond["pooled_prompt_embeds"],
            "timestep": timesteps.to(latents.dtype) / 1000,
            "img_ids": image_ids,
            "txt_ids": text_ids,
            "guidance": None,
        }

    def pipeline_kwargs(self, cond, negative):
        return dict(cond)  # schnell samples without classifier-free guidance

    def from_pipeline_latents(self, pipe, latents, resolution):
        return FluxPipeline._unpack_latents(latents, resolution, resolution, pipe.vae_scale_factor)
