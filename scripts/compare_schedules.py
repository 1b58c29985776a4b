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
import statistics
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fraqat_cli.data.conditioning import prompt_conditioning
from fraqat_cli.data.sources import PromptOnlySource
from fraqat_cli.evaluate.evaluator import load_student
from fraqat_cli.evaluate.targets import checkpoint_target
from fraqat_cli.models.loading import load_model
from fraqat_cli.quant.spec import ROUNDINGS
from fraqat_cli.train.checkpointing import StudentCheckpoint
from fraqat_cli.train.distill import DistillationModule

# Display order; any other conf/schedule entry sorts after these, by name.
SCHEDULES = ["fp", "standard", "simple", "integer", "fractional", "cosine", "linear", "searched"]
HEADLINE = ["standard", "fractional"]  # the rows --seeds counts; --other-seeds counts the rest
METHOD_NAMES = {"standard": "standard QAT", "fractional": "FraQAT"}
MODELS = ["toy", "toy_pixart", "toy_flux"]
GRANULARITIES = ["per_tensor", "per_channel"]
# Which weights are quantized: `selection=` (which layers, by name) and `quantizer.layers` (which kinds) together.
SELECTIONS = {
    "transformer_blocks": ["selection=transformer_blocks"],  # the default: linear layers inside the blocks
    "all_linear": ["selection=all_linear"],  # the paper's: every linear layer
    "all_linear_conv": ["selection=all_linear", "quantizer.layers=[linear,pointwise_conv]"],  # + the 1x1 convs
    "transformer_blocks_conv": ["selection=transformer_blocks", "quantizer.layers=[linear,pointwise_conv]"],
}
ARM = ("model", "selection", "rounding", "schedule", "granularity")  # what a row's seeds are grouped by
LEGACY = {"model": "toy", "selection": "transformer_blocks"}  # rows saved before these were varied
CONFIDENCE = 0.95
# A rounding that emits another's codes at integer bits (tests/test_fake_quant.py checks it) has that rounding's
# `standard` (4-bit from the first step) students: a sweep need not train them twice.
SAME_AT_INTEGER_BITS = {"nearest_int_range": "nearest"}
EXTRA = {"validation_loss": "validation loss (training's hold-out)", "fid_val": "FID vs validation images",
         "attribute_accuracy": "attribute accuracy"}


def conf_names(group: str) -> list[str]:
    """Every entry of a config group (`conf/<group>/*.yaml`), schedules in display order."""
    names = [p.name.removesuffix(".yaml") for p in (files("fraqat_cli.conf") / group).iterdir()
             if p.name.endswith(".yaml") and not p.name.startswith("_")]
    return sorted(names, key=lambda n: _rank(n, SCHEDULES if group == "schedule" else MODELS))


def _rank(value: str, order: list[str]) -> tuple:
    return (order.index(value), "") if value in order else (len(order), value)


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
    module = DistillationModule(model.transformer, student, model.family, noise, trainable=["*"])
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


def arm(row: dict) -> tuple:
    return tuple(row.get(k, LEGACY.get(k)) for k in ARM)


def _by_seed(rows: list[dict]) -> dict[tuple, dict[int, dict]]:
    """rows keyed by ARM (model, selection, rounding, schedule, granularity) -> seed -> row."""
    groups: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        groups.setdefault(arm(r), {})[r["seed"]] = r
    return groups


def _order(key: tuple) -> tuple:
    model, selection, rounding, schedule, granularity = key
    return (_rank(model, MODELS), _rank(selection, list(SELECTIONS)), _rank(granularity, GRANULARITIES),
            _rank(rounding, list(ROUNDINGS)), _rank(schedule, SCHEDULES))


def _baseline(groups: dict, key: tuple) -> tuple | None:
    """The `standard` arm a key's gap is measured against: same model, selection, rounding and granularity (a
    rounding equal to another at integer bits borrows that one's runs)."""
    model, selection, rounding, schedule, granularity = key
    for candidate in (rounding, SAME_AT_INTEGER_BITS.get(rounding)):
        base = (model, selection, candidate, "standard", granularity)
        if candidate and base in groups and schedule not in ("standard", "fp"):
            return base
    return None


