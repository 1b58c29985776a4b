"""Does a fractional schedule give a better W4A8 student than plain QAT? Measured on small trained teachers.

With the same step budget, learning rate and seeds, distil each model's teacher (`--models`) along each schedule
at each granularity, for each choice of quantized weights (`--selections`) and, with `--roundings`, each weight
rounding, in `fraqat-train --multirun` sweeps; then evaluate every student and the teacher itself with
`fraqat-eval` (FID against the teacher's own images for fixed validation prompts: the paper's protocol) and
each student's distillation loss on held-out (noise, timestep, prompt) triples. Prints, per model, a table in
the form of the paper's Table 1 (teacher, standard QAT, FraQAT, ... per granularity, each gap to standard QAT
with a 95% interval paired over seeds), then the detail tables: means and spreads, every paired gap, and the
FID ratio between roundings or selections. Keeps the per-seed numbers (`per_seed.json`, with the time each
phase took) and saves a plot of loss and bit-width over training.

    python scripts/compare_schedules.py                    # one family's benchmark (the toy; < 2 hours on 2 cores)
    python scripts/compare_schedules.py --models toy,toy_pixart,toy_flux   # the per-family table, three families
    python scripts/compare_schedules.py --smoke            # seconds-long version (CI)
    python scripts/compare_schedules.py --table-from docs/rounding_per_seed.json   # tables of saved numbers
    python scripts/compare_schedules.py --selections transformer_blocks,all_linear,all_linear_conv \
        --schedules standard,fractional --granularities per_tensor --seeds 4 --val-seed 29 --workers 1
    python scripts/compare_schedules.py --schedules standard,fractional,searched --granularities per_tensor
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from functools import partial
from importlib.resources import files
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from paired_seeds import (
    ARM,
    GRANULARITIES,
    MODELS,
    SCHEDULES,
    SELECTIONS,
    arm,
    order,
    rank,
    summarize,
)

from fraqat_cli.data.conditioning import prompt_conditioning
from fraqat_cli.data.sources import PromptOnlySource
from fraqat_cli.evaluate.evaluator import load_student
from fraqat_cli.evaluate.targets import checkpoint_target
from fraqat_cli.models.loading import load_model
from fraqat_cli.quant.spec import ROUNDINGS
from fraqat_cli.student.checkpoint import StudentCheckpoint
from fraqat_cli.train.distill import DistillationModule
from fraqat_cli.train.optimizers import adamw

# The rows --seeds counts (plain QAT and the paper's schedule, at 4 bits and carried to 3); --other-seeds the rest.
HEADLINE = ["standard", "fractional", "standard_w3", "fractional_w3"]


def conf_names(group: str) -> list[str]:
    """Every entry of a config group (`conf/<group>/*.yaml`), schedules in display order."""
    names = [p.name.removesuffix(".yaml") for p in (files("fraqat_cli.conf") / group).iterdir()
             if p.name.endswith(".yaml") and not p.name.startswith("_")]
    return sorted(names, key=lambda n: rank(n, SCHEDULES if group == "schedule" else MODELS))


def run(command: list[str], env: dict) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, env=env)


def start(command: list[str], env: dict) -> subprocess.Popen:
    print("$", " ".join(command), "&", flush=True)
    return subprocess.Popen(command, env=env)


def split_seeds(overrides: list[str], workers: int) -> list[list[str]]:
    """One multirun's overrides as up to `workers` multiruns, the seeds dealt round-robin between them."""
    at = next(i for i, o in enumerate(overrides) if o.startswith("seed="))
    seeds = overrides[at].split("=", 1)[1].split(",")
    return [[*overrides[:at], f"seed={','.join(seeds[w::workers])}", *overrides[at + 1:]]
            for w in range(min(max(workers, 1), len(seeds)))]


