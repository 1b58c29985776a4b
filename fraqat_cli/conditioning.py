"""Prompt conditioning from the model's own text encoders, computed once and cached on disk."""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from fraqat_cli.cache import cached_tensors, split_batch
from fraqat_cli.models import DENOISER_PARTS, load_pipeline, model_identity


def prompt_conditioning(model_cfg: DictConfig, prompts: list[str], cache_dir: str) -> tuple[dict, dict]:
    """(conditioning for `prompts`, conditioning for the empty negative prompt), batch first.

    On a cache miss the text encoders are loaded alone (no transformer, no VAE),
    run, and released.
    """
    family = instantiate(model_cfg.family)

    def encode() -> dict:
        pipe = load_pipeline(model_cfg, without=DENOISER_PARTS)
        with torch.no_grad():
            cond = family.encode_prompts(pipe, list(prompts), model_cfg.max_sequence_length)
            negative = family.encode_prompts(pipe, [""], model_cfg.max_sequence_length)
        return {**{f"cond/{k}": v for k, v in cond.items()}, **{f"negative/{k}": v for k, v in negative.items()}}

    parts = {"model": model_identity(model_cfg), "prompts": list(prompts)}
    tensors = cached_tensors(cache_dir, "prompts", parts, encode)
    return split_batch(tensors, "cond"), split_batch(tensors, "negative")


def select(cond: dict, index) -> dict:
    """Rows `index` of every conditioning tensor."""
    return {k: v[index] for k, v in cond.items()}
