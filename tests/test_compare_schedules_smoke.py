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


def family_rows(model, selection, schedule, granularity, fids, share):
    return [{"model": model, "selection": selection, "rounding": "nearest_int_range", "schedule": schedule,
             "granularity": granularity, "seed": seed, "fid": fid, "held_out_loss": 0.004, "quantized_share": share}
            for seed, fid in enumerate(fids)]


def test_family_table_has_the_teacher_and_each_gap_to_standard_qat(script):
    rows = (family_rows("toy", "transformer_blocks", "standard", "per_tensor", [15.0, 16.0, 17.0], 0.409)
            + family_rows("toy", "transformer_blocks", "fractional", "per_tensor", [13.5, 14.4, 15.3], 0.409)
            + family_rows("toy", "transformer_blocks", "standard", "per_channel", [8.0, 9.0, 7.0], 0.409)
            + family_rows("toy", "transformer_blocks", "fractional", "per_channel", [8.4, 8.1, 7.7], 0.409))
    lines = script.summarize(rows, [{"model": "toy", "fid": 0.0}]).splitlines()
    assert "| toy | - | teacher (full precision) | - | 0 (reference) |" in lines[4]
    fraqat = next(line for line in lines if line.startswith("| toy | per_tensor | FraQAT | 3 | 14.40 ± 0.90 |"))
    assert "| -10.0% | [-10.0%, -10.0%] | **yes** |" in fraqat and fraqat.endswith("| 40.9% |")
    channel = next(line for line in lines if line.startswith("| toy | per_channel | FraQAT | 3 |"))
    assert "| no |" in channel  # +5.0%, -10.0%, +10.0%


def test_selections_group_the_tables_and_get_their_own_ratio(script):
    rows = (family_rows("toy", "transformer_blocks", "standard", "per_tensor", [15.0, 16.0], 0.409)
            + family_rows("toy", "all_linear", "standard", "per_tensor", [30.0, 32.0], 0.5)
            + family_rows("toy", "all_linear", "fractional", "per_tensor", [27.0, 28.8], 0.5))
    table = script.summarize(rows)
    assert "| toy | all_linear | per_tensor | FraQAT | 2 | 27.90 ± 1.27 | -10.0% |" in table
    assert "Details, model `toy`, selection `all_linear`:" in table
    ratio = next(line for line in table.splitlines() if "transformer_blocks / all_linear" in line)
    assert ratio.startswith("| standard | per_tensor | transformer_blocks / all_linear | 2 | 0.500 |")


def test_sweeps_give_the_headline_schedules_their_own_seed_count(script, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["compare_schedules.py", "--models", "toy",
                                      "--selections", "transformer_blocks,all_linear_conv",
                                      "--schedules", "standard,fractional,integer", "--seeds", "8",
                                      "--other-seeds", "2", "--granularities", "per_tensor"])
    sweeps = script.sweeps(script.parse_args())
    assert len(sweeps) == 4  # (headline, others) x 2 selections
    assert "schedule=standard,fractional" in sweeps[0] and "seed=0,1,2,3,4,5,6,7" in sweeps[0]
    assert "schedule=integer" in sweeps[1] and "seed=0,1" in sweeps[1]
    assert {"selection=all_linear", "quantizer.layers=[linear,pointwise_conv]"} <= set(sweeps[2])


def test_parallel_training_deals_every_seed_to_exactly_one_worker(script):
    overrides = ["model=toy", "schedule=standard,fractional", "seed=0,1,2,3,4", "hydra.sweep.subdir=x"]
    parts = script.split_seeds(overrides, 2)
    assert [p[2] for p in parts] == ["seed=0,2,4", "seed=1,3"]
    assert all(p[:2] == overrides[:2] and p[3:] == overrides[3:] for p in parts)
    assert script.split_seeds(["seed=0"], 2) == [["seed=0"]]  # never an empty multirun
    assert script.split_seeds(overrides, 1) == [overrides]


@pytest.mark.parametrize("flag", ["--schedules", "--models", "--selections"])
def test_a_name_not_in_conf_is_refused_naming_the_allowed_ones(script, monkeypatch, capsys, flag):
    monkeypatch.setattr(sys, "argv", ["compare_schedules.py", flag, "standard,nonesuch"])
    with pytest.raises(SystemExit) as exit_:
        script.parse_args()
    assert exit_.value.code == 2 and "'standard,nonesuch': allowed names are" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_schedules_smoke_prints_a_table_and_saves_a_plot(tmp_path, cache_dir):
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path / "out")], cwd=tmp_path,
                            env=cli_env(cache_dir), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| standard | per_tensor | 1 |" in result.stdout and "| fractional | per_tensor | 1 |" in result.stdout
    assert (tmp_path / "out" / "training.png").stat().st_size > 1000
    assert "one seed: no interval" in (tmp_path / "out" / "table.md").read_text()
    assert "| toy | - | teacher (full precision) | - | 0 (reference) |" in result.stdout
    saved = json.loads((tmp_path / "out" / "per_seed.json").read_text())
    runs = saved["runs"]
    assert sorted(r["schedule"] for r in runs) == ["fractional", "standard"] and all(r["fid"] >= 0 for r in runs)
    assert {(r["model"], r["selection"]) for r in runs} == {("toy", "transformer_blocks")}
    assert all(0 < r["quantized_share"] < 1 for r in runs) and saved["teachers"][0]["model"] == "toy"
    assert saved["timing"]["training_s"] > 0 and saved["timing"]["evaluated_students"] == 2
