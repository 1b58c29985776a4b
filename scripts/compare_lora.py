"""What does low-rank QAT (`trainable=lora`) cost in quality against full QAT? Measured on the toy teacher.

Runs `scripts/compare_schedules.py` twice with the same steps, seeds, prompts and validation draw: once
training every transformer-block weight (full QAT, the default `trainable=transformer_blocks`), once training
only a low-rank update inside each quantized layer (`trainable=lora`, rank and alpha from
conf/trainable/lora.yaml unless overridden). Then prints FID against the teacher (mean and sd over seeds) per
arm and schedule, and LoRA's gap to full QAT paired over seeds (a seed fixes data order, noise and timesteps
in both arms): per seed FID(lora) / FID(full) - 1, mean, sd and 95% t interval; the same for the held-out loss.

    python scripts/compare_lora.py                                  # 3 seeds, standard and fractional, per-tensor
    python scripts/compare_lora.py --steps 100 --images 128         # a reduced budget
    python scripts/compare_lora.py --lora-lr 1e-3                   # LoRA's own learning rate (10x is usual)
    python scripts/compare_lora.py --table-only --out docs/compare_lora   # the tables of docs/results/lora.md
    python scripts/compare_lora.py --table-only --out docs/compare_lora --lora-name lora-lr1e-3
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

from paired_seeds import paired_interval as interval


def run_arm(args, name: str, lr: float, overrides: list[str]) -> None:
    command = [sys.executable, str(Path(__file__).with_name("compare_schedules.py")), "--out", str(args.out / name),
               "--steps", str(args.steps), "--seeds", str(args.seeds), "--schedules", args.schedules,
               "--granularities", args.granularities, "--images", str(args.images), "--val-seed", str(args.val_seed),
               "--prompts", str(args.prompts), "--workers", str(args.workers), "--lr", str(lr)]
    if overrides:
        command += ["--overrides", *overrides]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def tables(out: Path, lora_name: str = "lora") -> str:
    folders = {"full": "full", "lora": lora_name}
    arms = {name: json.loads((out / folder / "per_seed.json").read_text())["runs"] for name, folder in folders.items()}
    by = {name: {(r["schedule"], r["granularity"], r["seed"]): r for r in runs} for name, runs in arms.items()}
    keys = sorted({(s, g) for runs in by.values() for s, g, _ in runs})
    lines = ["| trainable | schedule | granularity | seeds | FID vs teacher mean ± sd | held-out loss mean ± sd | "
             "validation loss mean ± sd |", "|---|---|---|---|---|---|---|"]
    for schedule, granularity in keys:
        for name in ("full", "lora"):
            rows = [r for (s, g, _), r in by[name].items() if (s, g) == (schedule, granularity)]
            if not rows:
                continue
            cells = [_mean_sd([r[k] for r in rows if k in r], digits)
                     for k, digits in (("fid", 2), ("held_out_loss", 5), ("validation_loss", 5))]
            lines.append(f"| {folders[name]} | {schedule} | {granularity} | {len(rows)} | {' | '.join(cells)} |")
    lines += ["", "LoRA against full QAT, paired over seeds: per seed value(lora) / value(full) - 1.", "",
              "| schedule | granularity | measure | pairs | gap mean | sd | 95% interval | distinguishable from 0 |",
              "|---|---|---|---|---|---|---|---|"]
    for schedule, granularity in keys:
        seeds = sorted({seed for (s, g, seed) in by["full"] if (s, g) == (schedule, granularity)}
                       & {seed for (s, g, seed) in by["lora"] if (s, g) == (schedule, granularity)})
        for measure, label in (("fid", "FID vs teacher"), ("held_out_loss", "held-out loss"),
                               ("validation_loss", "validation loss")):
            pairs = [(by["lora"][schedule, granularity, s], by["full"][schedule, granularity, s]) for s in seeds]
            gaps = [lora[measure] / full[measure] - 1 for lora, full in pairs if measure in lora and measure in full]
            if not gaps:
                continue
            mean, sd, low, high = interval(gaps)
            verdict = "no (interval holds 0)" if not low > 0 and not high < 0 else "**yes**"
            lines.append(f"| {schedule} | {granularity} | {label} | {len(gaps)} | {mean:+.1%} | {sd:.1%} | "
                         f"[{low:+.1%}, {high:+.1%}] | {verdict if len(gaps) > 1 else 'one pair: unknown'} |")
    return "\n".join(lines)


def _mean_sd(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else math.nan
    return f"{statistics.fmean(values):.{digits}f} ± {sd:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/compare_lora"))
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--schedules", default="standard,fractional")
    parser.add_argument("--granularities", default="per_tensor")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--val-seed", type=int, default=11, help="the shapes_val draw (11: the rounding table's)")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4, help="full QAT's learning rate (the schedule table's)")
    parser.add_argument("--lora-lr", type=float, default=None, help="LoRA's learning rate (default: --lr)")
    parser.add_argument("--lora", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for the LoRA arm, e.g. trainable.lora.rank=32")
    parser.add_argument("--arms", default="full,lora", help="which arms to run (the tables need both)")
    parser.add_argument("--lora-name", default="lora", help="the LoRA arm's folder in --out (e.g. lora-lr1e-3)")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    if not args.table_only:
        arms = args.arms.split(",")
        if "full" in arms:
            run_arm(args, "full", args.lr, [])
        if "lora" in arms:
            run_arm(args, args.lora_name, args.lora_lr or args.lr, ["trainable=lora", *args.lora])
    table = tables(args.out, args.lora_name)
    if not args.table_only:
        (args.out / f"table-{args.lora_name}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