def _interval_cells(values: list[float], percent: bool) -> str:
    mean, sd, low, high = paired_interval(values)
    f = (lambda v: f"{v:+.1%}") if percent else (lambda v: f"{v:.3f}")  # noqa: E731
    if math.isnan(sd):
        return f"{f(mean)} | - | - | one seed: no interval |"
    null = 0 if percent else 1  # no gap; no ratio
    verdict = f"no (interval holds {null})" if low <= null <= high else "**yes**"
    spread = f"{sd:.1%}" if percent else f"{sd:.3f}"
    return f"{f(mean)} | {spread} | [{f(low)}, {f(high)}] | {verdict} |"


def _paired_gaps(groups: dict, key: tuple, base: tuple, measure: str) -> list[float]:
    seeds, baseline = groups[key], groups[base]
    return [seeds[s][measure] / baseline[s][measure] - 1 for s in sorted(seeds.keys() & baseline.keys())]


def _spread(values: list[float], digits: str) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):{digits}} ± {sd:{digits}}"


def family_table(model: str, rows: list[dict], teacher: dict | None) -> str:
    """One model's rows in the form of the paper's Table 1: the teacher, then every schedule per granularity
    (and selection, rounding where they vary), FID vs teacher with its paired gap to standard QAT."""
    groups = _by_seed(rows)
    varying = [f for f in ("selection", "rounding") if len({r.get(f, LEGACY.get(f)) for r in rows}) > 1]
    extra = [k for k in EXTRA if all(k in r for r in rows)]
    share = all("quantized_share" in r for r in rows)
    head = ["model", *varying, "granularity", "method", "seeds", "FID vs teacher mean ± sd",
            "gap to standard QAT (paired)", f"{CONFIDENCE:.0%} interval", "distinguishable from 0",
            "held-out loss mean ± sd", *(EXTRA[k] for k in extra)] + (["weights quantized"] if share else [])
    table = [head]
    if teacher is not None:
        reference = {k: f"{teacher[k]:.3g}" for k in ("fid_val", "attribute_accuracy") if k in teacher}
        table.append([model, *["-"] * len(varying), "-", "teacher (full precision)", "-", "0 (reference)", "-", "-",
                      "-", "0", *(reference.get(k, "-") for k in extra)] + (["-"] if share else []))
    for key in sorted(groups, key=_order):
        seeds = groups[key]
        base, gap = _baseline(groups, key), ["-", "-", "-"]
        if base is not None:
            mean, sd, low, high = paired_interval(_paired_gaps(groups, key, base, "fid"))
            gap = [f"{mean:+.1%}", "one seed: no interval", "-"] if math.isnan(sd) else [
                f"{mean:+.1%}", f"[{low:+.1%}, {high:+.1%}]", "no" if low <= 0 <= high else "**yes**"]
        column = lambda k, seeds=seeds: [r[k] for r in seeds.values()]  # noqa: E731
        table.append([model, *(key[ARM.index(f)] for f in varying), key[4], METHOD_NAMES.get(key[3], key[3]),
                      str(len(seeds)), _spread(column("fid"), ".2f"), *gap, _spread(column("held_out_loss"), ".5f"),
                      *(_spread(column(k), ".3g") for k in extra)]
                     + ([f"{statistics.fmean(column('quantized_share')):.1%}"] if share else []))
    lines = ["| " + " | ".join(row) + " |" for row in table]
    lines.insert(1, "|" + "---|" * len(head))
    return "\n".join(lines)


