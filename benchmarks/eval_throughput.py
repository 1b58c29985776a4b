"""Eval throughput on the tiny models, and our FID path against clean-fid's own `compute_fid`.

Prints images/s for generation (each tiny family) and for Inception feature
extraction, and the ratio (our FID: features of both folders + Frechet distance,
no cache) / (cleanfid.fid.compute_fid on the same folders with the same
extractor), timed in one run, alternating, median of --reps. Target <= 1.05.

    python benchmarks/eval_throughput.py [--images 32] [--reps 3] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from cleanfid import fid
from omegaconf import OmegaConf

from fraqat_cli.data.captions import offline_captions
from fraqat_cli.data.conditioning import prompt_conditioning
from fraqat_cli.evaluate.fid_features import fid_feature_extractor
from fraqat_cli.evaluate.metrics import fid_from_features, folder_features
from fraqat_cli.models.generation import generate
from fraqat_cli.models.loading import load_model

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


def generation_rate(model: str, count: int, out: Path, cache: str) -> float:
    model_cfg = OmegaConf.load(CONF / f"{model}.yaml")
    conditioning = prompt_conditioning(model_cfg, offline_captions(count, seed=3), cache)
    model = load_model(model_cfg)
    generate(model, conditioning.rows([0]), [0], batch_size=8)  # warm-up
    start = time.perf_counter()
    images = generate(model, conditioning, list(range(count)), batch_size=8)
    rate = count / (time.perf_counter() - start)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(out / f"{i:05d}.png")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    count, reps = (8, 1) if args.smoke else (args.images, args.reps)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    extractor, name = fid_feature_extractor(device, "shipped")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        print(f"device {device}, {torch.get_num_threads()} threads, {count} images per set, extractor: {name}")
        print("| stage | images/s |\n|---|---|")
        for model in ("tiny_sana", "tiny_pixart", "tiny_sd3", "tiny_flux"):
            print(
                f"| generation {model} (32 px, 4 steps) | {generation_rate(model, count, root / model, scratch):.1f} |"
            )
        a, b = root / "tiny_sana", root / "tiny_flux"
        start = time.perf_counter()
        folder_features(a, extractor, device)
        print(f"| Inception features | {count / (time.perf_counter() - start):.1f} |")

        ours, theirs = [], []
        for _ in range(reps):
            start = time.perf_counter()
            ours_fid = fid_from_features(folder_features(a, extractor, device), folder_features(b, extractor, device))
            ours.append(time.perf_counter() - start)
            start = time.perf_counter()
            theirs_fid = fid.compute_fid(
                str(a),
                str(b),
                mode="clean",
                custom_feat_extractor=extractor,
                device=device,
                num_workers=0,
                batch_size=32,
                verbose=False,
            )
            theirs.append(time.perf_counter() - start)
    ratio = statistics.median(ours) / statistics.median(theirs)
    print(f"\nFID ours {ours_fid:.4f} vs clean-fid {theirs_fid:.4f} (same folders, same extractor)")
    print(
        f"time ours / clean-fid compute_fid = {ratio:.3f}  (median of {reps}; target <= 1.05: "
        f"{'met' if ratio <= 1.05 else 'MISSED'})"
    )


if __name__ == "__main__":
    main()
