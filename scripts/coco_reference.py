"""Reference statistics of real COCO images for `fraqat-eval reference=coco reference_stats=FILE`.

Each image is resized (shorter side) and centre-cropped to the eval resolution,
written as PNG, and passed through clean-fid's "clean" pipeline once; mu, sigma
and the features (for KID) are stored in one .npz.

    python scripts/coco_reference.py --images /data/coco/val2017 --resolution 512 --count 5000 \
        --out refs/coco_val2017_512.npz [--keep-images refs/coco_val2017_512/]
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import torch
from PIL import Image

from fraqat_cli.data.sources import load_image
from fraqat_cli.evaluate.fid_features import fid_feature_extractor
from fraqat_cli.evaluate.metrics import folder_features, save_reference_stats, stability_warning


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, type=Path, help="folder of COCO images (e.g. val2017)")
    parser.add_argument("--out", required=True, type=Path, help="where to write the .npz statistics")
    parser.add_argument("--resolution", type=int, default=512, help="the eval resolution (model.resolution)")
    parser.add_argument("--count", type=int, default=5000, help="images drawn with --seed (all if fewer)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-images", type=Path, help="also keep the cropped PNGs here (for reference_dir=)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    if not args.images.is_dir():
        parser.error(f"--images {str(args.images)!r} is not a folder of images")
    files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        parser.error(f"--images {str(args.images)!r} holds no .jpg or .png image")
    random.Random(args.seed).shuffle(files)
    files = files[: args.count]

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    extractor, name = fid_feature_extractor(device)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.keep_images or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        for i, path in enumerate(files):
            pixels = ((load_image(path, args.resolution).permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255)
            Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / f"{i:05d}.png")
        features = folder_features(folder, extractor, device, args.batch_size, verbose=True)
    save_reference_stats(args.out, features, {"images": str(args.images), "count": len(files),
                                              "resolution": args.resolution, "seed": args.seed, "extractor": name})
    print(f"wrote {args.out}: {len(features)} images, feature dim {features.shape[1]}, extractor: {name}")
    warning = stability_warning(len(features), "reference set")
    if warning:
        print(f"warning: {warning}")


if __name__ == "__main__":
    main()