def _ratio_table(groups: dict, field: str) -> list[str]:
    """FID(A) / FID(B) per seed between the values of `field` (rounding or selection), all else equal."""
    i = ARM.index(field)
    values = sorted({k[i] for k in groups}, key=lambda v: _rank(v, list(ROUNDINGS) + list(SELECTIONS)))
    if len(values) < 2:
        return []
    # schedule and granularity always; model, selection or rounding when they vary
    varies = lambda f: len({k[ARM.index(f)] for k in groups}) > 1  # noqa: E731
    shown = [f for f in ARM if f != field and (f in ("schedule", "granularity") or varies(f))]
    lines = ["", f"FID ratio between {field}s (same {', '.join(shown)} and seed), paired over seeds: per seed "
             f"FID(A) / FID(B), mean, sd and {CONFIDENCE:.0%} t interval.", "",
             f"| {' | '.join(shown)} | A / B | pairs | ratio mean | sd | 95% interval | "
             "distinguishable from 1 |", "|" + "---|" * (len(shown) + 6)]
    rest = sorted({k[:i] + k[i + 1:] for k in groups}, key=lambda r: _order(r[:i] + (values[0],) + r[i:]))
    for others in rest:
        for j, a in enumerate(values):
            for b in values[j + 1:]:
                ka, kb = others[:i] + (a,) + others[i:], others[:i] + (b,) + others[i:]
                if ka not in groups or kb not in groups or ka[3] == "fp":  # fp: FID 0 either way
                    continue
                common = sorted(groups[ka].keys() & groups[kb].keys())
                ratios = [groups[ka][s]["fid"] / groups[kb][s]["fid"] for s in common]
                cells = [ka[ARM.index(f)] for f in shown]
                lines.append(f"| {' | '.join(cells)} | {a} / {b} | {len(ratios)} | "
                             + _interval_cells(ratios, percent=False))
    return lines


def detail_tables(rows: list[dict]) -> str:
    """Per-group means, paired gaps to `standard` and the FID ratios between roundings, for one model and
    selection (the tables of the rounding benchmark)."""
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
        _, _, rounding, schedule, granularity = key
        seeds = groups[key]
        fid = [r["fid"] for r in seeds.values()]
        loss = [r["held_out_loss"] for r in seeds.values()]
        base, gap = _baseline(groups, key), "-"
        if base is not None:
            label = rounding if base[2] == rounding else f"{rounding} (standard: {base[2]}'s runs)"
            gap = f"{(statistics.fmean(fid) - mean(base, 'fid')) / mean(base, 'fid'):+.1%}"
            measures = [("fid", "FID vs teacher"), ("held_out_loss", "held-out loss")]
            measures += [("validation_loss", "validation loss")] if "validation_loss" in extra else []
            for measure, name in measures:
                paired = _paired_gaps(groups, key, base, measure)
                gaps.append(f"| {label} | {schedule} | {granularity} | {name} | {len(paired)} | "
                            + _interval_cells(paired, percent=True))
        cells = "".join(f"{mean(key, k):.3g} ± {sd([r[k] for r in seeds.values()]):.2g} | " for k in extra)
        lines.append(f"| {rounding} | {schedule} | {granularity} | {len(fid)} | {statistics.fmean(fid):.2f} ± "
                     f"{sd(fid):.2f} | {gap} | {cells}{statistics.fmean(loss):.5f} ± {sd(loss):.5f} |")
    if len(gaps) > 5:
        lines += gaps
    lines += _ratio_table(groups, "rounding")
    return "\n".join(lines)


def summarize(rows: list[dict], teachers: list[dict] = ()) -> str:
    """Every table: per model the Table-1 form, then per model and selection the detail tables, then the FID
    ratios between selections. One model and one selection: the detail tables alone carry no heading."""
    models = sorted({arm(r)[0] for r in rows}, key=lambda m: _rank(m, MODELS))
    sections = sorted({arm(r)[:2] for r in rows}, key=lambda s: (_rank(s[0], MODELS), _rank(s[1], list(SELECTIONS))))
    parts = []
    for model in models:
        teacher = next((t for t in teachers if t["model"] == model), None)
        parts += [f"Model `{model}`: the paper's Table 1 form (FID against the teacher's own images; gap: per seed "
                  f"FID / FID(standard QAT) - 1, {CONFIDENCE:.0%} t interval over the seed pairs).", "",
                  family_table(model, [r for r in rows if arm(r)[0] == model], teacher), ""]
    for model, selection in sections:
        if len(sections) > 1:
            parts += [f"Details, model `{model}`, selection `{selection}`:", ""]
        parts += [detail_tables([r for r in rows if arm(r)[:2] == (model, selection)]), ""]
    for model in models:
        parts += _ratio_table(_by_seed([r for r in rows if arm(r)[0] == model]), "selection")
    return "\n".join(parts).rstrip()


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
    name = OmegaConf.select(config, "selection.name", default=LEGACY["selection"])
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