def held_out_loss(checkpoint: Path, cache_dir: str, count: int) -> dict:
    """Student-vs-teacher MSE on fixed validation (noise, timestep, prompt) triples, and the size of the
    transformer (its parameter count: the denominator of the share of weights quantized)."""
    target = checkpoint_target(checkpoint, None, None)
    model = load_model(target.config.model)
    noise = instantiate(model.config.noise).bind(model.pipe.scheduler.config)
    source = PromptOnlySource(num_prompts=count, prompt_seed=99)  # prompts never used in training
    conditioning = prompt_conditioning(model.config, source.prompts(), cache_dir)
    latents = source.latents(model, conditioning, cache_dir, seed=10_000)  # the teacher's samples
    parameters = sum(p.numel() for p in model.transformer.parameters())
    student = load_student(target, model.transformer)
    module = DistillationModule(model.transformer, student, model.family, noise,
                                optimizer=partial(adamw, lr=1e-5), trainable=["*"])
    torch.manual_seed(0)  # the same noise and timesteps for every student
    with torch.no_grad():
        loss = module.distillation_loss({**conditioning.positive, "latents": latents})["output_loss"].item()
    return {"held_out_loss": loss, "transformer_params": parameters}


def student_measures(checkpoint: Path, cache_dir: str, count: int) -> dict:
    """`held_out_loss`, kept beside the run (`held_out.json`) for as long as the checkpoint is unchanged."""
    folder = StudentCheckpoint.run_folder(checkpoint)
    stamp = {"count": count, "checkpoint_mtime_ns": checkpoint.stat().st_mtime_ns}
    kept = folder / "held_out.json"
    if kept.is_file() and all(json.loads(kept.read_text()).get(k) == v for k, v in stamp.items()):
        return json.loads(kept.read_text())
    measures = {**stamp, **held_out_loss(checkpoint, cache_dir, count)}
    kept.write_text(json.dumps(measures, indent=1) + "\n")
    return measures


def plot(sweep: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_bits) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    seen, styles, colours, drawn = set(), {}, {}, set()  # a colour per schedule, a line style per the rest
    for job in sorted(sweep.iterdir()):
        metrics = job / "metrics.json"
        logs = sorted(job.glob("csv/version_*/metrics.csv"))
        if not metrics.is_file() or not logs:
            continue
        config = OmegaConf.load(job / ".hydra" / "config.yaml")
        key = (config.schedule.name, config.model.name, selection_label(config), config.quantizer.granularity,
               config.quantizer.rounding)
        if key in seen or config.seed != 0:
            continue
        seen.add(key)
        style = styles.setdefault(key[1:], ["-", "--", ":", "-."][len(styles) % 4])
        colour = colours.setdefault(key[0], f"C{len(colours) % 10}")
        with logs[-1].open() as f:
            rows = [r for r in csv.DictReader(f) if r.get("train/output_loss")]
        steps = [int(r["step"]) for r in rows]
        if key[0] != "fp":  # the fp student's loss is 0: nothing to draw on a log scale
            ax_loss.plot(steps, [float(r["train/output_loss"]) for r in rows], label=" ".join(key), lw=0.8,
                         color=colour, ls=style)
        bits = [(int(r["step"]), float(r["train/weight_bits"])) for r in rows if r.get("train/weight_bits")]
        if key[0] not in drawn:  # the bit-width is the schedule's alone: draw it once per schedule
            drawn.add(key[0])
            ax_bits.step([b[0] for b in bits], [min(b[1], 9) for b in bits], where="post", label=key[0], color=colour)
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("distillation loss (seed 0)")
    ax_loss.legend(fontsize=5, ncol=2)
    ax_bits.set_ylabel("weight bits (16 and fp shown as 9)")
    ax_bits.set_xlabel("step")
    ax_bits.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def selection_label(config) -> str:
    """The SELECTIONS name of a run's quantized weights: its selection, `_conv` when 1x1 convolutions join."""
    layers = OmegaConf.select(config, "quantizer.layers", default=None) or ["linear"]
    name = config.selection.name
    return name + ("_conv" if "pointwise_conv" in layers else "") + ("_dwconv" if "depthwise_conv" in layers else "")


