"""Deployment that is really smaller: 16-bit unquantized tensors, quantized 1x1 convolutions in every format,
the packed 4-bit runtime (onnxruntime MatMulNBits), the exported file evaluated as the pipeline's denoiser,
and the refusals of what a format or runtime cannot express."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fraqat_cli.export.example_inputs import example_inputs, relative_difference, student_prediction
from fraqat_cli.export.onnx_graph import export_onnx, run_onnxruntime
from fraqat_cli.export.onnx_nbits import export_nbits, pack_blocks
from fraqat_cli.export.safetensors_file import export_packed, load_packed, round_unquantized
from fraqat_cli.models.loading import load_pipeline
from fraqat_cli.quant import QuantConfig, QuantConv2d, QuantSpec, quantize_model

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPORT_CONFIG = OmegaConf.load(CONF / "export.yaml")
POINTWISE = ("linear", "pointwise_conv")


@pytest.fixture(scope="module")
def sana(tmp_path_factory):
    """(model config, family, teacher transformer, example inputs) of the tiny Sana."""
    model_cfg = OmegaConf.load(CONF / "model" / "tiny_sana.yaml")
    family = instantiate(model_cfg.family)
    pipe = load_pipeline(model_cfg, without=family.text_parts)
    example = example_inputs(model_cfg, pipe, EXPORT_CONFIG.example, str(tmp_path_factory.mktemp("cache")))
    return model_cfg, family, pipe.transformer, example


def student(teacher, layers=POINTWISE, spec: QuantSpec | None = None, include=("*",)):
    """A W4 copy of `teacher` (per-channel unless `spec` says otherwise), every layer of the `layers` kinds."""
    import copy

    model = copy.deepcopy(teacher).float().eval()
    quantize_model(model, QuantConfig(weight=spec or QuantSpec("per_channel"), weight_bits=4, include=include,
                                      layers=layers))
    with torch.no_grad():  # off the teacher's weights, so that a mix-up would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_a_16_bit_file_with_quantized_convolutions_reloads_to_the_deployed_student(sana, dtype, tmp_path):
    _, family, teacher, example = sana
    model = student(teacher, layers=("linear", "pointwise_conv", "depthwise_conv"))
    with torch.no_grad():
        float32_output = student_prediction(model, family, example)
        round_unquantized(model, dtype)
        expected = student_prediction(model, family, example)
    size = export_packed(model, tmp_path / "s.safetensors", {}, dtype=dtype)
    loaded = load_packed(tmp_path / "s.safetensors")
    with torch.no_grad():
        assert relative_difference(student_prediction(loaded.transformer, family, example), expected) == 0
    assert (relative_difference(expected, float32_output) > 0) == (dtype != "float32")
    kinds = {r["kind"] for r in loaded.layers.values()}
    assert kinds == {"linear", "pointwise_conv", "depthwise_conv"}
    assert sum(isinstance(m, QuantConv2d) for m in loaded.transformer.modules()) == sum(
        r["kind"] != "linear" for r in loaded.layers.values())
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        plain = {f.get_tensor(k).dtype for k in f.keys() if not k.endswith((".codes", ".scale", ".offset"))}
    assert plain == {getattr(torch, dtype)} and size.plain_dtype == dtype


def test_16_bit_unquantized_tensors_and_quantized_convolutions_shrink_the_file(sana, tmp_path):
    _, _, teacher, _ = sana
    bf16 = tmp_path / "teacher.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in teacher.state_dict().items()}, str(bf16))
    sizes = {}
    for layers in (("linear",), POINTWISE):
        for dtype in ("float32", "bfloat16"):
            model = student(teacher, layers=layers)
            report = export_packed(model, tmp_path / "s.safetensors", {}, dtype=dtype)
            sizes[layers, dtype] = report.file_bytes
        plain = report.total_params - report.quantized_params  # unquantized parameters: 2 bytes each saved
        saved = sizes[layers, "float32"] - sizes[layers, "bfloat16"]
        assert 2 * plain <= saved <= 2 * plain + 2 * sum(b.numel() for b in teacher.buffers()) + 4096  # + header
    assert sizes[POINTWISE, "bfloat16"] < 0.7 * sizes[("linear",), "bfloat16"]  # a Sana block's 1x1 convolutions
    assert sizes[POINTWISE, "bfloat16"] / bf16.stat().st_size < 0.4  # 0.36 at this tiny width (scales weigh more)


def test_the_qdq_graph_runs_quantized_convolutions_as_the_student(sana, tmp_path):
    _, family, teacher, example = sana
    model = student(teacher, layers=("linear", "pointwise_conv", "depthwise_conv"))
    report = export_onnx(model, family, example, tmp_path / "s.onnx", {})
    with torch.no_grad():
        expected = student_prediction(model, family, example)
    assert relative_difference(run_onnxruntime(tmp_path / "s.onnx", example), expected) < 1e-2
    assert {r["kind"] for r in report["layers"].values()} == {"linear", "pointwise_conv", "depthwise_conv"}


def test_pack_blocks_stores_code_plus_8_two_to_a_byte_low_nibble_first():
    codes = torch.tensor([[-8, 7, 0, -1] + [0] * 12 + [3]])  # 17 columns: a second block, padded with code 0
    packed = pack_blocks(codes, 16)
    assert packed.shape == (1, 2, 8) and packed.dtype == torch.uint8
    assert packed[0, 0, :3].tolist() == [0xF0, 0x78, 0x88]  # (-8, 7) -> 0 | 15 << 4; (0, -1) -> 8 | 7 << 4
    assert packed[0, 1].tolist() == [0x8B] + [0x88] * 7      # (3, pad) -> 11 | 8 << 4


@pytest.mark.parametrize("granularity,group_size", [("per_channel", None), ("per_group", 16)])
def test_the_packed_4bit_runtime_runs_the_student_in_onnxruntime(sana, granularity, group_size, tmp_path):
    import onnx

    _, family, teacher, example = sana
    model = student(teacher, spec=QuantSpec(granularity, group_size))
    with torch.no_grad():
        expected = student_prediction(model, family, example)
    outputs = {}
    for accuracy in (0, 4):
        path = tmp_path / f"s{accuracy}.onnx"
        report = export_nbits(model, family, example, path, {}, block_size=32, accuracy_level=accuracy)
        outputs[accuracy] = relative_difference(run_onnxruntime(path, example), expected)
        graph = onnx.load(str(path))
        nodes = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
        assert len(nodes) == len(report["layers"]) and all(n.domain == "com.microsoft" for n in nodes)
        initializers = {t.name for t in graph.graph.initializer}
        assert not any(n.op_type == "DequantizeLinear" and n.input[0] in initializers for n in graph.graph.node), \
            "no weight is dequantized to float in the graph: the 4-bit codes stay packed"
    assert outputs[0] < EXPORT_CONFIG.tolerance.onnx        # float compute: the QDQ graph's agreement
    assert outputs[4] < EXPORT_CONFIG.tolerance.onnx_nbits  # int8 compute: each activation block re-quantized


def test_a_wrong_weight_layout_is_far_outside_the_runtime_tolerance(sana, tmp_path, monkeypatch):
    import fraqat_cli.export.onnx_nbits as nbits

    _, family, teacher, example = sana
    model = student(teacher)
    with torch.no_grad():
        expected = student_prediction(model, family, example)
    swapped = lambda codes, block: pack_blocks(codes.flip(-1), block)  # noqa: E731  columns reversed
    monkeypatch.setattr(nbits, "pack_blocks", swapped)
    export_nbits(model, family, example, tmp_path / "bad.onnx", {}, block_size=32, accuracy_level=0)
    assert relative_difference(run_onnxruntime(tmp_path / "bad.onnx", example), expected) > \
        3 * EXPORT_CONFIG.tolerance.onnx_nbits


@pytest.mark.parametrize("layers,spec,message", [
    (("linear", "depthwise_conv"), QuantSpec("per_channel"),
     "depthwise_conv layers .* the MatMulNBits runtime .* cannot express; it expresses linear, pointwise_conv"),
    (POINTWISE, QuantSpec("per_channel", symmetric=False), "takes 4-bit symmetric weights"),
    (POINTWISE, QuantSpec("per_group", 8), r"quantizer.group_size=8 is not a MatMulNBits block size"),
])
def test_what_the_runtime_cannot_express_is_refused_and_nothing_written(sana, layers, spec, message, tmp_path):
    _, family, teacher, example = sana
    with pytest.raises(ValueError, match=message):
        export_nbits(student(teacher, layers=layers, spec=spec), family, example, tmp_path / "s.onnx", {})
    assert list(tmp_path.iterdir()) == []


def rewrite(path: Path, tensors=None, **metadata) -> None:
    with safe_open(str(path), "pt") as f:
        meta = {**f.metadata(), **metadata}
    save_file(tensors if tensors is not None else load_file(str(path)), str(path), metadata=meta)


def test_a_file_of_another_fraqat_version_is_refused_with_its_name(sana, tmp_path):
    path = tmp_path / "old.safetensors"
    export_packed(student(sana[2]), path, {})
    rewrite(path, format="fraqat-packed/1", fraqat_version="0.0.9")
    with pytest.raises(ValueError, match=r"old.safetensors' was written by another fraqat version "
                                         r"\(format 'fraqat-packed/1', fraqat 0.0.9\)"):
        load_packed(path)


@pytest.mark.parametrize("dropped", ["transformer_blocks.0.ff.conv_inverted.weight.scale", "caption_norm.weight",
                                     "proj_out.bias"])
def test_a_file_missing_a_tensor_names_the_file_and_the_tensor(sana, dropped, tmp_path):
    path = tmp_path / "cut.safetensors"
    export_packed(student(sana[2]), path, {})
    tensors = load_file(str(path))
    if dropped not in tensors:
        pytest.fail(f"{dropped} is not in the export: {sorted(tensors)[:8]}")
    del tensors[dropped]
    rewrite(path, tensors)
    with pytest.raises(ValueError, match=f"cut.safetensors' lacks tensor '{dropped}'"):
        load_packed(path)


def test_an_onnx_file_without_onnxruntime_says_how_to_install_it(monkeypatch, tmp_path):
    from fraqat_cli.export.exported_denoiser import OnnxDenoiser

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(ModuleNotFoundError, match="pip install onnxruntime"):
        OnnxDenoiser(tmp_path / "student.onnx", config={})


def test_an_export_resolves_as_an_eval_target_with_its_model_config(sana, tmp_path):
    from fraqat_cli.evaluate.targets import resolve_targets

    model_cfg = sana[0]
    info = {"model": "tiny_sana", "schedule": "fractional", "granularity": "per_channel", "step": 4,
            "weight_bits": 4.0, "model_config": OmegaConf.to_container(model_cfg)}
    path = tmp_path / "student.safetensors"
    export_packed(student(sana[2]), path, info)
    (target,) = resolve_targets(str(path), None)
    assert target.artifact == path and not target.is_teacher and target.weight_bits == 4.0
    assert target.config.model.name == "tiny_sana" and target.config.schedule.name == "fractional"
    with pytest.raises(ValueError, match="holds a student of model 'tiny_sana', not of model='toy'"):
        resolve_targets(str(path), OmegaConf.create({"name": "toy"}))
    export_packed(student(sana[2]), tmp_path / "bare.safetensors", {"model": "tiny_sana"})
    with pytest.raises(ValueError, match="without its model config"):
        resolve_targets(str(tmp_path / "bare.safetensors"), None)


def test_the_onnx_denoiser_stands_in_for_the_transformer_at_any_batch(sana, tmp_path):
    from fraqat_cli.export.exported_denoiser import OnnxDenoiser

    _, family, teacher, example = sana
    model = student(teacher)
    export_onnx(model, family, example, tmp_path / "s.onnx", {})
    denoiser = OnnxDenoiser(tmp_path / "s.onnx", teacher.config)
    rows = [0, 1, 1, 0, 1]  # five rows through a graph traced at two
    batch = {k: v[rows] for k, v in example.items()}
    kwargs = family.transformer_kwargs(batch["latents"], batch["timestep"],
                                       {k: v for k, v in batch.items() if k not in ("latents", "timestep")})
    got = denoiser(**kwargs, return_dict=False)[0]
    with torch.no_grad():
        expected = student_prediction(model, family, batch)
    assert got.shape == expected.shape and relative_difference(got, expected) < 1e-2
    assert denoiser.config.in_channels == teacher.config.in_channels  # the pipeline reads it
