"""A student trained with learned scales (LSQ): the scales travel in the checkpoint, survive the rebuild for
evaluation, and every export format holds the codes taken at them exactly (atol=0)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from test_export_cli import export_in_process
from train_support import FAST, fraqat_train

from fraqat_cli.export.gguf_blocks import unpack_blocks
from fraqat_cli.quant import QuantLinear
from fraqat_cli.quant.fake_quant import _on_half_grid, dequantize_codes
from fraqat_cli.quant.packing import unpack_codes

FORMATS = ["safetensors", "onnx", "onnx_nbits", "gguf", "diffusers"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache_dir):
    """A tiny FLUX student (every format takes FLUX) trained to the end of the fractional schedule, W4 per-group-32
    with learned scales on the fp16 grid (what GGUF blocks hold)."""
    work = tmp_path_factory.mktemp("learned")
    result = fraqat_train(["model=tiny_flux", *FAST[1:], "quantizer=per_group", "quantizer.scale=learned",
                           "quantizer.scale_dtype=float16", f"hydra.run.dir={work}/run"], cwd=work,
                          cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "run"


def rebuilt(run_dir: Path, bake: bool = False):
    from fraqat_cli.models.loading import load_model
    from fraqat_cli.student.build import model_skeleton
    from fraqat_cli.student.checkpoint import StudentCheckpoint
    from fraqat_cli.student.rebuild import rebuild_student

    stored = StudentCheckpoint.read(run_dir / "checkpoints" / "last.ckpt")
    teacher = load_model(stored.config.model).pipe.transformer
    return stored, rebuild_student(stored, model_skeleton(teacher), bake=bake)


def reference_codes(layer: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes of the layer's weight at its learned scale, computed here: clamp(round(W / s), -8, 7) per group
    of 32, s the learned scale on the fp16 grid. (codes int32 of the weight matrix, scales (rows, groups))."""
    scale = _on_half_grid(layer.weight_quantizer.scale.detach())  # (rows, groups)
    rows = layer.weight.shape[0]
    grouped = layer.weight.detach().reshape(rows, scale.shape[1], -1)  # (rows, groups, 32)
    codes = torch.round(grouped / scale.unsqueeze(-1)).clamp(-8, 7)
    return codes.reshape(rows, -1).to(torch.int32), scale


@pytest.mark.slow
def test_learned_scales_are_in_the_checkpoint_and_the_rebuilt_student_computes_with_them(run_dir):
    stored, student = rebuilt(run_dir)
    layers = {n: m for n, m in student.named_modules() if isinstance(m, QuantLinear) and m.weight_bits == 4}
    assert layers
    for name, layer in layers.items():
        saved = stored.state[f"{name}.weight_quantizer.scale"]
        assert saved.dtype == torch.float32 and torch.equal(layer.weight_quantizer.scale, saved)
        assert float(stored.state[f"{name}.weight_quantizer.scale_bits"]) == 4.0
        codes, scale = reference_codes(layer)
        with torch.no_grad():  # the student multiplies the codes at its learned scale, nothing else
            expected = dequantize_codes(codes, scale, None, layer.weight_quantizer.spec)
            assert torch.equal(layer.quantize_weight(), expected.reshape(layer.weight.shape))
    _, baked = rebuilt(run_dir, bake=True)
    for name, layer in layers.items():
        with torch.no_grad():
            assert torch.equal(baked.get_submodule(name).weight, layer.quantize_weight())


def stored_codes(fmt: str, out: Path, name: str, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int32 (rows, cols), scales (rows, groups)) of layer `name` as the file in `fmt` holds them."""
    rows, cols = shape
    if fmt == "safetensors":
        with safe_open(str(out), "pt") as f:
            packed, scale = f.get_tensor(f"{name}.weight.codes"), f.get_tensor(f"{name}.weight.scale")
        return unpack_codes(packed, 4, True, shape), scale
    if fmt in ("onnx", "onnx_nbits"):
        import onnx
        from onnx import numpy_helper

        tensors = {t.name: t for t in onnx.load(str(out)).graph.initializer}
        if fmt == "onnx":
            codes = numpy_helper.to_array(tensors[f"transformer.{name}.codes"]).astype(np.int32)
            scale = numpy_helper.to_array(tensors[f"transformer.{name}.scale"]).copy()
            return torch.from_numpy(codes), torch.from_numpy(scale)
        packed = torch.from_numpy(numpy_helper.to_array(tensors[f"transformer.{name}.packed"]).copy())
        nibbles = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(rows, -1)[:, :cols]  # low nibble first
        scales = torch.from_numpy(numpy_helper.to_array(tensors[f"transformer.{name}.scales"]).copy())
        return nibbles.to(torch.int32) - 8, scales.reshape(rows, -1)  # MatMulNBits' zero point 8
    if fmt == "gguf":
        tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
        codes, scale, _ = unpack_blocks(tensors[f"{name}.weight"].data, gguf.GGMLQuantizationType.Q4_0, rows, cols)
        return codes, scale
    with safe_open(str(out / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        return f.get_tensor(f"{name}._weight_qdata").to(torch.int32), f.get_tensor(f"{name}._weight_scale")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_holds_the_codes_at_the_learned_scales_exactly(run_dir, cache_dir, tmp_path, fmt):
    suffix = {"safetensors": ".safetensors", "onnx": ".onnx", "onnx_nbits": ".nbits.onnx", "gguf": ".gguf",
              "diffusers": ""}[fmt]
    out = tmp_path / f"student{suffix}"
    export_in_process([f"ckpt={run_dir}", f"format={fmt}", f"out={out}"], cache_dir)
    _, student = rebuilt(run_dir)
    layers = {n: m for n, m in student.named_modules() if isinstance(m, QuantLinear) and m.weight_bits == 4}
    for name, layer in layers.items():
        codes, scale = reference_codes(layer)
        got_codes, got_scale = stored_codes(fmt, out, name, tuple(codes.shape))
        assert torch.equal(got_codes.reshape(codes.shape), codes), (fmt, name)  # atol=0
        assert torch.equal(got_scale.float().reshape(scale.shape), scale), (fmt, name)
    assert int(min(reference_codes(m)[0].min() for m in layers.values())) == -8  # the learned scales clip
