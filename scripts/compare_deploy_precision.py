"""What deploying a W4A8 student as a weight-only format (GGUF, the torchao folder) costs in FID, on the toy
benchmark's protocol (`scripts/compare_schedules.py`, `docs/results/families.md`). Two questions (issue 23):

1. fp16 scales: do students trained with `quantizer.scale_dtype=float16` (scales on the fp16 grid, so a GGUF
   file holds exactly their weights) lose FID against `float32`? Each arm is a compare_schedules invocation
   identical to the other but for that override, so seed s of one pairs with seed s of the other.
2. The lost activation quantizer: the weight-only formats keep the 4-bit weights and run activations in 16-bit
   float. Each float32 student is evaluated as trained (W4A8) and from a student-only copy of its checkpoint whose
   stored `quantizer.activation_bits` is null (W4A16: the same weights, the input quantizers pass-through); the
   copy is checked to rebuild the same quantized weights and no active activation quantizer before it is used.

Each arm is one `compare_schedules.py` invocation in its own folder under --out (the W4A16 one with
`--evaluate-only` over the copies); an arm whose `per_seed.json` already holds the asked runs is not run again,
so an interrupted study resumes, and a finished one keeps the wall time its arms took. The per-seed FIDs, the
paired gaps (FID(b) / FID(a) - 1 per seed, mean and 95% t interval) and the wall times go to --json.

    python scripts/compare_deploy_precision.py               # the protocol's full size: 8 seeds x 2 granularities
    python scripts/compare_deploy_precision.py --seeds 4 --granularities per_channel --images 64 \
        --json docs/deploy_precision_per_seed.json           # what docs/results/deploy-precision.md ran
    python scripts/compare_deploy_precision.py --smoke       # one seed, 3 steps, 4 images (CI)
    python scripts/compare_deploy_precision.py --table-from docs/deploy_precision_per_seed.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from paired_seeds import GRANULARITIES, paired_interval

from fraqat_cli.models.loading import load_model
from fraqat_cli.quant.linear import ActivationQuantizer
from fraqat_cli.quant.spec import PASS_THROUGH_BITS
from fraqat_cli.student.checkpoint import StudentCheckpoint
from fraqat_cli.student.rebuild import rebuild_student

SCHEDULES = Path(__file__).resolve().parent / "compare_schedules.py"
ACTIVATION_BITS_KEY = "input_quantizer.bits"  # each quantized layer's activation bit-width buffer
# (arm, baseline arm, what the gap measures): the two questions.
GAPS = [("scale-float16", "scale-float32", "fp16 scales vs float32 scales (both W4A8)"),
        ("float32-a16", "scale-float32", "activations in full precision (W4A16) vs as trained (W4A8)")]


def weight_only_copy(checkpoint: Path, out: Path) -> Path:
    """Write `out`: the student of `checkpoint` with its activation quantizers off (config `activation_bits`
    null, every stored activation bit-width the pass-through value); its weights, scales and step unchanged."""
    stored = StudentCheckpoint.read(checkpoint)
    config = OmegaConf.create(OmegaConf.to_container(stored.config, resolve=True))
    config.quantizer.activation_bits = None
    state = {k: torch.full_like(v, PASS_THROUGH_BITS) if k.endswith(ACTIVATION_BITS_KEY) else v
             for k, v in stored.state.items()}
    StudentCheckpoint(config=config, state=state, step=stored.step, schedule=stored.schedule).write(out)
    return out


def check_weight_only(original: Path, copy: Path, skeleton: torch.nn.Module) -> None:
    """Raise unless the copy rebuilds (as fraqat-eval does, `bake=True`) with every activation quantizer a
    pass-through and every other tensor, the baked 4-bit weights included, bit-equal to the original's (the
    unused static activation ranges are NaN in both: NaN equals NaN here)."""
    trained = rebuild_student(StudentCheckpoint.read(original), skeleton, dtype=torch.float32, bake=True)
    deployed = rebuild_student(StudentCheckpoint.read(copy), skeleton, dtype=torch.float32, bake=True)
    quantizers = [m for m in deployed.modules() if isinstance(m, ActivationQuantizer)]
    if not quantizers or any(q.current_bits != PASS_THROUGH_BITS for q in quantizers):
        raise SystemExit(f"{copy}: an activation quantizer is still active")
    x = torch.randn(64)
    if not torch.equal(quantizers[0](x), x):
        raise SystemExit(f"{copy}: a pass-through activation quantizer changed its input")
    ours, theirs = deployed.state_dict(), trained.state_dict()
    same = lambda a, b: a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)  # noqa: E731
    changed = [k for k in theirs if not k.endswith(ACTIVATION_BITS_KEY) and not same(ours[k], theirs[k])]
    if changed or ours.keys() != theirs.keys():
        raise SystemExit(f"{copy}: tensors differ from {original}: {changed[:3]}")


def weight_only_sweep(trained: Path, out: Path, args) -> int:
    """Mirror the asked jobs (--seeds, --granularities) of the sweep folder `trained` into `out`, each as its
    weight-only copy with its Hydra config (activation bits null) and metrics beside it, as compare_schedules
    --evaluate-only reads them. Returns the job count."""
    jobs = []
    for job in sorted(j for j in trained.iterdir() if (j / "checkpoints" / "last.ckpt").is_file()):
        config = OmegaConf.load(job / ".hydra" / "config.yaml")
        if config.seed < args.seeds and config.quantizer.granularity in args.granularities:
            jobs.append((job, config))
    skeleton = None
    for job, config in jobs:
        target = out / job.name
        copy = target / "checkpoints" / "last.ckpt"
        if copy.is_file() and copy.stat().st_mtime_ns > (job / "checkpoints" / "last.ckpt").stat().st_mtime_ns:
            continue  # made from this checkpoint already
        skeleton = skeleton or load_model(config.model).transformer
        (target / ".hydra").mkdir(parents=True, exist_ok=True)
        config.quantizer.activation_bits = None
        OmegaConf.save(config, target / ".hydra" / "config.yaml")
        if (job / "metrics.json").is_file():
            shutil.copyfile(job / "metrics.json", target / "metrics.json")
        weight_only_copy(job / "checkpoints" / "last.ckpt", copy)
        check_weight_only(job / "checkpoints" / "last.ckpt", copy, skeleton)
    return len(jobs)


def arm_done(folder: Path, args) -> bool:
    """The arm's per_seed.json holds a run for every asked seed and granularity, under the asked protocol."""
    saved = folder / "per_seed.json"
    if not saved.is_file():
        return False
    data = json.loads(saved.read_text())
    asked = {"steps": args.steps, "images": args.images, "training_prompts": args.prompts, "val_seed": args.val_seed}
    have = {(r["granularity"], r["seed"]) for r in data["runs"]}
    return all(data.get(k) == v for k, v in asked.items()) and have >= {
        (g, s) for g in args.granularities for s in range(args.seeds)}


