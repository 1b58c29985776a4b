"""The plan of every real recipe (`conf/experiment/*_w4a8.yaml`) at 1 and 8 GPUs: the table in docs/plan.md.

Runs `fraqat-plan experiment=<recipe> trainer.devices=N plan.suggest=false` for each (about 15 minutes on two
CPU cores, most of it FLUX), or only reads the plan.json files already in `--out` with `--table-only`.

    python benchmarks/plan_recipes.py --out runs/plans
    python benchmarks/plan_recipes.py --out runs/plans --table-only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

RECIPES = ["sana", "pixart_sigma", "sd35_medium", "flux_schnell"]
PAPER_GPU_HOURS = {"sana": "192", "pixart_sigma": "576", "sd35_medium": "1008", "flux_schnell": "-"}  # its MI300X


def plan(recipe: str, devices: int, out: Path, extra: list[str]) -> None:
    command = [str(Path(sys.executable).parent / "fraqat-plan"), f"experiment={recipe}_w4a8",
               f"trainer.devices={devices}", "plan.suggest=false", f"hydra.run.dir={out / f'{recipe}-{devices}'}",
               *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)


def table(out: Path, devices: list[int]) -> str:
    rows = ["| recipe | GPUs | strategy | batch per GPU x accumulation | peak per GPU | fits | checkpoint resumable / "
            "student-only | conditioning cache | GPU-hours (25 epochs) | paper's GPU-hours (MI300X) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for recipe in RECIPES:
        for n in devices:
            p = json.loads((out / f"{recipe}-{n}" / "plan.json").read_text())
            gb = lambda b: f"{b / 1e9:.1f} GB"  # noqa: E731
            rows.append(
                f"| {recipe}_w4a8 | {n} | {p['strategy']} | {p['per_device_batch']} x {p['accumulation']} "
                f"| {gb(p['peak_bytes_per_device'])} | {'yes' if p['fits'] else '**no**'} "
                f"| {gb(p['checkpoint_bytes']['resumable'])} / {gb(p['checkpoint_bytes']['student'])} "
                f"| {gb(p['cache_bytes'])} | {p['gpu_hours']:.2f} "
                f"| {PAPER_GPU_HOURS[recipe] if n == devices[-1] else ''} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/plans"))
    parser.add_argument("--devices", default="1,8", help="GPU counts, comma-separated")
    parser.add_argument("--table-only", action="store_true", help="read the plan.json files already in --out")
    parser.add_argument("overrides", nargs="*", help="more overrides for every plan, e.g. plan.gpu=a100")
    args = parser.parse_args(argv)
    devices = [int(n) for n in args.devices.split(",")]
    if not args.table_only:
        for recipe in RECIPES:
            for n in devices:
                plan(recipe, n, args.out, args.overrides)
    print(table(args.out, devices))


if __name__ == "__main__":
    main()
