"""The fake-quantization benchmark runs end to end (tiny model, one repetition) and prints its table."""

import os
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "fake_quant.py"


def test_fake_quant_benchmark_smoke_run_prints_its_table():
    result = subprocess.run(
        [sys.executable, str(BENCHMARK), "--smoke", "--threads", "1"],  # one thread: seconds even on a busy CPU
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("model"))
    assert "ours/fp" in header and "ours/torchao" in header
    rows = [line.split() for line in lines if line.startswith("sana_tiny")]
    assert [row[2] for row in rows] == ["per_channel", "per_group"]
    assert all(float(row[3]) > 0 and float(row[4]) > 0 for row in rows)  # fp and ours ms/step
