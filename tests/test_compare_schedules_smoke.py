"""The schedule-comparison benchmark script: its sweeps, its arguments, its tables of saved numbers, and its smoke
size end to end (the tables themselves: tests/test_paired_seeds.py)."""

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


def test_table_from_saved_numbers_prints_the_tables(tmp_path):
    saved = {"runs": [{"model": "toy", "selection": "transformer_blocks", "rounding": "floor", "schedule": schedule,
                       "granularity": "per_tensor", "seed": seed, "fid": fid,
                       "held_out_loss": 0.01}
                      for schedule, fids in (("standard", [30.0, 31.0]), ("fractional", [29.0, 30.5]))
                      for seed, fid in enumerate(fids)]}
    (tmp_path / "per_seed.json").write_text(json.dumps(saved))
    result = subprocess.run([sys.executable, str(SCRIPT), "--table-from", str(tmp_path / "per_seed.json")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| floor | fractional | per_tensor | 2 | 29.75 ± 1.06 | -2.5% |" in result.stdout


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
