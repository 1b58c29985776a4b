"""The schedule-comparison benchmark runs end to end in its smoke size and prints its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from train_support import cli_env

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_schedules.py"


@pytest.mark.slow
def test_compare_schedules_smoke_prints_a_table_and_saves_a_plot(tmp_path, cache_dir):
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path / "out")], cwd=tmp_path,
                            env=cli_env(cache_dir), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| standard | per_tensor | 1 |" in result.stdout and "| fractional | per_tensor | 1 |" in result.stdout
    assert (tmp_path / "out" / "training.png").stat().st_size > 1000
    assert (tmp_path / "out" / "table.md").read_text().count("per_tensor") == 2
