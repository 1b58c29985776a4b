"""How much do learned (LSQ) or MSE-searched weight scales close the per-tensor gap to per-channel? Measured on the
toy teachers with `scripts/compare_schedules.py`'s protocol, one arm per (quantizer.scale, granularity).

Each arm is one `compare_schedules.py` run (the same seeds, steps, prompts and validation images, `--overrides
quantizer.scale=...`); the tables pair every arm's FID with the baseline arm's (the paper's `max` scale at the
first granularity) seed by seed: gap = FID / FID(baseline) - 1, mean and 95% t interval over the seeds.

    python scripts/compare_scales.py --out runs/compare_scales --seeds 8 --steps 250      # the issue's protocol
    python scripts/compare_scales.py --table-from docs/results/quality_levers_per_seed.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from paired_seeds import paired_interval

ARMS = ["max:per_tensor", "learned:per_tensor", "mse:per_tensor", "max:per_channel"]  # the first is the baseline


def run_arm(args: argparse.Namespace, scale: str, granularity: str) -> dict:
    """Train and evaluate one arm with compare_schedules.py; its per-seed rows tagged with the scale, and its time."""
    out = args.out / f"{scale}-{granularity}"
    command = [sys.executable, str(Path(__file__).with_name("compare_schedules.py")), "--out", str(out),
               "--models", args.model, "--schedules", args.schedule, "--granularities", granularity,
               "--seeds", str(args.seeds), "--steps", str(args.steps), "--images", str(args.images),
               "--prompts", str(args.prompts), "--workers", str(args.workers),
               "--overrides", f"quantizer.scale={scale}"]
    started = time.perf_counter()
    if not (out / "per_seed.json").is_file():
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True)
    per_seed = json.loads((out / "per_seed.json").read_text())
    rows = [{**row, "scale": scale} for row in per_seed["runs"]]
    return {"rows": rows, "teachers": per_seed.get("teachers", []), "seconds": time.perf_counter() - started}


def table(rows: list[dict]) -> str:
    """Markdown: per arm the mean FID over seeds and its paired gap to the first arm's."""
    arms = list(dict.fromkeys((r["scale"], r["granularity"]) for r in rows))
    by_arm = {a: {r["seed"]: r for r in rows if (r["scale"], r["granularity"]) == a} for a in arms}
    base = by_arm[arms[0]]
    baseline = f"`{arms[0][0]}` {arms[0][1]}"
    lines = [f"| scale | granularity | seeds | FID mean (min-max) | gap to {baseline} [95% interval] |",
             "|---|---|---|---|---|"]
    for scale, granularity in arms:
        seeds = sorted(by_arm[scale, granularity])
        fids = [by_arm[scale, granularity][s]["fid"] for s in seeds]
        cells = f"{sum(fids) / len(fids):.2f} ({min(fids):.2f}-{max(fids):.2f})"
        if (scale, granularity) == arms[0]:
            gap = "-"
        else:
            paired = [by_arm[scale, granularity][s]["fid"] / base[s]["fid"] - 1 for s in seeds if s in base]
            mean, _, low, high = paired_interval(paired)
            gap = f"{mean:+.1%} [{low:+.1%}, {high:+.1%}] ({sum(g < 0 for g in paired)}/{len(paired)} seeds closer)"
        lines.append(f"| `{scale}` | {granularity} | {len(seeds)} | {cells} | {gap} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/compare_scales"))
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated scale:granularity, baseline first")
    parser.add_argument("--model", default="toy")
    parser.add_argument("--schedule", default="standard")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--table-from", type=Path, default=None, metavar="PER_SEED_JSON")
    args = parser.parse_args()
    if args.table_from is not None:
        print(table(json.loads(args.table_from.read_text())["runs"]))
        return
    arms = [tuple(a.split(":")) for a in args.arms.split(",")]
    results = {f"{s}:{g}": run_arm(args, s, g) for s, g in arms}
    per_seed = {"command": " ".join(["python", "scripts/compare_scales.py", *sys.argv[1:]]),
                "model": args.model, "schedule": args.schedule, "steps": args.steps, "images": args.images,
                "training_prompts": args.prompts, "seconds": {k: round(v["seconds"], 1) for k, v in results.items()},
                "teachers": next(iter(results.values()))["teachers"],
                "runs": [row for result in results.values() for row in result["rows"]]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "per_seed.json").write_text(json.dumps(per_seed, indent=1) + "\n")
    print(table(per_seed["runs"]))
    print(f"\nper seed: {args.out / 'per_seed.json'}")


if __name__ == "__main__":
    main()