def sweeps(args) -> list[list[str]]:
    """The fraqat-train multirun overrides: per model and selection, the headline schedules at --seeds seeds,
    the others at --other-seeds."""
    others = args.other_seeds if args.other_seeds is not None else args.seeds
    headline = [s for s in args.schedules if s in HEADLINE or others == args.seeds]
    rest = [s for s in args.schedules if s not in headline]
    roundings = [f"quantizer.rounding={','.join(args.roundings)}"] if args.roundings else []
    out = []
    for model in args.models:
        for selection in args.selections:
            for listed, seeds in ((headline, args.seeds), (rest, others)):
                # fp is the full-precision reference: activations in full precision too, said explicitly
                for schedules, extra in (([s for s in listed if s != "fp"], []),
                                         ([s for s in listed if s == "fp"], ["quantizer.activation_bits=null"])):
                    if schedules and seeds >= 1:
                        granularities = args.granularities
                        out.append(sweep_overrides(model, selection, schedules, seeds, granularities, roundings, extra))
    return out


def sweep_overrides(model, selection, schedules, seeds, granularities, roundings, extra) -> list[str]:
    """One multirun: these schedules x granularities (x roundings) x seeds 0 .. seeds-1 of one model and selection."""
    return [f"model={model}", *SELECTIONS[selection], f"schedule={','.join(schedules)}",
            f"quantizer={','.join(granularities)}", *roundings, *extra,
            f"seed={','.join(str(s) for s in range(seeds))}",
            # Named by what differs, not by job number: runs of several invocations share one
            # sweep folder, and an invocation that repeats a job resumes (or keeps) it.
            f"hydra.sweep.subdir=${{run_name}}-${{quantizer.rounding}}-{selection}-seed${{seed}}"]


def run_parallel(commands: list[list[str]], env: dict, what: str) -> None:
    """Run the commands side by side, one thread each, and stop the benchmark if any fails."""
    single = dict(env, OMP_NUM_THREADS="1")
    procs = [start(command, single) for command in commands]
    failed = [p.args for p in procs if p.wait() != 0]
    if failed:
        raise SystemExit(f"{what} failed: {failed}")


def train_students(args, bindir: Path, env: dict, sweep: Path, timing: dict) -> None:
    """Multiruns: every model x selection x schedule x granularity (x rounding) x seed, one budget and rate; the
    seeds of each dealt over --workers one-thread multiruns (tiny models use a second thread badly)."""
    started = time.perf_counter()
    for overrides in sweeps(args):
        common = [f"trainer.max_steps={args.steps}", f"optim.lr={args.lr}", "logger=csv",
                  f"data.num_prompts={args.prompts}", "trainer.enable_progress_bar=false",
                  f"checkpoint.every_n_steps={args.steps}", f"hydra.sweep.dir={sweep}", *args.overrides]
        commands = [[str(bindir / "fraqat-train"), "--multirun", *part, *common]
                    for part in split_seeds(overrides, args.workers)]
        if len(commands) == 1:
            run(commands[0], env)
        else:
            run_parallel(commands, env, "fraqat-train")
        timing["training_jobs"] = timing.get("training_jobs", 0) + math.prod(
            len(o.split("=", 1)[1].split(",")) for o in overrides
            if o.split("=")[0] in ("schedule", "quantizer", "seed", "quantizer.rounding"))
    timing["training_s"] = round(time.perf_counter() - started, 1)


