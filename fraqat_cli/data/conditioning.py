"""Prompt conditioning from the model's own text encoders, computed once and cached on disk.

At scale (10,000 COCO captions through T5-XXL or Gemma) encoding is batched
(`model.encode_batch_size` prompts per call and per cache shard), runs on the
accelerator when there is one, in the encoders' dtype, and writes each batch as
it goes, so an interrupted encoding resumes; training then reads rows lazily
from the store (`conditioning_store`). Small prompt sets (evaluation, export)
load it whole (`prompt_conditioning`).
"""

from __future__ import annotations

import gc
import os

import torch
from omegaconf import DictConfig

from fraqat_cli.cache import ShardedStore, sharded_tensors
from fraqat_cli.checks import positive_int
from fraqat_cli.cli import warn
from fraqat_cli.models.conditioning import Conditioning
from fraqat_cli.models.loading import DENOISER_PARTS, family_of, load_pipeline, model_identity


def encode_device(device: str | torch.device | None = None) -> torch.device:
    """`device` when given (e.g. "cpu" to keep the encoders off the GPU); else this process's GPU
    (`cuda:$LOCAL_RANK`, so DDP ranks do not all pile onto GPU 0), or the CPU without one."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def _batch_size(model_cfg: DictConfig) -> int:
    size = model_cfg.get("encode_batch_size", 64)
    positive_int("model.encode_batch_size", size)
    return size


def conditioning_store(
    model_cfg: DictConfig, prompts: list[str], cache_dir: str, device: str | torch.device | None = None
) -> ShardedStore:
    """The cached conditioning of `prompts`, a row per prompt; its `shared()` tensors are the empty
    negative prompt's conditioning (one row).

    On a miss the text encoders are loaded alone (no transformer, no VAE), moved to `encode_device(device)`,
    run `model.encode_batch_size` prompts at a time, and released; under an inter-process lock, so DDP
    ranks starting together encode once.
    """
    if not prompts:
        raise ValueError("no prompts to encode: the prompt list is empty")
    family = family_of(model_cfg)
    batch_size = _batch_size(model_cfg)
    target = encode_device(device)
    prompts = list(prompts)
    loaded = {}

    def encoders():
        if "pipe" not in loaded:
            pipe = load_pipeline(model_cfg, without=DENOISER_PARTS).to(target)
            for part in pipe.components.values():
                if isinstance(part, torch.nn.Module):
                    part.eval()  # tiny twins are built in training mode: T5's dropout would blur the conditioning
            loaded["pipe"] = pipe
            warn_long_prompts(pipe, prompts, model_cfg.max_sequence_length)
        return loaded["pipe"]

    @torch.no_grad()
    def encode(texts: list[str]) -> dict:
        cond = family.encode_prompts(encoders(), texts, model_cfg.max_sequence_length, device=target)
        return {k: v.cpu() for k, v in cond.items()}

    def release() -> None:
        loaded.clear()
        gc.collect()
        if target.type == "cuda":
            torch.cuda.empty_cache()

    parts = {"model": model_identity(model_cfg), "prompts": prompts}
    return sharded_tensors(
        cache_dir, "prompts", parts, rows=len(prompts), shard_rows=batch_size,
        compute_rows=lambda start, stop: encode(prompts[start:stop]),
        compute_shared=lambda: encode([""]),
        finish=release, description=f"encoding prompts ({model_cfg.name}, {target})",
    )


def warn_long_prompts(pipe, prompts: list[str], max_sequence_length: int) -> int:
    """Say how many prompts are longer than a text encoder takes (the pipelines truncate them, and say so only
    in a log the console silences): each tokenizer's limit is `max_sequence_length` or its own, if lower;
    the CLIP encoders of SD3 and FLUX take their own 77 whatever `max_sequence_length` is. Returns that count."""

    too_long, limits = set(), []
    for name, tokenizer in pipe.components.items():
        if not name.startswith("tokenizer") or tokenizer is None:
            continue
        limit = tokenizer.model_max_length if _clip_role(pipe, name) else min(max_sequence_length,
                                                                               tokenizer.model_max_length)
        lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=True, verbose=False)["input_ids"]]
        over = {i for i, length in enumerate(lengths) if length > limit}
        too_long |= over
        limits.append(f"{limit} for {name}")
    if too_long:
        first = prompts[min(too_long)]
        warn(f"{len(too_long)} of {len(prompts)} prompts are longer than the text encoder takes (tokens: "
             f"{', '.join(limits)}) and are truncated to it, e.g. {first[:60] + '...' if len(first) > 60 else first!r}")
    return len(too_long)


def _clip_role(pipe, name: str) -> bool:
    """Whether `name` is a CLIP tokenizer beside a T5 one (SD3, FLUX): their pipelines cut it at its own
    `model_max_length` (`tokenizer_max_length`), not at `max_sequence_length`, which is T5's."""
    others = [k for k in pipe.components if k.startswith("tokenizer") and k != name]
    return "CLIP" in type(pipe.components[name]).__name__ and bool(others)


def prompt_conditioning(
    model_cfg: DictConfig, prompts: list[str], cache_dir: str, device: str | torch.device | None = None
) -> Conditioning:
    """The conditioning of `prompts` and of the empty negative prompt, in memory: for the few dozen prompts
    of an evaluation or an export example."""
    store = conditioning_store(model_cfg, prompts, cache_dir, device)
    return Conditioning(store.load(), store.shared())
