"""CLIP score (image-text agreement) with torchmetrics' `CLIPScore`, and CLIP features for CLIP-FID.

transformers 5 returns a model output from `get_image_features`/`get_text_features`
where torchmetrics 1.x expects a tensor; `PooledCLIP` bridges the two. No CLIP
weights can be fetched offline: `load_clip` then returns None and says why.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from torch import nn
from torchmetrics.multimodal.clip_score import CLIPScore
from transformers import CLIPModel, CLIPProcessor


class PooledCLIP(CLIPModel):
    """A CLIPModel whose feature getters return the projected embeddings as plain tensors."""

    def get_image_features(self, *args, **kwargs):
        out = super().get_image_features(*args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_text_features(self, *args, **kwargs):
        out = super().get_text_features(*args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output


def load_clip(name_or_path: str) -> tuple[PooledCLIP, CLIPProcessor] | tuple[None, str]:
    """(model, processor) from a hub id or local folder, or (None, reason) when the weights are not here."""
    local = Path(name_or_path).expanduser()
    source = str(local) if local.is_dir() else name_or_path
    try:
        model = PooledCLIP.from_pretrained(source).eval()
        processor = CLIPProcessor.from_pretrained(source)
    except Exception as error:
        return None, (f"no CLIP weights at {name_or_path!r} ({type(error).__name__}); CLIP score skipped. "
                      f"Download e.g. openai/clip-vit-large-patch14 where you have network and set clip.model=DIR")
    return model, processor


@torch.no_grad()
def clip_score(model: PooledCLIP, processor: CLIPProcessor, images: list, prompts: list[str],
               batch_size: int = 16) -> float:
    """Mean torchmetrics CLIPScore (100 x cosine, floored at 0) over image-prompt pairs."""

    metric = CLIPScore(model_name_or_path=lambda: (model, processor))
    for start in range(0, len(images), batch_size):
        batch = [torch.from_numpy(_as_array(im)).permute(2, 0, 1) for im in images[start:start + batch_size]]
        metric.update(batch, prompts[start:start + batch_size])
    return float(metric.compute())


class CLIPImageFeatures(nn.Module):
    """clean-fid feature extractor in CLIP's image space, for CLIP-FID: clean-fid's CLIP path (bicubic resize
    of the short side to the vision tower's size, centre crop: `resize`; then CLIP's mean/std and the projected
    image embedding), with the CLIP weights of `clip.model` instead of clean-fid's download."""

    def __init__(self, model: PooledCLIP, processor: CLIPProcessor) -> None:
        super().__init__()
        self.model = model
        self.size = model.config.vision_config.image_size
        image_processor = processor.image_processor
        self.register_buffer("mean", torch.tensor(image_processor.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_processor.image_std).view(1, 3, 1, 1), persistent=False)

    def resize(self, image):  # clean-fid's `custom_fn_resize`: an (H, W, 3) uint8 array in, the same out

        crop = T.Compose([T.Resize(self.size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(self.size)])
        return np.asarray(crop(Image.fromarray(image.astype(np.uint8)).convert("RGB"))).astype(np.uint8)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, size, size) in [0, 255]
        pixels = (images.to(self.mean.device, torch.float32) / 255.0 - self.mean) / self.std
        return self.model.get_image_features(pixel_values=pixels.to(self.model.dtype)).float()


def _as_array(image):
    return np.array(image.convert("RGB"), dtype=np.uint8)  # a writable copy
