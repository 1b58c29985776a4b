"""A comparison of evaluated models: FID, KID and CLIP (and fid_val, attribute accuracy when the prompts have
ground truth) per schedule x granularity, with the teacher's row, the gap to plain QAT, and what the figures
were measured on (images, seeds), as a markdown table and a bar chart with intervals over training seeds."""

from __future__ import annotations

import io
import re
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt

from fraqat_cli.evaluate.intervals import CONFIDENCE
from fraqat_cli.evaluate.intervals import t_interval as paired_interval
from fraqat_cli.evaluate.metrics import ADVISED_FID_IMAGES
from fraqat_cli.files import atomic_write

BASELINE = "standard"


def plain_qat(schedule: str | None) -> str:
    """The plain-QAT schedule whose students a schedule's are compared with: `standard` (4 bits from the first
    step), or for a preset named for another end width (`fractional_w3`) the constant one at that width
    (`standard_w3`), so a W3 curriculum is never measured against 4-bit students."""
    width = (schedule or "").rpartition("_")[2]
    return f"{BASELINE}_{width}" if re.fullmatch(r"w\d+", width) else BASELINE


def _fmt(value, digits=3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def comparison_table(results: list[dict]) -> str:
    """Markdown table, one row per evaluated model; `vs standard` is the relative FID gap to plain QAT
    at the same granularity (negative: closer to the teacher). With ground-truth scenes it also shows
    `FID val` (against the rendered scenes) and `attributes` (attribute accuracy)."""
    baseline = {(r["schedule"], r["granularity"]): r.get("fid") for r in results
                if r.get("schedule") == plain_qat(r.get("schedule"))}  # the teacher's None is no baseline
    ground_truth = any("fid_val" in r for r in results)
    clip_fid = any("clip_fid" in r for r in results)  # CLIP weights were given
    extra = (" CLIP-FID |" if clip_fid else "") + (" FID val | attributes |" if ground_truth else "")
    lines = [
        f"| model | schedule | granularity | bits | FID | KID | CLIP |{extra} FID vs standard |",
        "|---|---|---|---|---|---|---|" + ("---|" if clip_fid else "") + ("---|---|" if ground_truth else "") + "---|",
    ]
    for r in sorted(
        results, key=lambda r: (r["schedule"] is not None, r.get("granularity") or "", r.get("schedule") or "")
    ):
        schedule = r.get("schedule")
        base = baseline.get((plain_qat(schedule), r.get("granularity")))
        gap = f"{(r['fid'] - base) / base:+.1%}" if base and r.get("fid") is not None \
            and schedule not in (None, plain_qat(schedule)) else "-"
        lines.append(
            f"| {r['label']} | {r.get('schedule') or 'teacher'} | {r.get('granularity') or '-'} | "
            f"{_fmt(r.get('weight_bits'), 2) if r.get('weight_bits') else 'fp'} | {_fmt(r.get('fid'))} | "
            f"{_fmt(r.get('kid'), 5)} | {_fmt(r.get('clip_score'), 2)} | "
            + (f"{_fmt(r.get('clip_fid'))} | " if clip_fid else "")
            + (f"{_fmt(r.get('fid_val'))} | {_fmt(r.get('attribute_accuracy'))} | " if ground_truth else "")
            + f"{gap} |"
        )
    lines += ["", *measurement_notes(results)]
    return "\n".join(lines) + "\n"


def measurement_notes(results: list[dict]) -> list[str]:
    """What the figures rest on: images per model, their seeds, the training seeds, and whether FID is stable."""
    counts = sorted({r["num_images"] for r in results if r.get("num_images")})
    seeds = sorted({r["seed"] for r in results if r.get("seed") is not None})
    notes = []
    if counts:
        n = " or ".join(str(c) for c in counts)
        drawn = f"; image i drawn with seed {' or '.join(str(s) for s in seeds)} + i" if seeds else ""
        notes.append(f"n = {n} images per model, one per prompt, the same prompts and seeds for every model{drawn}.")
    groups = seed_groups(results)
    several = {k: v for k, v in groups.items() if len(v) > 1}
    if several:
        notes.append(f"Training seeds: {', '.join(f'{k[1]} {k[2]}: {len(v)}' for k, v in several.items())} "
                     f"(comparison.png: mean and {CONFIDENCE:.0%} Student-t interval over them).")
    if counts and counts[0] < ADVISED_FID_IMAGES:
        notes.append(f"FID from {counts[0]} images is unstable: below {ADVISED_FID_IMAGES} images the 2048-d "
                     f"covariance is singular and the figure moves with the draw of images; read gaps of a few "
                     f"points as noise, and use {ADVISED_FID_IMAGES}+ images (10k+ for published figures).")
    notes.append("KID is clean-fid's unbiased estimate: two sets closer than its sampling noise can score "
                 "slightly below 0.")
    plumbing = [r for r in results if r.get("plumbing_check")]
    if plumbing:  # fid.inception=plumbing: the FID and KID columns stay empty
        figures = ", ".join(f"{r['label']} {_fmt(r.get('plumbing_fid'))}" for r in plumbing)
        notes.append(f"{plumbing[0]['plumbing_check']}: FID and KID are left empty; plumbing_fid ({figures}) only "
                     f"shows that generation, batching, features and the FID arithmetic ran.")
    return notes


def seed_groups(results: list[dict]) -> dict[tuple, list[dict]]:
    """Results grouped by what was trained (model, schedule, granularity, bits), across training seeds; the
    teacher is one group."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        key = (r.get("model"), r.get("schedule") or "teacher", r.get("granularity") or "", r.get("weight_bits"))
        groups.setdefault(key, []).append(r)
    return groups


def bar_chart(results: list[dict], path: Path) -> None:
    """FID per trained configuration as a bar chart PNG (and, when the prompts have ground truth, FID against
    the validation scenes beside it): one bar per configuration, its value on top; with several training seeds
    the bar is their mean, with a Student-t interval and each seed as a dot."""

    matplotlib.use("Agg")

    groups = sorted(seed_groups(results).items(), key=lambda item: item[0][1] != "teacher")  # the teacher first
    measures = [("fid", f"FID vs {results[0]['reference']}")]
    if any("fid_val" in r for r in results):
        measures.append(("fid_val", "FID vs validation scenes"))
    fig, axes = plt.subplots(1, len(measures), figsize=(max(4, 1.3 * len(groups)) * len(measures), 3.8),
                             squeeze=False)
    for ax, (key, title) in zip(axes[0], measures):
        _bars(ax, groups, key)
        ax.set_ylabel(f"{title}\n(lower is closer)")
    n = min(r["num_images"] for r in results)
    fig.suptitle(f"n = {n} images per model" + (" (FID unstable below 2048)" if n < ADVISED_FID_IMAGES else ""),
                 fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))


def _bars(ax, groups: list[tuple[tuple, list[dict]]], key: str) -> None:
    for x, ((_, schedule, _, _), members) in enumerate(groups):
        values = [r[key] for r in members if r.get(key) is not None]
        if not values:
            continue
        mean, _, low, high = paired_interval(values)
        ax.bar(x, mean, color="#bbbbbb" if schedule == "teacher" else "#4477aa")
        top = mean
        if len(values) > 1:
            ax.errorbar(x, mean, yerr=[[mean - low], [high - mean]], color="black", capsize=5, linewidth=1.2)
            ax.plot([x] * len(values), values, "o", color="#ee6677", markersize=4, zorder=3)
            top = max(high, *values)
        reference = schedule == "teacher" and key == "fid" and mean == 0
        ax.annotate("0 (itself)" if reference else f"{mean:.2f}", (x, top), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8)
    labels = [f"{schedule}\n{granularity}" + (f"\n{len(m)} seeds" if len(m) > 1 else "")
              for (_, schedule, granularity, _), m in groups]
    ax.set_xticks(range(len(groups)), labels, fontsize=8)
    ax.margins(y=0.12)


def write_comparison(results: list[dict], folder: Path) -> tuple[Path, Path]:
    table, chart = folder / "comparison.md", folder / "comparison.png"
    atomic_write(table, lambda tmp: Path(tmp).write_text(comparison_table(results)))
    bar_chart(results, chart)
    return table, chart
