"""Does a fractional schedule give a better W4A8 student than plain QAT? Measured on the toy teacher.

With the same step budget, learning rate and seeds, distil the toy teacher along each schedule at each
granularity (and, with `--roundings`, each weight rounding) in one `fraqat-train --multirun`, then evaluate
every student with `fraqat-eval` (FID against the teacher's own images for fixed validation prompts: the
paper's protocol) and its distillation loss on held-out (noise, timestep, prompt) triples. Prints three
tables: mean and spread over seeds per rounding, schedule and granularity; each schedule's gap to
`standard` with a 95% interval paired over seeds (the seed fixes the data order, noise and timesteps, so
runs with one seed are a pair); and, with several roundings, the FID ratio between them, paired the same
way. Keeps the per-seed numbers (`per_seed.json`) and saves a plot of loss and bit-width over training.

    python scripts/compare_schedules.py                    # the full benchmark (< 1 hour on 2 cores)
    python scripts/compare_schedules.py --smoke            # seconds-long version (CI)
    python scripts/compare_schedules.py --table-from docs/rounding_per_seed.json   # tables of saved numbers
    python scripts/compare_schedules.py --roundings floor,nearest,nearest_int_range \
        --schedules standard,fractional --granularities per_tensor --seeds 5 --val-seed 11 --workers 1
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fraqat_cli.checkpointing import StudentCheckpoint
from fraqat_cli.conditioning import prompt_conditioning
from fraqat_cli.data import PromptOnlySource
from fraqat_cli.distill import DistillationModule
from fraqat_cli.eval_targets import checkpoint_target
from fraqat_cli.evaluation import load_student
from fraqat_cli.models import load_pipeline
from fraqat_cli.quant.spec import ROUNDINGS

SCHEDULES = ["fp", "standard", "simple", "integer", "fractional", "cosine"]
GRANULARITIES = ["per_tensor", "per_channel"]
CONFIDENCE = 0.95
# A rounding that emits another's codes at integer bits (tests/test_fake_quant.py checks it) has that rounding's
# `standard` (4-bit from the first step) students: a sweep need not train them twice.
SAME_AT_INTEGER_BITS = {"nearest_int_range": "nearest"}


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


def paired_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float, float, float]:
    """(mean, sd, low, high): Student-t interval for the mean of per-seed paired differences or ratios.

    With one value the spread is unknown: sd, low and high are NaN."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan, math.nan
    sd = statistics.stdev(values)
    half = stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * sd / math.sqrt(len(values))
    return mean, sd, mean - half, mean + half


def _by_seed(rows: list[dict]) -> dict[tuple, dict[int, dict]]:
    """rows keyed (rounding, schedule, granularity) -> seed -> row."""
    groups: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        groups.setdefault((r["rounding"], r["schedule"], r["granularity"]), {})[r["seed"]] = r
    return groups


def _order(key: tuple) -> tuple:
    rounding, schedule, granularity = key
    return (granularity, ROUNDINGS.index(rounding), SCHEDULES.index(schedule))


def _interval_cells(values: list[float], percent: bool) -> str:
    mean, sd, low, high = paired_interval(values)
    f = (lambda v: f"{v:+.1%}") if percent else (lambda v: f"{v:.3f}")  # noqa: E731
    if math.isnan(sd):
        return f"{f(mean)} | - | - | one seed: no interval |"
    null = 0 if percent else 1  # no gap; no ratio
    verdict = f"no (interval holds {null})" if low <= null <= high else "**yes**"
    spread = f"{sd:.1%}" if percent else f"{sd:.3f}"
    return f"{f(mean)} | {spread} | [{f(low)}, {f(high)}] | {verdict} |"