def run_arm(name: str, extra: list[str], args, env: dict) -> dict:
    """One compare_schedules invocation into --out/<name> (skipped when done); its wall time and its runs."""
    folder = args.out / name
    walls = json.loads((args.out / "wall_s.json").read_text()) if (args.out / "wall_s.json").is_file() else {}
    if not arm_done(folder, args):
        command = [sys.executable, str(SCHEDULES), "--out", str(folder), "--models", args.model,
                   "--schedules", "fractional", "--granularities", ",".join(args.granularities),
                   "--seeds", str(args.seeds), "--steps", str(args.steps), "--images", str(args.images),
                   "--prompts", str(args.prompts), "--val-seed", str(args.val_seed),
                   "--workers", str(args.workers), *extra]
        print("$", " ".join(command), flush=True)
        started = time.perf_counter()
        subprocess.run(command, check=True, env=env)
        walls[name] = round(time.perf_counter() - started, 1)
        (args.out / "wall_s.json").write_text(json.dumps(walls, indent=1) + "\n")
    saved = json.loads((folder / "per_seed.json").read_text())
    return {"wall_s": walls.get(name), "phases_s": saved["timing"], "runs": saved["runs"]}


def gap_rows(arms: dict) -> list[dict]:
    """Per question and granularity: the per-seed FID ratios b/a - 1 and their paired mean and 95% interval."""
    fid = {name: {(r["granularity"], r["seed"]): r["fid"] for r in arm["runs"]} for name, arm in arms.items()}
    rows = []
    for arm, base, what in GAPS:
        for granularity in [g for g in GRANULARITIES if any(k[0] == g for k in fid[base])]:
            seeds = sorted(s for g, s in fid[base] if g == granularity and (g, s) in fid[arm])
            gaps = [fid[arm][(granularity, s)] / fid[base][(granularity, s)] - 1 for s in seeds]
            mean, sd, low, high = paired_interval(gaps)
            rows.append({"question": what, "arm": arm, "baseline": base, "granularity": granularity,
                         "seeds": len(seeds), "fid_baseline": [fid[base][(granularity, s)] for s in seeds],
                         "fid_arm": [fid[arm][(granularity, s)] for s in seeds], "gaps": gaps,
                         "mean_gap": mean, "sd": sd, "low": low, "high": high,
                         "closer": sum(g < 0 for g in gaps)})
    return rows


