"""A Hydra callback that leaves one summary of a multirun: a row per job."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from hydra.experimental.callback import Callback

from fraqat_cli.files import atomic_write

METRICS_FILE = "metrics.json"
COLUMNS = ("job", "overrides", "final_loss", "validation_loss", "final_bits", "steps", "checkpoint")


def summarize_sweep(sweep_dir: str | Path) -> Path:
    """Collect every job's metrics.json under `sweep_dir` into `sweep_dir/summary.csv`."""
    sweep_dir = Path(sweep_dir)
    rows = []
    for path in sorted(sweep_dir.glob(f"*/{METRICS_FILE}")):
        metrics = json.loads(path.read_text())
        rows.append({"job": path.parent.name, **{k: metrics.get(k) for k in COLUMNS if k != "job"}})
        rows[-1]["overrides"] = " ".join(metrics.get("overrides", []))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    target = sweep_dir / "summary.csv"
    atomic_write(target, lambda tmp: Path(tmp).write_text(buffer.getvalue()))
    return target


class SweepSummary(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        target = summarize_sweep(config.hydra.sweep.dir)
        print(f"sweep summary: {target}")