def evaluate_students(args, bindir: Path, env: dict, sweep: Path, timing: dict) -> None:
    """FID of the teacher and of every student of --models against the teacher's images for fixed validation
    prompts. Per model, the teacher alone first (it draws and caches the reference images and features), then
    the students split over --workers one-thread processes: Inception features dominate, and two
    single-threaded evals beat one two-threaded one."""
    started = time.perf_counter()
    by_model: dict[str, list[str]] = {}
    for job in sorted(j for j in sweep.iterdir() if (j / "checkpoints").is_dir()):
        model = OmegaConf.load(job / ".hydra" / "config.yaml").model.name
        if model in args.models:  # others sharing --out keep their evaluations
            by_model.setdefault(model, []).append(str(job))
    for model, students in sorted(by_model.items()):
        teacher = f"teacher-{model}-val{args.val_seed}-{args.images}"
        if args.workers <= 1:  # one process: the teacher first, then its students
            run(eval_command(args, ["teacher", *students], teacher, bindir, model=model), env)
            continue
        run(eval_command(args, ["teacher"], teacher, bindir, model=model), env)
        chunks = [students[i::args.workers] for i in range(args.workers)]
        run_parallel([eval_command(args, chunk, str(i), bindir) for i, chunk in enumerate(chunks) if chunk], env,
                     "fraqat-eval")
    timing["evaluation_s"] = round(time.perf_counter() - started, 1)
    timing["evaluated_students"] = sum(len(students) for students in by_model.values())


def eval_command(args, ckpts: list[str], name: str, bindir: Path, model: str | None = None) -> list[str]:
    return [str(bindir / "fraqat-eval"), f"ckpt=[{','.join(ckpts)}]", "prompts=shapes_val",
            f"prompts.count={args.images}", f"prompts.seed={args.val_seed}", "logger=none", "clip.model=null",
            *([f"model={model}"] if model else []),
            f"results_csv={args.out.resolve()}/results-{name}.csv",
            f"hydra.run.dir={args.out.resolve()}/eval-{name}"]


def measured_rows(args, sweep: Path, cache_dir: str, timing: dict) -> tuple[list[dict], list[dict]]:
    """(student rows, teacher rows) of the evaluations on this invocation's prompt set (--val-seed, --images);
    each student with its held-out loss, validation loss and quantized share."""
    asked = lambda r: r["prompt_set"].get("seed") == args.val_seed and r["num_images"] == args.images  # noqa: E731
    started, rows = time.perf_counter(), []
    for result in sorted(sweep.glob("*/eval/*/results.json")):
        r = json.loads(result.read_text())
        if not asked(r):
            continue
        checkpoint = Path(r["checkpoint"])
        config = OmegaConf.create(StudentCheckpoint.read(checkpoint).config)  # memory-mapped: no optimizer state
        r.update(seed=config.seed, rounding=config.quantizer.rounding, selection=selection_label(config))
        measures = student_measures(checkpoint, cache_dir, count=32 if not args.smoke else 4)
        r["held_out_loss"] = measures["held_out_loss"]
        metrics_file = StudentCheckpoint.run_folder(checkpoint) / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        if "validation_loss" in metrics:
            r["validation_loss"] = metrics["validation_loss"]  # the run's own hold-out
        if "quantized_params" in metrics:
            r["quantized_share"] = metrics["quantized_params"] / measures["transformer_params"]
        rows.append(r)
    timing["held_out_s"] = round(time.perf_counter() - started, 1)
    teachers = [json.loads(p.read_text()) for p in sorted(args.out.glob("eval-teacher-*/*/results.json"))]
    return rows, [t for t in teachers if asked(t)]