def train_and_evaluate(args, bindir: Path, env: dict, sweep: Path, train: bool, timing: dict) -> None:
    # 1. Multiruns: every model x selection x schedule x granularity (x rounding) x seed, one budget and rate.
    started = time.perf_counter()
    if train:
        for overrides in sweeps(args):
            common = [f"trainer.max_steps={args.steps}", f"optim.lr={args.lr}", "logger=csv",
                      f"data.num_prompts={args.prompts}", "trainer.enable_progress_bar=false",
                      f"checkpoint_every_n_steps={args.steps}", f"hydra.sweep.dir={sweep}", *args.overrides]
            parts = split_seeds(overrides, args.workers)
            if len(parts) == 1:
                run([str(bindir / "fraqat-train"), "--multirun", *parts[0], *common], env)
            else:  # the seeds split over parallel one-thread multiruns: tiny models use one core badly
                single = dict(env, OMP_NUM_THREADS="1")
                procs = [start([str(bindir / "fraqat-train"), "--multirun", *part, *common], single) for part in parts]
                failed = [p.args for p in procs if p.wait() != 0]
                if failed:
                    raise SystemExit(f"fraqat-train failed: {failed}")
            timing["training_jobs"] = timing.get("training_jobs", 0) + math.prod(
                len(o.split("=", 1)[1].split(",")) for o in overrides
                if o.split("=")[0] in ("schedule", "quantizer", "seed", "quantizer.rounding"))
        timing["training_s"] = round(time.perf_counter() - started, 1)
    # 2. FID of the teacher and of every student against the teacher's images for fixed validation prompts.
    #    Per model, the teacher alone first (it draws and caches the reference images and features), then the
    #    students split over parallel one-thread processes: Inception features dominate, and two
    #    single-threaded evals beat one two-threaded one.
    started = time.perf_counter()
    jobs = sorted(j for j in sweep.iterdir() if (j / "checkpoints").is_dir())
    by_model: dict[str, list[str]] = {}
    for job in jobs:  # this invocation's models only: others sharing --out keep their evaluations
        model = OmegaConf.load(job / ".hydra" / "config.yaml").model.name
        if model in args.models:
            by_model.setdefault(model, []).append(str(job))
    for model, students in sorted(by_model.items()):
        teacher = f"teacher-{model}-val{args.val_seed}-{args.images}"
        if args.workers <= 1:  # one process: the teacher first, then its students
            evaluate(args, ["teacher", *students], teacher, bindir, env, model=model)
            continue
        evaluate(args, ["teacher"], teacher, bindir, env, model=model)
        chunks = [students[i::args.workers] for i in range(args.workers)]
        single = dict(env, OMP_NUM_THREADS="1")
        procs = [evaluate(args, chunk, str(i), bindir, single, wait=False) for i, chunk in enumerate(chunks) if chunk]
        failed = [p.args for p in procs if p.wait() != 0]
        if failed:
            raise SystemExit(f"fraqat-eval failed: {failed}")
    timing["evaluation_s"] = round(time.perf_counter() - started, 1)
    timing["evaluated_students"] = sum(len(students) for students in by_model.values())


def evaluate(args, ckpts: list[str], name: str, bindir: Path, env: dict, wait: bool = True, model: str = None):
    command = [str(bindir / "fraqat-eval"), f"ckpt=[{','.join(ckpts)}]", "prompts=shapes_val",
               f"prompts.count={args.images}", f"prompts.seed={args.val_seed}", "logger=none", "clip.model=null",
               *([f"model={model}"] if model else []),
               f"results_csv={args.out.resolve()}/results-{name}.csv",
               f"hydra.run.dir={args.out.resolve()}/eval-{name}"]
    return run(command, env) if wait else start(command, env)


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
        train_and_evaluate(args, bindir, env, sweep, train=not args.evaluate_only, timing=timing)
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
                "runs": [{k: r[k] for k in keep if k in r} for r in sorted(rows, key=lambda r: (_order(arm(r)),
                                                                                               r["seed"]))]}
    (args.out / "per_seed.json").write_text(json.dumps(per_seed, indent=1) + "\n")
    plot(sweep, args.out / "training.png")
    print(f"\n{args.steps} steps, lr {args.lr}, FID over {args.images} images vs the teacher's "
          f"(shapes_val seed {args.val_seed}); time per phase (s): {json.dumps(timing)}\n")
    print(table)
    print(f"\nper seed: {args.out / 'per_seed.json'}\nplot: {args.out / 'training.png'}")


if __name__ == "__main__":
    main()
