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
    assert report["size"]["plain_dtype"] == "float16"  # auto: a float32-inference model ships 16-bit
    assert {layer["bits"] for layer in report["layers"].values()} == {4}
    assert "of float32" in result.stdout and "of the teacher in bfloat16" in result.stdout
    assert "relative difference" in result.stdout

    from fraqat_cli.export.safetensors_file import load_packed

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
    from fraqat_cli.export.command import export

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
    assert "fraqat-export: error: format='tflite' is not offered; allowed: safetensors, onnx, onnx_nbits" \
        in result.stderr
    assert "Traceback" not in result.stderr and not list(tmp_path.iterdir())


@pytest.mark.parametrize("args,message", [
    (["out=student.bin"], "must end in .safetensors"),
    (["example.batch_size=0"], "example.batch_size must be a positive integer"),
    (["format=onnx", "tolerance.onnx=0"], "tolerance.onnx must be a positive number"),
    (["dtype=int8"], "dtype='int8' is not offered for unquantized tensors; allowed: auto, bfloat16, float16, float32"),
    (["format=onnx_nbits", "runtime.block_size=48"], "runtime.block_size=48 is not a MatMulNBits block size"),
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


@pytest.mark.slow
def test_the_deployed_file_is_evaluated_inside_the_pipeline(run_dir, cache_dir, tmp_path):
    """`fraqat-export` then `fraqat-eval ckpt=<the file>`: the packed 4-bit runtime, measured in the pipeline."""
    result = fraqat_export([f"ckpt={run_dir}", "format=onnx_nbits", "dtype=auto"], tmp_path, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    graph = run_dir / "export" / "student.nbits.onnx"
    report = json.loads((run_dir / "export" / "student.nbits.onnx.json").read_text())
    assert report["format"] == "onnx_nbits" and report["runtime"]["accuracy_level"] == 4
    assert report["check"]["relative_difference"] < report["check"]["tolerance"] == 5e-2
    evaluated = subprocess.run(
        [str(Path(sys.executable).parent / "fraqat-eval"), f"ckpt={graph}", "prompts.count=4", "batch_size=4",
         "logger=none", "clip.model=null", f"results_csv={tmp_path}/results.csv", f"hydra.run.dir={tmp_path}/out"],
        cwd=tmp_path, env=cli_env(cache_dir), capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    (results,) = [json.loads(p.read_text()) for p in (run_dir / "export" / "eval").glob("*/results.json")]
    assert results["checkpoint"] == str(graph) and results["num_images"] == 4 and results["fid"] >= 0
    assert "deployed-student-nbits-onnx" in results["label"] and results["model"] == "tiny_sana"


def test_the_16_bit_export_reproduces_the_deployed_student_exactly(run_dir, cache_dir, tmp_path):
    report = export_in_process([f"ckpt={run_dir}", "dtype=bfloat16", f"out={tmp_path}/s.safetensors"], cache_dir)
    assert report["check"]["relative_difference"] == 0 and report["size"]["plain_dtype"] == "bfloat16"
    assert 0 < report["check"]["unquantized_rounding"] < 1e-1  # bf16 moves the float32 student, a little
    full = export_in_process([f"ckpt={run_dir}", "dtype=float32", f"out={tmp_path}/f.safetensors"], cache_dir)
    assert report["size"]["file_bytes"] < full["size"]["file_bytes"] and full["check"]["unquantized_rounding"] == 0


@pytest.mark.slow
def test_a_student_with_quantized_convolutions_trains_exports_and_is_refused_where_unexpressible(cache_dir, tmp_path):
    kinds = "quantizer.layers=[linear,pointwise_conv,depthwise_conv]"
    trained = fraqat_train([*FAST, "quantizer=per_channel", kinds, f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path,
                           cache_dir=cache_dir)
    assert trained.returncode == 0, trained.stderr[-3000:]
    report = export_in_process([f"ckpt={tmp_path}/run"], cache_dir)
    assert {r["kind"] for r in report["layers"].values()} == {"linear", "pointwise_conv", "depthwise_conv"}
    assert report["check"]["relative_difference"] == 0
    refused = fraqat_export([f"ckpt={tmp_path}/run", "format=onnx_nbits"], tmp_path, cache_dir)
    assert refused.returncode == 2, refused.stderr[-2000:]
    error = [line for line in refused.stderr.splitlines() if line.startswith("fraqat-export: error:")]
    assert len(error) == 1 and "depthwise_conv layers" in error[0] and "it expresses linear, pointwise_conv" in error[0]
    assert not list((tmp_path / "run" / "export").glob("*.onnx*"))
