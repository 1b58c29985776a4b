"""What a first run on a real model meets, rehearsed on the tiny twins: static activation ranges, a recipe
missing its data. (bf16 models through train, eval and export: tests/test_train_cli.py's family sweep.)"""

from __future__ import annotations

import json

import pytest
from train_support import FAST, console, fraqat_train

from fraqat_cli.student.checkpoint import load_checkpoint


@pytest.mark.slow
def test_static_activations_calibrate_train_evaluate_and_export(tmp_path, cache_dir):
    """`quantizer.static_activations=true` raised at the first step before: nothing calibrated the ranges."""
    run = tmp_path / "static"
    result = fraqat_train([*FAST, "model=tiny_pixart", "model.dtype=bfloat16", "quantizer.static_activations=true",
                           "quantizer.calibration_batches=2", f"hydra.run.dir={run}"], tmp_path, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    state = load_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    ranges = {k: float(v) for k, v in state.items() if k.endswith(("range_min", "range_max"))}
    assert ranges and all(v == v for v in ranges.values())  # every quantized layer calibrated (no NaN)
    result = console("fraqat-export", [f"ckpt={run}", "format=onnx"], tmp_path, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    layers = json.loads((run / "export" / "student.onnx.json").read_text())["layers"]
    assert all(layer["activation"]["static"] and layer["activation"]["range"] for layer in layers.values())
    result = console("fraqat-eval", [f"ckpt={run}", "prompts=offline", "prompts.count=2", "batch_size=2",
                                     "logger=none", "clip.model=null", f"results_csv={tmp_path}/results.csv",
                                     f"hydra.run.dir={tmp_path}/out"], tmp_path, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_recipe_without_its_data_names_the_missing_value(tmp_path, cache_dir):
    result = fraqat_train(["experiment=sd35_medium_w4a8", f"hydra.run.dir={tmp_path}/run"], tmp_path, cache_dir)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == ("fraqat-train: error: data.captions_file is required and has no default; "
                         "give it on the command line, e.g. data.captions_file=...")
    assert not (tmp_path / "run" / "checkpoints").exists()