def reading(row: dict) -> str:
    """A plain-words verdict that claims no gap the interval does not support."""
    if row["seeds"] < 2 or row["low"] != row["low"]:
        return "one seed: no interval"
    if row["low"] <= 0 <= row["high"]:
        return "no difference measurable at this n"
    return "higher FID (worse)" if row["low"] > 0 else "lower FID (better)"


def table(saved: dict) -> str:
    lines = ["| question | granularity | seeds | FID baseline mean | FID arm mean | paired gap | 95% interval | "
             "seeds lower | reading |", "|---|---|---|---|---|---|---|---|---|"]
    for r in saved["gaps"]:
        mean = lambda v: sum(v) / len(v)  # noqa: E731
        interval = "-" if r["low"] != r["low"] else f"[{r['low']:+.1%}, {r['high']:+.1%}]"
        lines.append(f"| {r['question']} | {r['granularity']} | {r['seeds']} | {mean(r['fid_baseline']):.2f} | "
                     f"{mean(r['fid_arm']):.2f} | {r['mean_gap']:+.1%} | {interval} | {r['closer']}/{r['seeds']} | "
                     f"{reading(r)} |")
    walls = ", ".join(f"{name} {arm['wall_s']} s" for name, arm in saved["arms"].items())
    return "\n".join(lines) + f"\n\nwall time per invocation: {walls}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/compare_deploy_precision"))
    parser.add_argument("--json", type=Path, default=None, help="where the per-seed numbers go (default: --out)")
    parser.add_argument("--model", default="toy", help="conf/model entry (default toy: the Sana-class teacher)")
    parser.add_argument("--granularities", default="per_channel,per_tensor")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--val-seed", type=int, default=13)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--table-from", type=Path, default=None, metavar="PER_SEED_JSON")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.seeds, args.images, args.prompts, args.workers = 3, 1, 4, 8, 1
        args.granularities = "per_tensor"
    args.granularities = args.granularities.split(",")
    bad = [g for g in args.granularities if g not in GRANULARITIES]
    if bad:
        parser.error(f"--granularities {','.join(bad)}: allowed are {', '.join(GRANULARITIES)}")
    args.json = args.json or args.out / "deploy_precision_per_seed.json"
    return args


def main() -> None:
    args = parse_args()
    if args.table_from:
        print(table(json.loads(args.table_from.read_text())))
        return
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"))
    args.out.mkdir(parents=True, exist_ok=True)
    arms = {"scale-float32": run_arm("scale-float32", ["--overrides", "quantizer.scale_dtype=float32"], args, env)}
    jobs = weight_only_sweep(args.out / "scale-float32" / "sweep", args.out / "float32-a16" / "sweep", args)
    print(f"{jobs} weight-only copies checked: same baked weights, activation quantizers pass-through", flush=True)
    arms["float32-a16"] = run_arm("float32-a16", ["--evaluate-only"], args, env)
    arms["scale-float16"] = run_arm("scale-float16", ["--overrides", "quantizer.scale_dtype=float16"], args, env)
    saved = {"command": " ".join(["python scripts/compare_deploy_precision.py", *sys.argv[1:]]),
             "model": args.model, "schedule": "fractional", "bits": "W4A8", "steps": args.steps,
             "training_prompts": args.prompts, "images": args.images, "val_seed": args.val_seed,
             "gaps": gap_rows(arms), "arms": arms}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(saved, indent=1) + "\n")
    print(table(saved))
    print(f"\nper seed: {args.json}")


if __name__ == "__main__":
    main()
