"""The schedule-comparison benchmark: its statistics against scipy's, its tables on known numbers, and its smoke
size end to end."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from train_support import cli_env

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_schedules.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("compare_schedules", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_interval_is_scipys_paired_t_interval(script):
    from scipy import stats

    fractional, standard = [32.1, 30.9, 35.0, 31.2, 29.8], [33.0, 33.9, 34.1, 32.5, 33.6]
    mean, sd, low, high = script.paired_interval([f - s for f, s in zip(fractional, standard)])
    want = stats.ttest_rel(fractional, standard).confidence_interval(0.95)
    assert (low, high) == pytest.approx((want.low, want.high), rel=1e-12)
    assert mean == pytest.approx(sum(fractional) / 5 - sum(standard) / 5)
    assert sd > 0


def rows(rounding, schedule, fids):
    return [{"rounding": rounding, "schedule": schedule, "granularity": "per_tensor", "seed": seed, "fid": fid,
             "held_out_loss": 0.01} for seed, fid in enumerate(fids)]


def test_tables_say_which_gaps_and_ratios_are_distinguishable(script):
    table = script.summarize(
        rows("floor", "standard", [30.0, 32.0, 34.0, 36.0]) + rows("floor", "fractional", [27.0, 28.8, 30.6, 32.4])
        + rows("nearest", "standard", [15.0, 16.0, 16.0, 18.0])
        + rows("nearest", "fractional", [14.0, 17.0, 13.0, 16.0])
    )
    lines = table.splitlines()
    gap = {line.split(" | ")[0].strip("| "): line for line in lines
           if "| fractional | per_tensor | FID vs teacher | 4 |" in line}
    assert "-10.0%" in gap["floor"] and "**yes**" in gap["floor"]  # every seed 10% below its standard run
    assert "no (interval holds 0)" in gap["nearest"]  # -6.7%, +6.2%, -18.8%, -11.1%
    ratio = next(line for line in lines if "| standard | per_tensor | floor / nearest | 4 |" in line)
    assert "| 2.031 |" in ratio and "**yes**" in ratio  # 30/15, 32/16, 34/16, 36/18


def test_a_rounding_equal_at_integer_bits_borrows_the_standard_runs(script):
    table = script.summarize(rows("nearest", "standard", [15.0, 16.0]) + rows("nearest", "fractional", [14.0, 15.0])
                             + rows("nearest_int_range", "fractional", [13.5, 14.4]))
    assert "| nearest_int_range (standard: nearest's runs) | fractional | per_tensor | FID vs teacher | 2 | -10.0% |" \
        in table


def test_held_out_loss_gaps_are_paired_too(script):
    table = script.summarize(rows("floor", "standard", [30.0, 31.0]) + [
        {**row, "held_out_loss": loss} for row, loss in zip(rows("floor", "fractional", [29.0, 30.0]), [0.008, 0.009])])
    assert "| floor | fractional | per_tensor | held-out loss | 2 | -15.0% |" in table  # 0.008 / 0.01, 0.009 / 0.01


def test_table_from_saved_numbers_prints_the_tables(tmp_path):
    saved = {"runs": rows("floor", "standard", [30.0, 31.0]) + rows("floor", "fractional", [29.0, 30.5])}
    (tmp_path / "per_seed.json").write_text(json.dumps(saved))
    result = subprocess.run([sys.executable, str(SCRIPT), "--table-from", str(tmp_path / "per_seed.json")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| floor | fractional | per_tensor | 2 | 29.75 ± 1.06 | -2.5% |" in result.stdout


def test_one_rounding_has_no_ratio_table_and_one_seed_no_interval(script):
    table = script.summarize(rows("floor", "standard", [30.0]) + rows("floor", "fractional", [27.0]))
    assert "ratio" not in table and "one seed: no interval" in table


@pytest.mark.slow
def test_compare_schedules_smoke_prints_a_table_and_saves_a_plot(tmp_path, cache_dir):
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path / "out")], cwd=tmp_path,
                            env=cli_env(cache_dir), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| standard | per_tensor | 1 |" in result.stdout and "| fractional | per_tensor | 1 |" in result.stdout
    assert (tmp_path / "out" / "training.png").stat().st_size > 1000
    assert "one seed: no interval" in (tmp_path / "out" / "table.md").read_text()
    runs = json.loads((tmp_path / "out" / "per_seed.json").read_text())["runs"]
    assert sorted(r["schedule"] for r in runs) == ["fractional", "standard"] and all(r["fid"] >= 0 for r in runs)
