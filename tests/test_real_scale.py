"""What a first run on a real model meets, rehearsed on the tiny twins: bf16 models through train (sample grids,
checkpoints), eval and export; static activation ranges; a recipe missing its data."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from train_support import FAST, cli_env, fraqat_train, train_sweep

from fraqat_cli.checkpointing import load_checkpoint

FAMILIES = ["tiny_sana", "tiny_pixart", "tiny_sd3", "tiny_flux"]


def console(script: str, args: list[str], cwd, cache_dir) -> subprocess.CompletedProcess:
    command = [os.path.join(os.path.dirname(sys.executable), script), *args]
    return subprocess.run(command, cwd=cwd, env=cli_env(cache_dir), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def bf16_sweep(tmp_path_factory, cache_dir):
    """Every tiny family in bfloat16 (teacher, text encoders, cached conditioning), trained in float32 master
    weights under 32-true, with a sample grid at every step: what crashed at the first grid before."""
    return train_sweep(tmp_path_factory.mktemp("bf16"), cache_dir,
                       [f"model={','.join(FAMILIES)}", "model.dtype=bfloat16", "sample_every_n_steps=1", *FAST[1:]])


def jobs(sweep):
    return sorted(p for p in sweep.iterdir() if (p / "metrics.json").is_file())


@pytest.mark.slow
def test_every_family_trains_in_bf16_with_sample_grids_and_checkpoints(bf16_sweep):
    assert len(jobs(bf16_sweep)) == len(FAMILIES)
    for job in jobs(bf16_sweep):
        assert sorted(p.name for p in (job / "samples").iterdir()) == [f"step_{s:06d}.png" for s in (1, 2, 3, 4)]
        last = load_checkpoint(job / "checkpoints" / "last.ckpt")
        assert last["global_step"] == 4 and last["fraqat"]["config"]["model"]["dtype"] == "bfloat16"
        student = {k: v for k, v in last["state_dict"].items() if k.endswith(".weight")}
        assert all(v.dtype == torch.float32 for v in student.values())  # master weights stay float32
        assert all(torch.isfinite(v).all() for v in student.values())


@pytest.mark.slow
def test_bf16_students_evaluate_beside_their_bf16_teachers(bf16_sweep, cache_dir, tmp_path):
    result = console("fraqat-eval", [f"ckpt={bf16_sweep}", "prompts=offline", "prompts.count=4", "batch_size=4",
                                     "logger=none", "clip.model=null", f"results_csv={tmp_path}/results.csv",
                                     f"hydra.run.dir={tmp_path}/out"], tmp_path, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(r["label"].split("-", 1)[1] for r in results) == sorted(
        f"{m}-fractional-per_tensor" for m in FAMILIES)
    assert all(r["fid"] == r["fid"] and r["fid"] >= 0 for r in results)  # finite, not NaN


@pytest.mark.slow
def test_bf16_students_export_and_match_their_files(bf16_sweep, cache_dir):
    for job in jobs(bf16_sweep):
        result = console("fraqat-export", [f"ckpt={job}", "format=safetensors"], job, cache_dir)
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads((job / "export" / "student.safetensors.json").read_text())
        assert report["check"]["relative_difference"] <= report["check"]["tolerance"]


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
