"""A sweep's comparison: FID, KID and CLIP (and fid_val, attribute accuracy when the prompts have ground truth)
per schedule x granularity, with the gap to plain QAT."""

from __future__ import annotations

import io
from pathlib import Path

from fraqat_cli.files import atomic_write

BASELINE = "standard"


def _fmt(value, digits=3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def comparison_table(results: list[dict]) -> str:
    """Markdown table, one row per evaluated model; `vs standard` is the relative FID gap to plain QAT
    at the same granularity (negative: closer to the teacher). With ground-truth scenes it also shows
    `FID val` (against the rendered scenes) and `attributes` (attribute accuracy)."""
    baseline = {r["granularity"]: r["fid"] for r in results if r.get("schedule") == BASELINE}
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
        base = baseline.get(r.get("granularity"))
        gap = f"{(r['fid'] - base) / base:+.1%}" if base and r.get("schedule") not in (None, BASELINE) else "-"
        lines.append(
            f"| {r['label']} | {r.get('schedule') or 'teacher'} | {r.get('granularity') or '-'} | "
            f"{_fmt(r.get('weight_bits'), 2) if r.get('weight_bits') else 'fp'} | {_fmt(r['fid'])} | "
            f"{_fmt(r.get('kid'), 5)} | {_fmt(r.get('clip_score'), 2)} | "
            + (f"{_fmt(r.get('clip_fid'))} | " if clip_fid else "")
            + (f"{_fmt(r.get('fid_val'))} | {_fmt(r.get('attribute_accuracy'))} | " if ground_truth else "")
            + f"{gap} |"
        )
    lines.append("\nKID is clean-fid's unbiased estimate: two sets closer than its sampling noise can score "
                 "slightly below 0.")
    return "\n".join(lines) + "\n"


def bar_chart(results: list[dict], path: Path) -> None:
    """FID per evaluated model as a bar chart PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.get('schedule') or 'teacher'}\n{r.get('granularity') or ''}" for r in results]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(results)), 3.5))
    ax.bar(range(len(results)), [r["fid"] for r in results], color="#4477aa")
    ax.set_xticks(range(len(results)), labels, fontsize=8)
    ax.set_ylabel(f"FID vs {results[0]['reference']} (lower is closer)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))


def write_comparison(results: list[dict], folder: Path) -> tuple[Path, Path]:
    table, chart = folder / "comparison.md", folder / "comparison.png"
    atomic_write(table, lambda tmp: Path(tmp).write_text(comparison_table(results)))
    bar_chart(results, chart)
    return table, chart
