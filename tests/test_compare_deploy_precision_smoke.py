"""The deploy-precision study script (scripts/compare_deploy_precision.py) end to end at its smoke size: both
questions' paired gaps come out, the weight-only copy it evaluates keeps the trained weights with its activation
quantizers off, and its check refuses a copy that leaves them on."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from train_support import cli_env

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_deploy_precision.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("compare_deploy_precision", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_gap_whose_interval_holds_zero_is_read_as_no_measurable_difference(script):
    row = {"seeds": 4, "low": -0.02, "high": 0.03}
    assert script.reading(row) == "no difference measurable at this n"
    assert script.reading({**row, "low": 0.01}) == "higher FID (worse)"
    assert script.reading({"seeds": 1, "low": float("nan"), "high": float("nan")}) == "one seed: no interval"


@pytest.mark.slow
def test_smoke_run_gives_both_gaps_and_a_checked_weight_only_copy(tmp_path, cache_dir, script):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], cwd=tmp_path,
                            env=cli_env(cache_dir), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 weight-only copies checked" in result.stdout
    saved = json.loads((out / "deploy_precision_per_seed.json").read_text())
    assert {(g["arm"], g["granularity"], g["seeds"]) for g in saved["gaps"]} == {
        ("scale-float16", "per_tensor", 1), ("float32-a16", "per_tensor", 1)}
    assert all(fid >= 0 for g in saved["gaps"] for fid in g["fid_arm"] + g["fid_baseline"])
    assert all(arm["wall_s"] > 0 for arm in saved["arms"].values())
    assert saved["command"].endswith("--smoke --out " + str(out))

    # The copy that was evaluated: activation bits null in its stored config; the check refuses the original.
    from fraqat_cli.models.loading import load_model
    from fraqat_cli.student.checkpoint import StudentCheckpoint

    [trained] = (out / "scale-float32" / "sweep").glob("*/checkpoints/last.ckpt")
    [copy] = (out / "float32-a16" / "sweep").glob("*/checkpoints/last.ckpt")
    assert StudentCheckpoint.read(copy).config.quantizer.activation_bits is None
    assert StudentCheckpoint.read(trained).config.quantizer.activation_bits == 8
    skeleton = load_model(StudentCheckpoint.read(trained).config.model).transformer
    with pytest.raises(SystemExit, match="activation quantizer is still active"):
        script.check_weight_only(trained, trained, skeleton)

    # A second invocation finds every arm done and keeps the wall times the first one measured.
    again = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], cwd=tmp_path,
                           env=cli_env(cache_dir), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "compare_schedules.py" not in again.stdout
    assert json.loads((out / "deploy_precision_per_seed.json").read_text())["arms"] == saved["arms"]
