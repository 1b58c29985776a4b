"""`fraqat-export` as a user runs it: on a trained checkpoint, into files, with refusals that write nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from train_support import FAST, cli_env, fraqat_train

CONF = Path(__file__).resolve().parents[1] / "conf"


def fraqat_export(args: list[str], cwd: Path, cache_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "fraqat-export"), *args], cwd=cwd,
                          env=cli_env(cache_dir), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache_dir):
    """A tiny Sana student trained to the end of the fractional schedule (4 bits, per-channel)."""
    work = tmp_path_factory.mktemp("export-run")
    result = fraqat_train([*FAST, "quantizer=per_channel", f"hydra.run.dir={work}/run"], cwd=work,
                          cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "run"


@pytest.mark.slow
def test_safetensors_export_reloads_to_the_student_and_reports_its_size(run_dir, cache_dir, tmp_path):
    result = fraqat_export([f"ckpt={run_dir}", f"out={tmp_path}/w4.safetensors"], tmp_path, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "w4.safetensors.json").read_text())
    assert report["check"]["relative_difference"] < 1e-6
    assert report["size"]["file_bytes"] == (tmp_path / "w4.safetensors").stat().st_size
    assert 0 < report["size"]["of_float32"] < 1 and report["size"]["of_bfloat16"] == pytest.approx(
        2 * report["size"]["of_float32"])
    assert {layer["bits"] for layer in report["layers"].values()} == {4}
    assert "of float32" in result.stdout and "relative difference" in result.stdout

    from fraqat_cli.packed import load_packed

    loaded = load_packed(tmp_path / "w4.safetensors")
    assert loaded.info["model"] == "tiny_sana" and loaded.info["granularity"] == "per_channel"
    assert set(loaded.layers) == set(report["layers"])


@pytest.mark.slow
def test_onnx_export_lands_beside_the_run_and_matches_in_onnxruntime(run_dir, cache_dir, tmp_path):
    result = fraqat_export([f"ckpt={run_dir}/checkpoints/last.ckpt", "format=onnx"], tmp_path, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run_dir / "export" / "student.onnx.json").read_text())
    assert report["format"] == "onnx" and (run_dir / "export" / "student.onnx").is_file()
    assert report["check"]["relative_difference"] < report["check"]["tolerance"]
    assert report["inputs"][:2] == ["latents", "timestep"]
    assert not list((run_dir / "export").glob(".*"))  # no partial file left behind


def export_in_process(args: list[str], cache_dir: Path) -> dict:
    """`export(cfg)` on conf/export.yaml plus overrides: the refusals without a process start each."""
    from fraqat_cli.export import export

    overrides = OmegaConf.from_dotlist([*args, f"cache_dir={cache_dir}"])
    cfg = OmegaConf.merge(OmegaConf.load(CONF / "export.yaml"), overrides)
    return export(cfg)


def edited_checkpoint(run_dir: Path, folder: Path, bits: float) -> Path:
    """A copy of the run whose student sits at `bits` (as a checkpoint taken mid-schedule would)."""
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    for key in state["state_dict"]:
        if key.endswith("weight_quantizer.bits"):
            state["state_dict"][key].fill_(bits)
    (folder / "checkpoints").mkdir(parents=True)
    torch.save(state, folder / "checkpoints" / "last.ckpt")
    return folder


@pytest.mark.parametrize("bits,messages", [
    (5.5, ["fractional weight bit-width (5.5 bits", "only integer bit-widths deploy"]),
    (32.0, ["is not a quantized student", "schedule=fp"]),
])
def test_checkpoints_that_cannot_deploy_are_refused(run_dir, cache_dir, tmp_path, bits, messages):
    folder = edited_checkpoint(run_dir, tmp_path / "run", bits)
    with pytest.raises(ValueError) as error:
        export_in_process([f"ckpt={folder}"], cache_dir)
    assert all(m in str(error.value) for m in messages), str(error.value)
    assert not (folder / "export").exists()


@pytest.mark.slow
def test_an_export_that_fails_its_check_writes_nothing(run_dir, cache_dir):
    with pytest.raises(ValueError, match=r"differs from the student by .* > tolerance.onnx=1e-12; nothing written"):
        export_in_process([f"ckpt={run_dir}", "format=onnx", "tolerance.onnx=1e-12", "out=" + str(run_dir / "x.onnx")],
                          cache_dir)
    assert not [f for f in run_dir.iterdir() if f.name.startswith((".x.onnx", "x.onnx"))]


def test_a_refusal_exits_2_with_one_line_and_writes_nothing(run_dir, cache_dir, tmp_path):
    result = fraqat_export([f"ckpt={run_dir}", "format=tflite"], tmp_path, cache_dir)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "fraqat-export: error: format='tflite' is not offered; allowed: safetensors, onnx" in result.stderr
    assert "Traceback" not in result.stderr and not list(tmp_path.iterdir())


@pytest.mark.parametrize("args,message", [
    (["out=student.bin"], "must end in .safetensors"),
    (["example.batch_size=0"], "example.batch_size must be a positive integer"),
    (["format=onnx", "tolerance.onnx=0"], "tolerance.onnx must be a positive number"),
])
def test_bad_settings_name_the_value_and_what_is_allowed(run_dir, cache_dir, tmp_path, args, message):
    with pytest.raises(ValueError, match=message):
        export_in_process([f"ckpt={run_dir}", *args], cache_dir)


def test_missing_checkpoint_and_sweep_folder_are_refused(run_dir, cache_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        export_in_process([f"ckpt={tmp_path}/nothing"], cache_dir)
    sweep = tmp_path / "sweep"
    for job in ("0-a", "1-b"):
        shutil.copytree(run_dir / "checkpoints", sweep / job / "checkpoints")
    with pytest.raises(ValueError, match="sweep folder of 2 runs; export one run at a time"):
        export_in_process([f"ckpt={sweep}"], cache_dir)
    assert not list(sweep.glob("*/export"))