def _names(allowed):
    """argparse type: a comma-separated list whose every name is in `allowed`."""
    def parse(text: str) -> list[str]:
        names = [n for n in text.split(",") if n]
        bad = [n for n in names if n not in allowed]
        if not names or bad:
            raise argparse.ArgumentTypeError(f"{text!r}: allowed names are {', '.join(allowed)}")
        return names
    return parse


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/compare_schedules"))
    parser.add_argument("--models", type=_names(conf_names("model")), default=["toy"],
                        help="comma-separated conf/model entries (toy, toy_pixart, toy_flux, ...): a table in the "
                        "paper's Table 1 form each")
    parser.add_argument("--selections", type=_names(list(SELECTIONS)), default=["transformer_blocks"],
                        help="comma-separated: which weights are quantized (selection= and quantizer.layers)")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--seeds", type=int, default=8, help="training seeds 0 .. N-1 of standard and fractional")
    parser.add_argument("--other-seeds", type=int, default=3,
                        help="training seeds 0 .. N-1 of the other schedules (default 3)")
    parser.add_argument("--schedules", type=_names(conf_names("schedule")),
                        default=["standard", "simple", "integer", "fractional", "cosine"],
                        help="comma-separated conf/schedule entries (fp: the teacher row measures it already)")
    parser.add_argument("--granularities", type=_names(GRANULARITIES + ["per_group"]), default=GRANULARITIES,
                        help="comma-separated conf/quantizer entries")
    parser.add_argument("--roundings", type=_names(ROUNDINGS), default=None,
                        help="comma-separated weight roundings (default: the quantizer config's own)")
    parser.add_argument("--images", type=int, default=256, help="validation prompts (images) per student")
    parser.add_argument("--val-seed", type=int, default=13,
                        help="seed of the shapes_val prompt draw (used before: 0 training captions, 7, 11, 23, 29)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--prompts", type=int, default=256, help="training prompts (data-free teacher latents)")
    parser.add_argument("--workers", type=int, default=2,
                        help="parallel fraqat-train and fraqat-eval processes (one thread each)")
    parser.add_argument("--overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more fraqat-train overrides for every job, e.g. trainable=lora (scripts/compare_lora.py)")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="evaluate and tabulate the students of --models already trained in --out (e.g. after an "
                        "interruption)")
    parser.add_argument("--summarize-only", action="store_true",
                        help="tabulate an existing --out folder (e.g. after evaluating its sweep in parallel)")
    parser.add_argument("--table-from", type=Path, default=None, metavar="PER_SEED_JSON",
                        help="only print the tables of saved per-seed numbers (e.g. docs/rounding_per_seed.json)")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.seeds, args.other_seeds, args.images, args.prompts, args.workers = 3, 1, 1, 4, 8, 1
        args.schedules, args.granularities = ["standard", "fractional"], ["per_tensor"]
    return args


def main() -> None:
    args = parse_args()
    if args.table_from:
        saved = json.loads(args.table_from.read_text())
        print(summarize(saved["runs"], saved.get("teachers", [])))
        return
    bindir = Path(sys.executable).parent
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"))
    sweep = args.out.resolve() / "sweep"
    cache_dir = env.get("FRAQAT_CACHE", str(Path.home() / ".cache" / "fraqat"))
    timing: dict = {}

    if not args.summarize_only:
        if not args.evaluate_only:
            train_students(args, bindir, env, sweep, timing)
        evaluate_students(args, bindir, env, sweep, timing)
    # 3. Held-out distillation loss, and the tables.
    rows, teachers = measured_rows(args, sweep, cache_dir, timing)
    table = summarize(rows, teachers)
    (args.out / "table.md").write_text(table + "\n")
    keep = (*ARM, "seed", "fid", "fid_val", "attribute_accuracy", "held_out_loss", "validation_loss",
            "quantized_share")
    per_seed = {"steps": args.steps, "lr": args.lr, "training_prompts": args.prompts, "images": args.images,
                "val_seed": args.val_seed, "timing": timing,
                "teachers": [{k: t[k] for k in ("model", "fid", "fid_val", "attribute_accuracy") if k in t}
                             for t in teachers],
                "runs": [{k: r[k] for k in keep if k in r} for r in sorted(rows, key=lambda r: (order(arm(r)),
                                                                                               r["seed"]))]}
    (args.out / "per_seed.json").write_text(json.dumps(per_seed, indent=1) + "\n")
    plot(sweep, args.out / "training.png")
    print(f"\n{args.steps} steps, lr {args.lr}, FID over {args.images} images vs the teacher's "
          f"(shapes_val seed {args.val_seed}); time per phase (s): {json.dumps(timing)}\n")
    print(table)
    print(f"\nper seed: {args.out / 'per_seed.json'}\nplot: {args.out / 'training.png'}")


if __name__ == "__main__":
    main()
