"""The few lines `fraqat-train` ends with: what the run reached and where its files went.

The full record is metrics.json (and, with `print_json=true`, the same JSON on stdout)."""

from __future__ import annotations

from pathlib import Path

from fraqat_cli.train.curve import CURVE_FILE
from fraqat_cli.train.sweep import METRICS_FILE


def _number(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def summary_table(metrics: dict, run_dir: Path) -> str:
    """A two-column table: steps, final and validation loss, weight bits, time, and the files' paths
    (those that exist: a run that was already finished has no new curve)."""
    seconds, per_step = metrics.get("seconds"), metrics.get("seconds_per_batch")
    time = "-" if seconds is None else f"{seconds:.1f} s" + (
        f" ({per_step:.3f} s a batch)" if per_step is not None else "")
    validation = _number(metrics.get("validation_loss"))
    if metrics.get("validation_rows"):
        validation += f" ({metrics['validation_rows']} held-out rows)"
    rows = [
        ("steps", str(metrics.get("steps", "-"))),
        ("final loss", _number(metrics.get("final_loss"))),
        ("validation loss", validation),
        ("weight bits", "-" if metrics.get("final_bits") is None else f"{metrics['final_bits']:.2f}"),
        ("time", time),
        ("checkpoint", str(metrics.get("checkpoint", "-"))),
    ]
    rows += [(what, str(run_dir / name)) for what, name in (("metrics", METRICS_FILE), ("training curve", CURVE_FILE))
             if (run_dir / name).is_file()]
    width = max(len(name) for name, _ in rows)
    return "\n".join(["fraqat-train: done", *(f"  {name:<{width}}  {value}" for name, value in rows)])
