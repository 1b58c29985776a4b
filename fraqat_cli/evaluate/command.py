"""`fraqat-eval`: FID/KID and CLIP score of quantized students (and teachers), as a table and files.

With a prompt set that carries its ground-truth scenes (`prompts=shapes_val`) it also reports `fid_val`
(FID against the rendered scenes) and attribute accuracy.

`evaluate(cfg)` does the work and returns one result dict per evaluated model;
`main` is the thin Hydra entry point.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import hydra
import torch
from filelock import FileLock
from omegaconf import DictConfig
from PIL import Image

from fraqat_cli.checks import positive_int
from fraqat_cli.cli import instantiate_or_raise, quiet_console, quiet_lightning, run_reporting_errors
from fraqat_cli.evaluate.clip_score import load_clip
from fraqat_cli.evaluate.comparison import comparison_table, write_comparison
from fraqat_cli.evaluate.evaluator import Evaluator
from fraqat_cli.evaluate.fid_features import PLUMBING, fid_feature_extractor
from fraqat_cli.evaluate.targets import resolve_targets
from fraqat_cli.files import atomic_write
from fraqat_cli.loggers import finish_run, make_logger

CSV_COLUMNS = (
    "label",
    "model",
    "schedule",
    "granularity",
    "weight_bits",
    "fid",
    "kid",
    "clip_score",
    "clip_fid",
    "fid_val",
    "attribute_accuracy",
    "reference",
    "num_images",
    "seed",
    "checkpoint",
    "images_dir",
    "digest",
    "protocol",
    "plumbing_check",   # fid.inception=plumbing: the note, and its stand-in distance (never in `fid`)
    "plumbing_fid",
)
# A row stands for one model measured one way: a result with the same values replaces it.
ROW_KEY = ("label", "checkpoint", "digest", "protocol")

# logged and printed, when present
SUMMARY_METRICS = ("fid", "kid", "clip_score", "clip_fid", "fid_val", "attribute_accuracy", "plumbing_fid",
                   "plumbing_kid")


def check_settings(cfg: DictConfig) -> None:
    if cfg.reference not in ("teacher", "coco"):
        raise ValueError(f"reference={cfg.reference!r} is not known; allowed: teacher, coco")
    if cfg.reference == "coco" and not (cfg.reference_stats or cfg.reference_dir):
        raise ValueError(
            "reference=coco needs reference_stats=FILE.npz (scripts/coco_reference.py) or reference_dir=DIR"
        )
    if cfg.reference_dir and not Path(str(cfg.reference_dir)).expanduser().is_dir():
        raise FileNotFoundError(f"reference_dir={cfg.reference_dir!r} is not a folder of reference images")
    for name in ("batch_size", "grid_size"):
        positive_int(name, cfg[name])
    if cfg.fid.inception == "plumbing" and cfg.reference_stats:
        raise ValueError("fid.inception=plumbing cannot use reference_stats (they hold Inception features); "
                         "use reference=teacher or reference_dir=DIR")


def evaluate(cfg: DictConfig) -> list[dict]:
    # 1. Everything named must exist and agree before any generation starts.
    check_settings(cfg)
    targets = resolve_targets(cfg.ckpt, cfg.get("model"))
    prompt_set = instantiate_or_raise(cfg.prompts)
    prompts, scenes = list(prompt_set), getattr(prompt_set, "scenes", None)  # scenes: the prompts' ground truth
    device = torch.device(
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else ("cpu" if cfg.device == "auto" else cfg.device)
    )
    extractor, extractor_name = fid_feature_extractor(device, cfg.fid.inception)
    if extractor_name == PLUMBING:
        print(f"fraqat-eval: {PLUMBING}: checks generation, batching and feature extraction on {device}; "
              f"the distances are reported as plumbing_fid / plumbing_kid")
    model, processor_or_reason = load_clip(cfg.clip.model) if cfg.clip.model else (None, "clip.model=null")
    clip = None
    if model is None:
        print(f"fraqat-eval: {processor_or_reason}", file=sys.stderr)
    else:
        clip = (model.to(device), processor_or_reason)  # (model, processor)
    evaluator = Evaluator(cfg, prompts, device, extractor, extractor_name, clip, scenes)

    # 2. Each target: images, metrics, files.
    results = [evaluator.evaluate(target) for target in targets]
    update_csv(Path(cfg.results_csv), results)
    print("\n" + comparison_table(results))
    for warning in evaluator.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    # 3. The comparison of everything evaluated, in this eval's folder, and a sweep's own beside its jobs
    # (with the teacher's row, when the teacher was evaluated too).
    teachers = [r for r, t in zip(results, targets) if t.is_teacher]
    comparisons = [write_comparison(results, Path(cfg.out_dir))]
    for sweep in sorted({t.sweep_dir for t in targets if t.sweep_dir}):
        members = [r for r, t in zip(results, targets) if t.sweep_dir == sweep]
        comparisons.append(write_comparison(teachers + members, sweep))
    print(where_results_went(results, comparisons))
    log_results(cfg, results)
    return results


def where_results_went(results: list[dict], comparisons: list[tuple[Path, Path]]) -> str:
    """Each model's results.json and grid.png, and the comparisons' table and chart, one path a line."""
    width = max(len(r["label"]) for r in results)
    lines = ["results:"]
    for r in results:
        lines += [f"  {r['label']:<{width}}  {r['results_json']}", f"  {'':<{width}}  {r['grid']}"]
    for table, chart in comparisons:
        lines += [f"comparison: {table}", f"            {chart}"]
    return "\n".join(lines)


def update_csv(path: Path, results: list[dict]) -> None:
    """Put one row per result in the cross-run CSV: a result replaces the row of the same model measured the
    same way (`ROW_KEY`), else it is added. Read, changed and rewritten whole under a file lock, so evals that
    finish together each keep their rows, and atomically; rows from before a column was added keep it empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        old_rows = list(csv.DictReader(io.StringIO(path.read_text()))) if path.is_file() else []
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        latest = {_row_key(r): r for r in results}  # a model named twice in one eval: one row
        writer.writerows([r for r in old_rows if _row_key(r) not in latest] + list(latest.values()))
        atomic_write(path, lambda tmp: Path(tmp).write_text(buffer.getvalue()))


def _row_key(row: dict) -> tuple[str, ...]:
    """`ROW_KEY`'s values as the CSV holds them (None is an empty cell)."""
    return tuple("" if row.get(k) is None else str(row[k]) for k in ROW_KEY)


def log_results(cfg: DictConfig, results: list[dict]) -> None:
    """Metrics and grids to the configured logger (wandb: offline unless WANDB_MODE says otherwise, `quiet_console`)."""
    if not cfg.logger:
        return

    quiet_lightning()  # the loggers are Lightning's: imported only when one is configured
    logger = make_logger(cfg, Path(str(cfg.out_dir)))
    try:
        for step, r in enumerate(results):
            logger.log_metrics({f"eval/{r['label']}/{k}": r[k] for k in SUMMARY_METRICS if k in r}, step=step)
            if hasattr(logger, "log_image"):
                logger.log_image(key=f"eval/{r['label']}/grid", images=[Image.open(r["grid"])], step=step)
        logger.finalize("success")
    finally:
        finish_run()  # the next job of a sweep starts its own logger run


@hydra.main(config_path="pkg://fraqat_cli.conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    quiet_console()
    results = run_reporting_errors("fraqat-eval", lambda: evaluate(cfg))
    if cfg.print_json:
        print(json.dumps([{k: r[k] for k in ("label", *SUMMARY_METRICS) if k in r} for r in results]))
