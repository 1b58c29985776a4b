"""Does a fractional schedule give a better W4A8 student than plain QAT? Measured on the toy teacher.

With the same step budget, learning rate and seeds, distil the toy teacher along each schedule at each
granularity (one `fraqat-train --multirun`), then evaluate every student with `fraqat-eval` (FID against
the teacher's own images for fixed validation prompts: the paper's protocol) and its distillation loss on
held-out (noise, timestep, prompt) triples. Prints a table (mean and spread over seeds per schedule and
granularity, relative gap to `standard`) and saves a plot of loss and bit-width over training.

    python scripts/compare_schedules.py                    # the full benchmark (< 1 hour on 2 cores)
    python scripts/compare_schedules.py --smoke            # seconds-long version (CI)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fraqat_cli.checkpointing import load_checkpoint
from fraqat_cli.conditioning import prompt_conditioning
from fraqat_cli.data import PromptOnlySource
from fraqat_cli.distill import DistillationModule
from fraqat_cli.eval_targets import checkpoint_target
from fraqat_cli.evaluation import load_student
from fraqat_cli.models import load_pipeline

SCHEDULES = ["fp", "standard", "simple", "integer", "fractional", "cosine"]
GRANULARITIES = ["per_tensor", "per_channel"]


def run(command: list[str], env: dict) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, env=env)


def held_out_loss(checkpoint: Path, cache_dir: str, count: int) -> float:
    """Student-vs-teacher MSE on fixed validation (noise, timestep, prompt) triples."""
    target = checkpoint_target(checkpoint, None, None)
    model_cfg = target.config.model
    family, noise = instantiate(model_cfg.family), instantiate(model_cfg.noise)
    source = PromptOnlySource(num_prompts=count, prompt_seed=99)  # prompts never used in training
    cond, negative = prompt_conditioning(model_cfg, source.prompts(), cache_dir)
    pipe = load_pipeline(model_cfg, without=family.text_parts)
    noise.bind(pipe.scheduler.config)
    latents = source.latents(pipe, family, model_cfg, cond, negative, cache_dir, seed=10_000)  # teacher samples
    student = load_student(target, pipe.transformer)
    module = DistillationModule(pipe.transformer, student, family, noise, trainable=["*"])
    torch.manual_seed(0)  # the same noise and timesteps for every student
    with torch.no_grad():
        return module.distillation_loss({**cond, "latents": latents})["output_loss"].item()


def summarize(rows: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["schedule"], r["granularity"]), []).append(r)
    baseline = {g: statistics.mean(r["fid"] for r in groups[("standard", g)]) for s, g in groups if s == "standard"}
    extra = [k for k in ("fid_val", "attribute_accuracy") if all(k in r for r in rows)]
    names = {"fid_val": "FID vs validation images", "attribute_accuracy": "attribute accuracy"}
    lines = ["| schedule | granularity | seeds | FID vs teacher mean ± sd | vs standard | "
             + "".join(f"{names[k]} | " for k in extra) + "held-out loss mean ± sd |",
             "|---|---|---|---|---|" + "---|" * len(extra) + "---|"]
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
    for (schedule, granularity) in sorted(groups, key=lambda k: (k[1], SCHEDULES.index(k[0]))):
        rs = groups[(schedule, granularity)]
        fid = [r["fid"] for r in rs]
        loss = [r["held_out_loss"] for r in rs]
        base = baseline.get(granularity)
        gap = f"{(statistics.mean(fid) - base) / base:+.1%}" if base and schedule not in ("standard", "fp") else "-"
        cells = "".join(f"{statistics.mean(r[k] for r in rs):.3g} ± {sd([r[k] for r in rs]):.2g} | " for k in extra)
        lines.append(f"| {schedule} | {granularity} | {len(rs)} | {statistics.mean(fid):.2f} ± {sd(fid):.2f} | {gap} | "
                     f"{cells}{statistics.mean(loss):.5f} ± {sd(loss):.5f} |")
    return "\n".join(lines)


def plot(sweep: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_bits) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    seen = set()
    for job in sorted(sweep.iterdir()):
        metrics = job / "metrics.json"
        logs = sorted(job.glob("csv/version_*/metrics.csv"))
        if not metrics.is_file() or not logs:
            continue
        config = OmegaConf.load(job / ".hydra" / "config.yaml")
        key = (config.schedule.name, config.quantizer.granularity)
        if key in seen or config.seed != 0:
            continue
        seen.add(key)
        with logs[-1].open() as f:
            rows = [r for r in csv.DictReader(f) if r.get("train/output_loss")]
        steps = [int(r["step"]) for r in rows]
        colour = f"C{SCHEDULES.index(key[0])}"  # one colour per schedule, one line style per granularity
        if key[0] != "fp":  # the fp student's loss is 0: nothing to draw on a log scale
            ax_loss.plot(steps, [float(r["train/output_loss"]) for r in rows], label=f"{key[0]} {key[1]}", lw=0.8,
                         color=colour, ls="-" if key[1] == "per_tensor" else "--")
        bits = [(int(r["step"]), float(r["train/weight_bits"])) for r in rows if r.get("train/weight_bits")]
        if key[1] == "per_tensor":
            ax_bits.step([b[0] for b in bits], [min(b[1], 9) for b in bits], where="post", label=key[0], color=colour)
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("distillation loss (seed 0; -- per_channel)")
    ax_loss.legend(fontsize=6, ncol=2)
    ax_bits.set_ylabel("weight bits (16 and fp shown as 9)")
    ax_bits.set_xlabel("step")
    ax_bits.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def train_and_evaluate(args, schedules, granularities, bindir: Path, env: dict, sweep: Path, train: bool) -> None:
    # 1. One multirun: every schedule x granularity x seed, the same budget and learning rate.
    if train:
        run([str(bindir / "fraqat-train"), "--multirun", "model=toy", f"schedule={','.join(schedules)}",
             f"quantizer={','.join(granularities)}", f"seed={','.join(str(s) for s in range(args.seeds))}",
             f"trainer.max_steps={args.steps}", f"optim.lr={args.lr}", "logger=csv",
             f"data.num_prompts={args.prompts}",
             "trainer.enable_progress_bar=false", f"checkpoint_every_n_steps={args.steps}",
             f"hydra.sweep.dir={sweep}"], env)
    # 2. FID of every student against the teacher's images for fixed validation prompts. The first student
    #    alone (it caches the teacher's images and features), then the rest split over parallel one-thread
    #    processes: Inception features dominate and two single-threaded evals beat one two-threaded one.
    jobs = sorted(str(j) for j in sweep.iterdir() if (j / "checkpoints").is_dir())
    if args.workers <= 1:
        return evaluate(args, jobs, 0, bindir, env)
    chunks = [jobs[:1]] + [jobs[1 + i::args.workers] for i in range(args.workers)]
    first, rest = chunks[0], [c for c in chunks[1:] if c]
    evaluate(args, first, 0, bindir, env)
    procs = [evaluate(args, chunk, i + 1, bindir, dict(env, OMP_NUM_THREADS="1"), wait=False)
             for i, chunk in enumerate(rest)]
    failed = [p.args for p in procs if p.wait() != 0]
    if failed:
        raise SystemExit(f"fraqat-eval failed: {failed}")


def evaluate(args, jobs: list[str], index: int, bindir: Path, env: dict, wait: bool = True):
    command = [str(bindir / "fraqat-eval"), f"ckpt=[{','.join(jobs)}]", "prompts=shapes_val",
               f"prompts.count={args.images}", "prompts.seed=7", "logger=none", "clip.model=null",
               f"results_csv={args.out.resolve()}/results-{index}.csv",
               f"hydra.run.dir={args.out.resolve()}/eval-{index}"]
    if wait:
        return run(command, env)
    print("$", " ".join(command), "&", flush=True)
    return subprocess.Popen(command, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/compare_schedules"))
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--images", type=int, default=256, help="validation prompts (images) per student")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--prompts", type=int, default=256, help="training prompts (data-free teacher latents)")
    parser.add_argument("--workers", type=int, default=2, help="parallel fraqat-eval processes (one thread each)")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="evaluate and tabulate the students already trained in --out (e.g. after an interruption)")
    parser.add_argument("--summarize-only", action="store_true",
                        help="tabulate an existing --out folder (e.g. after evaluating its sweep in parallel)")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.seeds, args.images, args.prompts, args.workers = 3, 1, 4, 8, 1
    schedules = ["standard", "fractional"] if args.smoke else SCHEDULES
    granularities = ["per_tensor"] if args.smoke else GRANULARITIES
    bindir = Path(sys.executable).parent
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"))
    sweep = args.out.resolve() / "sweep"
    cache_dir = env.get("FRAQAT_CACHE", str(Path.home() / ".cache" / "fraqat"))

    if not args.summarize_only:
        train_and_evaluate(args, schedules, granularities, bindir, env, sweep, train=not args.evaluate_only)
    # 3. Held-out distillation loss, and the table.
    rows = []
    for result in sorted(sweep.glob("*/eval/*/results.json")):
        r = json.loads(result.read_text())
        state = load_checkpoint(r["checkpoint"])
        r["seed"] = state["fraqat"]["config"]["seed"]
        r["held_out_loss"] = held_out_loss(Path(r["checkpoint"]), cache_dir, count=32 if not args.smoke else 4)
        rows.append(r)
    table = summarize(rows)
    (args.out / "table.md").write_text(table + "\n")
    plot(sweep, args.out / "training.png")
    print(f"\n{args.steps} steps, lr {args.lr}, {args.seeds} seeds, FID over {args.images} images vs the teacher's\n")
    print(table)
    print(f"\nplot: {args.out / 'training.png'}")


if __name__ == "__main__":
    main()