def summarize(rows: list[dict]) -> str:
    """Three markdown tables: per-group means, paired gaps to `standard`, paired ratios between roundings."""
    groups = _by_seed(rows)
    mean = lambda key, k: statistics.fmean(r[k] for r in groups[key].values())  # noqa: E731
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
    extra = [k for k in ("fid_val", "attribute_accuracy", "validation_loss") if all(k in r for r in rows)]
    names = {"fid_val": "FID vs validation images", "attribute_accuracy": "attribute accuracy",
             "validation_loss": "validation loss (training's hold-out)"}
    lines = ["| rounding | schedule | granularity | seeds | FID vs teacher mean ± sd | vs standard | "
             + "".join(f"{names[k]} | " for k in extra) + "held-out loss mean ± sd |",
             "|---|---|---|---|---|---|" + "---|" * len(extra) + "---|"]
    gaps = ["", f"Gap to `standard` (same rounding and granularity), paired over seeds: per seed "
            f"value(schedule) / value(standard) - 1, mean, sd and {CONFIDENCE:.0%} t interval.", "",
            "| rounding | schedule | granularity | measure | pairs | gap mean | sd | 95% interval | "
            "distinguishable from 0 |",
            "|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(groups, key=_order):
        rounding, schedule, granularity = key
        seeds = groups[key]
        fid = [r["fid"] for r in seeds.values()]
        loss = [r["held_out_loss"] for r in seeds.values()]
        base_key, label = (rounding, "standard", granularity), rounding
        if base_key not in groups and (SAME_AT_INTEGER_BITS.get(rounding), "standard", granularity) in groups:
            base_key = (SAME_AT_INTEGER_BITS[rounding], "standard", granularity)
            label = f"{rounding} (standard: {base_key[0]}'s runs)"
        gap = "-"
        if base_key in groups and schedule not in ("standard", "fp"):
            base = groups[base_key]
            gap = f"{(statistics.fmean(fid) - mean(base_key, 'fid')) / mean(base_key, 'fid'):+.1%}"
            measures = [("fid", "FID vs teacher"), ("held_out_loss", "held-out loss")]
            measures += [("validation_loss", "validation loss")] if "validation_loss" in extra else []
            for measure, name in measures:
                paired = [seeds[s][measure] / base[s][measure] - 1 for s in sorted(seeds.keys() & base.keys())]
                gaps.append(f"| {label} | {schedule} | {granularity} | {name} | {len(paired)} | "
                            + _interval_cells(paired, percent=True))
        cells = "".join(f"{mean(key, k):.3g} ± {sd([r[k] for r in seeds.values()]):.2g} | " for k in extra)
        lines.append(f"| {rounding} | {schedule} | {granularity} | {len(fid)} | {statistics.fmean(fid):.2f} ± "
                     f"{sd(fid):.2f} | {gap} | {cells}{statistics.fmean(loss):.5f} ± {sd(loss):.5f} |")
    if len(gaps) > 5:
        lines += gaps
    roundings = sorted({k[0] for k in groups}, key=ROUNDINGS.index)
    if len(roundings) > 1:
        lines += ["", f"FID ratio between roundings (same schedule, granularity and seed), paired over seeds: per "
                  f"seed FID(A) / FID(B), mean, sd and {CONFIDENCE:.0%} t interval.", "",
                  "| schedule | granularity | A / B | pairs | ratio mean | sd | 95% interval | "
                  "distinguishable from 1 |",
                  "|---|---|---|---|---|---|---|---|"]
        for schedule, granularity in sorted({k[1:] for k in groups}, key=lambda k: (k[1], SCHEDULES.index(k[0]))):
            for i, a in enumerate(roundings):
                for b in roundings[i + 1:]:
                    ka, kb = (a, schedule, granularity), (b, schedule, granularity)
                    if ka not in groups or kb not in groups or schedule == "fp":  # fp: FID 0 either way
                        continue
                    common = sorted(groups[ka].keys() & groups[kb].keys())
                    ratios = [groups[ka][s]["fid"] / groups[kb][s]["fid"] for s in common]
                    lines.append(f"| {schedule} | {granularity} | {a} / {b} | {len(ratios)} | "
                                 + _interval_cells(ratios, percent=False))
    return "\n".join(lines)


def plot(sweep: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_bits) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    seen, styles = set(), {}  # one colour per schedule, one line style per (granularity, rounding)
    for job in sorted(sweep.iterdir()):
        metrics = job / "metrics.json"
        logs = sorted(job.glob("csv/version_*/metrics.csv"))
        if not metrics.is_file() or not logs:
            continue
        config = OmegaConf.load(job / ".hydra" / "config.yaml")
        key = (config.schedule.name, config.quantizer.granularity, config.quantizer.rounding)
        if key in seen or config.seed != 0:
            continue
        seen.add(key)
        style = styles.setdefault(key[1:], ["-", "--", ":", "-."][len(styles) % 4])
        with logs[-1].open() as f:
            rows = [r for r in csv.DictReader(f) if r.get("train/output_loss")]
        steps = [int(r["step"]) for r in rows]
        colour = f"C{SCHEDULES.index(key[0])}"
        if key[0] != "fp":  # the fp student's loss is 0: nothing to draw on a log scale
            ax_loss.plot(steps, [float(r["train/output_loss"]) for r in rows], label=" ".join(key), lw=0.8,
                         color=colour, ls=style)
        bits = [(int(r["step"]), float(r["train/weight_bits"])) for r in rows if r.get("train/weight_bits")]
        if style == "-":  # the bit-width is the schedule's alone: draw it once per schedule
            ax_bits.step([b[0] for b in bits], [min(b[1], 9) for b in bits], where="post", label=key[0], color=colour)
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("distillation loss (seed 0)")
    ax_loss.legend(fontsize=6, ncol=2)
    ax_bits.set_ylabel("weight bits (16 and fp shown as 9)")
    ax_bits.set_xlabel("step")
    ax_bits.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def train_and_evaluate(args, bindir: Path, env: dict, sweep: Path, train: bool) -> None:
    # 1. One multirun: every schedule x granularity (x rounding) x seed, the same budget and learning rate.
    if train:
        roundings = [f"quantizer.rounding={','.join(args.roundings)}"] if args.roundings else []
        run([str(bindir / "fraqat-train"), "--multirun", "model=toy", f"schedule={','.join(args.schedules)}",
             f"quantizer={','.join(args.granularities)}", *roundings,
             f"seed={','.join(str(s) for s in range(args.seeds))}",
             f"trainer.max_steps={args.steps}", f"optim.lr={args.lr}", "logger=csv",
             f"data.num_prompts={args.prompts}",
             "trainer.enable_progress_bar=false", f"checkpoint_every_n_steps={args.steps}",
             f"hydra.sweep.dir={sweep}", *args.overrides,
             # Named by what differs, not by job number: runs of several invocations share one sweep folder,
             # and an invocation that repeats a job resumes (or keeps) it.
             "hydra.sweep.subdir=${run_name}-${quantizer.rounding}-seed${seed}"], env)
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
               f"prompts.count={args.images}", f"prompts.seed={args.val_seed}", "logger=none", "clip.model=null",
               f"results_csv={args.out.resolve()}/results-{index}.csv",
               f"hydra.run.dir={args.out.resolve()}/eval-{index}"]
    if wait:
        return run(command, env)
    print("$", " ".join(command), "&", flush=True)
    return subprocess.Popen(command, env=env)


