"""Activation bit schedules (`conf/activation_schedule/`), applied by the bit-schedule callback and logged; a W4A4
per-token student exported to ONNX QDQ (4-bit activations: opset 21's INT4) agrees with PyTorch in onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from test_export_cli import export_in_process, fraqat_export
from torch import nn
from train_support import FAST, fraqat_train, logged_rows

from fraqat_cli.quant import QuantizedLayer, quantize_model
from fraqat_cli.quant.swap import QuantConfig
from fraqat_cli.train.callbacks import BitScheduleCallback

PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "activation_schedule").glob("*.yaml"))


def train_config(*overrides: str):
    with initialize_config_module(config_module="fraqat_cli.conf", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_activation_schedule_preset_builds_and_ends_at_integer_bits(preset):
    schedule = instantiate(train_config(f"activation_schedule={preset}").activation_schedule)
    assert float(schedule(99, 100)).is_integer()


def test_the_default_is_constant_at_the_quantizers_activation_bits():
    assert train_config().activation_schedule.name == "constant"
    for bits, expected in [("8", 8.0), ("4", 4.0), ("null", 32.0)]:
        schedule = instantiate(train_config(f"quantizer.activation_bits={bits}").activation_schedule)
        assert {schedule(step, 10) for step in range(10)} == {expected}


def test_the_fractional_preset_walks_8_6_5_4_5_4():
    schedule = instantiate(train_config("activation_schedule=fractional").activation_schedule)
    trace = [schedule(step, 25) for step in range(25)]
    assert sorted(set(trace), reverse=True) == [8.0, 6.0, 5.0, 4.5, 4.0]
    assert trace == sorted(trace, reverse=True) and trace[-1] == 4.0


def test_the_callback_sets_every_layers_activation_bits_from_the_schedule():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    quantize_model(model, QuantConfig(include=("*",)))
    callback = BitScheduleCallback(lambda step, total: 4.0, lambda step, total: 8.0 - step)
    for step in range(3):
        trainer = SimpleNamespace(global_step=step, max_steps=10)
        callback.apply(trainer, SimpleNamespace(student=model))
        assert {m.input_quantizer.current_bits for m in model.modules() if isinstance(m, QuantizedLayer)} \
            == {8.0 - step}
        assert {m.weight_bits for m in model.modules() if isinstance(m, QuantizedLayer)} == {4.0}


@pytest.fixture(scope="module")
def w4a4_run(tmp_path_factory, cache_dir):
    """A tiny FLUX student, W4 per channel, activations per token along the fractional activation schedule."""
    work = tmp_path_factory.mktemp("w4a4")
    result = fraqat_train(["model=tiny_flux", *FAST[1:], "trainer.max_steps=10", "quantizer=per_channel",
                           "quantizer.activation_granularity=per_channel", "activation_schedule=fractional",
                           f"hydra.run.dir={work}/run"], cwd=work, cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "run"


@pytest.mark.slow
def test_the_activation_schedule_is_applied_and_logged_as_train_activation_bits(w4a4_run):
    schedule = instantiate(train_config("activation_schedule=fractional").activation_schedule)
    logged = {int(r["step"]): float(r["train/activation_bits"]) for r in logged_rows(w4a4_run)
              if r.get("train/activation_bits")}
    assert logged == {step: schedule(step, 10) for step in range(10)}
    state = torch.load(w4a4_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    act_bits = {float(v) for k, v in state.items() if k.endswith("input_quantizer.bits")}
    assert act_bits == {4.0}


@pytest.mark.slow
def test_w4a4_per_token_onnx_agrees_with_pytorch_in_onnxruntime(w4a4_run, cache_dir, tmp_path):
    import onnx

    out = tmp_path / "w4a4.onnx"
    export_in_process([f"ckpt={w4a4_run}", "format=onnx", f"out={out}"], cache_dir)
    report = json.loads((tmp_path / "w4a4.onnx.json").read_text())
    assert report["check"]["relative_difference"] < report["check"]["tolerance"]
    assert {layer["activation"]["bits"] for layer in report["layers"].values()} == {4}
    quantize = [n for n in onnx.load(str(out)).graph.node if n.op_type == "QuantizeLinear"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in quantize]
    assert attrs and all(a["output_dtype"] == onnx.TensorProto.INT4 and a["axis"] == -1 for a in attrs)


def edited_activation_bits(run_dir: Path, folder: Path, bits: float) -> Path:
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    for key, value in state["state_dict"].items():
        if key.endswith("input_quantizer.bits"):
            value.fill_(bits)
    (folder / "checkpoints").mkdir(parents=True)
    torch.save(state, folder / "checkpoints" / "last.ckpt")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("bits,fmt,message", [
    (4.5, "onnx", "fractional activation bits 4.5, which no runtime deploys; allowed: integer activation bits"),
    (6.0, "onnx", "ONNX export takes 8- or 4-bit activations"),
])
def test_activation_bits_a_runtime_cannot_deploy_exit_2_with_one_line_and_nothing_written(
        w4a4_run, cache_dir, tmp_path, bits, fmt, message):
    folder = edited_activation_bits(w4a4_run, tmp_path / "run", bits)
    result = fraqat_export([f"ckpt={folder}", f"format={fmt}"], tmp_path, cache_dir)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("fraqat-export: error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (folder / "export").exists()