def _names(allowed):
    """argparse type: a comma-separated list whose every name is in `allowed`."""
    def parse(text: str) -> list[str]:
        names = [n for n in text.split(",") if n]
        bad = [n for n in names if n not in allowed]
        if not names or bad:
            raise argparse.ArgumentTypeError(f"{text!r}: allowed names are {', '.join(allowed)}")
        return names
    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/compare_schedules"))
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--seeds", type=int, default=3, help="training seeds 0 .. N-1")
    parser.add_argument("--schedules", type=_names(SCHEDULES), default=SCHEDULES, help="comma-separated")
    parser.add_argument("--granularities", type=_names(GRANULARITIES + ["per_group"]), default=GRANULARITIES,
                        help="comma-separated conf/quantizer entries")
    parser.add_argument("--roundings", type=_names(ROUNDINGS), default=None,
                        help="comma-separated weight roundings (default: the quantizer config's own)")
    parser.add_argument("--images", type=int, default=256, help="validation prompts (images) per student")
    parser.add_argument("--val-seed", type=int, default=7,
                        help="seed of the shapes_val prompt draw (7: the README's schedule table)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--prompts", type=int, default=256, help="training prompts (data-free teacher latents)")
    parser.add_argument("--workers", type=int, default=2, help="parallel fraqat-eval processes (one thread each)")
    parser.add_argument("--overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more fraqat-train overrides for every job, e.g. trainable=lora (scripts/compare_lora.py)")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="evaluate and tabulate the students already trained in --out (e.g. after an interruption)")
    parser.add_argument("--summarize-only", action="store_true",
                        help="tabulate an existing --out folder (e.g. after evaluating its sweep in parallel)")
    parser.add_argument("--table-from", type=Path, default=None, metavar="PER_SEED_JSON",
                        help="only print the tables of saved per-seed numbers (e.g. docs/rounding_per_seed.json)")
    args = parser.parse_args()
    if args.table_from:
        print(summarize(json.loads(args.table_from.read_text())["runs"]))
        return
    if args.smoke:
        args.steps, args.seeds, args.images, args.prompts, args.workers = 3, 1, 4, 8, 1
        args.schedules, args.granularities = ["standard", "fractional"], ["per_tensor"]
    bindir = Path(sys.executable).parent
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"))
    sweep = args.out.resolve() / "sweep"
    cache_dir = env.get("FRAQAT_CACHE", str(Path.home() / ".cache" / "fraqat"))

    if not args.summarize_only:
        train_and_evaluate(args, bindir, env, sweep, train=not args.evaluate_only)
    # 3. Held-out distillation loss, and the tables.
    rows = []
    for result in sorted(sweep.glob("*/eval/*/results.json")):
        r = json.loads(result.read_text())
        config = StudentCheckpoint.read(r["checkpoint"]).config  # memory-mapped: no optimizer state read
        r["seed"], r["rounding"] = config["seed"], config["quantizer"]["rounding"]
        r["held_out_loss"] = held_out_loss(Path(r["checkpoint"]), cache_dir, count=32 if not args.smoke else 4)
        metrics = StudentCheckpoint.run_folder(Path(r["checkpoint"])) / "metrics.json"
        if metrics.is_file() and "validation_loss" in json.loads(metrics.read_text()):
            r["validation_loss"] = json.loads(metrics.read_text())["validation_loss"]  # the run's own hold-out
        rows.append(r)
    table = summarize(rows)
    (args.out / "table.md").write_text(table + "\n")
    keep = ("rounding", "schedule", "granularity", "seed", "fid", "fid_val", "attribute_accuracy", "held_out_loss",
            "validation_loss")
    per_seed = {"steps": args.steps, "lr": args.lr, "training_prompts": args.prompts, "images": args.images,
                "val_seed": args.val_seed,
                "runs": [{k: r[k] for k in keep if k in r} for r in sorted(rows, key=lambda r: (_order(
                    (r["rounding"], r["schedule"], r["granularity"])), r["seed"]))]}
    (args.out / "per_seed.json").write_text(json.dumps(per_seed, indent=1) + "\n")
    plot(sweep, args.out / "training.png")
    print(f"\n{args.steps} steps, lr {args.lr}, {args.seeds} seeds, FID over {args.images} images vs the teacher's "
          f"(shapes_val seed {args.val_seed})\n")
    print(table)
    print(f"\nper seed: {args.out / 'per_seed.json'}\nplot: {args.out / 'training.png'}")


if __name__ == "__main__":
    main()
