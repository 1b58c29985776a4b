"""fraqat-export: integer codes that rebuild the fake-quantized student exactly, ONNX QDQ graphs that
onnxruntime runs to the student's output, and refusals of what cannot deploy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from train_support import quantizer_preset

from fraqat_cli.export.example_inputs import example_inputs, relative_difference, student_prediction
from fraqat_cli.export.safetensors_file import export_packed, load_packed, read_metadata
from fraqat_cli.models.loading import load_pipeline
from fraqat_cli.quant import QuantSpec, set_weight_bits
from fraqat_cli.quant.fake_quant import code_range, dequantize_codes, fake_quantize_spec, quantize_to_codes
from fraqat_cli.quant.packing import pack_codes, storage_of, unpack_codes
from fraqat_cli.student.build import build_student

CONF = Path(__file__).resolve().parents[1] / "conf"
FAMILIES = ["tiny_sana", "tiny_pixart", "tiny_sd3", "tiny_flux"]
EXPORT_CONFIG = OmegaConf.load(CONF / "export.yaml")


# --- integer codes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity,group_size", [("per_tensor", None), ("per_channel", None), ("per_group", 16)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("rounding", ["floor", "nearest", "nearest_int_range"])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8, 12, 16])
def test_codes_dequantize_to_exactly_the_fake_quantized_weight(granularity, group_size, symmetric, rounding, bits):
    spec = QuantSpec(granularity, group_size, symmetric, rounding)
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(bits)) * 0.05
    codes, scale, offset = quantize_to_codes(weight, bits, spec)
    low, high = code_range(bits, symmetric, rounding)
    assert codes.dtype == torch.int32 and low <= int(codes.min()) and int(codes.max()) <= high
    expected_scales = {"per_tensor": (1,), "per_channel": (24,), "per_group": (24, 4)}[granularity]
    assert tuple(scale.shape) == expected_scales
    assert (offset is None) == symmetric
    assert torch.equal(dequantize_codes(codes, scale, offset, spec), fake_quantize_spec(weight, bits, spec))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8, 9, 16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("numel", [1, 7, 64])
def test_packed_codes_unpack_to_the_same_codes(bits, symmetric, numel):
    low, high = code_range(bits, symmetric)
    codes = torch.randint(low, high + 1, (numel,), generator=torch.Generator().manual_seed(numel))
    codes[0] = low  # the extremes of the range survive packing
    if numel > 1:
        codes[-1] = high
    stored = pack_codes(codes, bits, symmetric)
    assert torch.equal(unpack_codes(stored, bits, symmetric, (numel,)), codes.to(torch.int32))
    if bits <= 4:
        assert stored.dtype == torch.uint8 and stored.numel() == (numel + 1) // 2  # two codes to a byte
    else:
        assert stored.dtype == getattr(torch, storage_of(bits, symmetric))


def test_codes_outside_their_range_are_refused():
    with pytest.raises(ValueError, match=r"outside the 4-bit range \[-8, 7\]"):
        pack_codes(torch.tensor([0, 8]), 4, True)
    with pytest.raises(ValueError, match=r"outside the 4-bit range \[-8, 7\]"):
        pack_codes(torch.tensor([-9, 0]), 4, True)
    assert torch.equal(unpack_codes(pack_codes(torch.tensor([-8, 7]), 4, True), 4, True, (2,)),
                       torch.tensor([-8, 7], dtype=torch.int32))  # a clipping learned scale reaches -8


def test_full_precision_has_no_codes():
    with pytest.raises(ValueError, match="full precision"):
        quantize_to_codes(torch.randn(4, 4), None, QuantSpec())


# --- the safetensors format on every tiny family -------------------------------------------------------------


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """Per tiny family: (model config, family, teacher transformer, example inputs)."""
    cache = tmp_path_factory.mktemp("export-cache")
    out = {}
    for name in FAMILIES:
        model_cfg = OmegaConf.load(CONF / "model" / f"{name}.yaml")
        family = instantiate(model_cfg.family)
        pipe = load_pipeline(model_cfg, without=family.text_parts)
        example = example_inputs(model_cfg, pipe, EXPORT_CONFIG.example, str(cache))
        out[name] = (model_cfg, family, pipe.transformer, example)
    return out


def quantized_student(teacher, model_cfg, quantizer: str, bits: float = 4, **overrides):
    quantizer_cfg = OmegaConf.merge(quantizer_preset(quantizer), overrides)
    student, _ = build_student(teacher, quantizer_cfg, None, start_bits=bits)
    with torch.no_grad():  # move the weights off the teacher's, so that a mix-up would show
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return student.eval()


@pytest.mark.parametrize("quantizer", ["per_tensor", "per_channel", "per_group"])
@pytest.mark.parametrize("name", FAMILIES)
def test_safetensors_round_trip_computes_what_the_student_computes(families, name, quantizer, tmp_path):
    model_cfg, family, teacher, example = families[name]
    student = quantized_student(teacher, model_cfg, quantizer)
    path = tmp_path / "student.safetensors"
    size = export_packed(student, path, {"model": name})
    loaded = load_packed(path)
    with torch.no_grad():
        expected = student_prediction(student, family, example)
        got = student_prediction(loaded.transformer, family, example)
    assert relative_difference(got, expected) < 1e-6
    assert type(loaded.transformer) is type(teacher) and loaded.info == {"model": name}
    layers = json.loads(read_metadata(path)["layers"])
    assert layers and all(r["bits"] == 4 and r["storage"] == "int4" and r["granularity"] == quantizer
                          for r in layers.values())
    assert size.file_bytes == path.stat().st_size and size.of_float32 < 1


def test_asymmetric_weights_store_an_offset_and_still_round_trip(families, tmp_path):
    model_cfg, family, teacher, example = families["tiny_pixart"]
    student = quantized_student(teacher, model_cfg, "per_channel", symmetric=False, activation_symmetric=False)
    export_packed(student, tmp_path / "s.safetensors", {})
    from safetensors import safe_open

    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.endswith(".weight.offset") for k in keys)
    with torch.no_grad():
        difference = relative_difference(student_prediction(load_packed(tmp_path / "s.safetensors").transformer,
                                                             family, example),
                                          student_prediction(student, family, example))
    assert difference < 1e-6


def test_eight_bit_layers_keep_int8_codes(families, tmp_path):
    model_cfg, _, teacher, _ = families["tiny_sana"]
    student = quantized_student(teacher, model_cfg, "per_channel", bits=8)
    export_packed(student, tmp_path / "s.safetensors", {})
    layers = json.loads(read_metadata(tmp_path / "s.safetensors")["layers"])
    assert {r["storage"] for r in layers.values()} == {"int8"}


@pytest.mark.parametrize("bits,message", [(5.5, "fractional weight bit-width"), (None, "not a quantized student")])
def test_fractional_and_full_precision_students_are_refused(families, tmp_path, bits, message):
    model_cfg, _, teacher, _ = families["tiny_sana"]
    student = quantized_student(teacher, model_cfg, "per_channel")
    set_weight_bits(student, bits)
    with pytest.raises(ValueError, match=message):
        export_packed(student, tmp_path / "s.safetensors", {})
    assert not list(tmp_path.iterdir())


def test_a_file_that_is_not_an_export_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a fraqat export"):
        load_packed(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_packed(tmp_path / "missing.safetensors")


def test_per_channel_w4_file_is_at_most_0_14_of_float32_on_a_few_million_parameters(tmp_path):
    """Issue 6's size target, on a 7 M-parameter PixArt with every linear layer at 4 bits."""
    from diffusers import PixArtTransformer2DModel

    from fraqat_cli.quant import QuantConfig, quantize_model

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(num_attention_heads=8, attention_head_dim=32, in_channels=4, out_channels=8,
                                     num_layers=6, cross_attention_dim=256, sample_size=16, patch_size=2,
                                     caption_channels=256)
    summary = quantize_model(model, QuantConfig(weight=QuantSpec("per_channel"), weight_bits=4, include=("*",)))
    size = export_packed(model, tmp_path / "s.safetensors", {})
    assert summary.total_params > 5_000_000
    assert size.of_float32 <= 0.14, str(size)
    assert size.float32_bytes >= 4 * summary.total_params  # the comparison counts every float32 tensor


# --- ONNX --------------------------------------------------------------------------------------------------


def onnx_graph_facts(path: Path) -> dict:
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    int4 = [t for t in model.graph.initializer if t.data_type in (TensorProto.INT4, TensorProto.UINT4)]
    blocked = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" for a in n.attribute)]
    return {"quantize": ops.count("QuantizeLinear"), "dequantize": ops.count("DequantizeLinear"),
            "int4": len(int4), "blocked": len(blocked), "opset": model.opset_import[0].version,
            "reduce_max": ops.count("ReduceMax")}


@pytest.mark.parametrize("name,quantizer,overrides", [
    ("tiny_pixart", "per_group", {}),
    ("tiny_sd3", "per_channel", {}),
    ("tiny_flux", "per_tensor", {}),
    ("tiny_pixart", "per_channel", {"symmetric": False, "activation_symmetric": False}),
])
def test_onnx_qdq_graph_runs_in_onnxruntime_as_the_student(families, tmp_path, name, quantizer, overrides):
    from fraqat_cli.export.onnx_graph import OPSET, export_onnx, run_onnxruntime

    model_cfg, family, teacher, example = families[name]
    student = quantized_student(teacher, model_cfg, quantizer, **overrides)
    report = export_onnx(student, family, example, tmp_path / "s.onnx", {"model": name})
    facts = onnx_graph_facts(tmp_path / "s.onnx")
    layers = len(report["layers"])
    assert facts["int4"] >= 1 and facts["opset"] == OPSET
    assert facts["dequantize"] >= layers + facts["quantize"] and facts["quantize"] >= 1
    assert facts["blocked"] == (layers if quantizer == "per_group" else 0)
    with torch.no_grad():
        expected = student_prediction(student, family, example)
    assert relative_difference(run_onnxruntime(tmp_path / "s.onnx", example), expected) < \
        EXPORT_CONFIG.tolerance.onnx


def test_onnx_refuses_activations_it_cannot_express(families, tmp_path):
    from fraqat_cli.export.onnx_graph import export_onnx

    model_cfg, family, teacher, example = families["tiny_sana"]
    student = quantized_student(teacher, model_cfg, "per_channel", activation_rounding="floor")
    with pytest.raises(ValueError, match="activation_rounding=nearest"):
        export_onnx(student, family, example, tmp_path / "s.onnx", {})
    assert not (tmp_path / "s.onnx").exists()


@pytest.mark.parametrize("rounding, lowest", [("nearest", -127), ("nearest_int_range", -128)])
def test_static_activations_past_their_range_saturate_in_the_graph_where_the_student_does(tmp_path, rounding, lowest):
    """Below a calibrated symmetric range `nearest` stops at code -127 and `nearest_int_range` at int8's -128;
    the whole-model check's tolerance cannot see one code, so one layer, exactly."""
    from torch import nn

    from fraqat_cli.export.onnx_graph import OPSET, QDQLayer, run_onnxruntime
    from fraqat_cli.quant import QuantLinear

    layer = QuantLinear.from_linear(nn.Linear(4, 1, bias=False), weight_spec=QuantSpec("per_tensor"), weight_bits=8,
                                    activation_spec=QuantSpec("per_tensor", rounding=rounding),
                                    static_activations=True)
    layer.input_quantizer.range_min.fill_(-1.0)
    layer.input_quantizer.range_max.fill_(1.0)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))  # the output is the first input, dequantized
    x = torch.tensor([[-1.5, 0.0, 0.0, 0.0], [1.5, 0.0, 0.0, 0.0], [0.3, 0.0, 0.0, 0.0]])  # (3, 4)
    torch.onnx.export(QDQLayer(layer, "layer").eval(), (x,), dynamo=True, opset_version=OPSET, input_names=["x"],
                      verbose=False).save(str(tmp_path / "layer.onnx"))
    with torch.no_grad():
        expected = layer(x)
    assert (expected[0] * 127).round().item() == lowest
    assert torch.equal(run_onnxruntime(tmp_path / "layer.onnx", {"x": x}), expected)


def test_int4_codes_in_the_graph_are_the_exported_codes(families, tmp_path):
    import onnx
    from onnx import numpy_helper

    from fraqat_cli.export.onnx_graph import export_onnx

    model_cfg, family, teacher, example = families["tiny_sd3"]
    student = quantized_student(teacher, model_cfg, "per_channel")
    export_onnx(student, family, example, tmp_path / "s.onnx", {})
    graph = {t.name: t for t in onnx.load(str(tmp_path / "s.onnx")).graph.initializer}
    name, layer = next((n, m) for n, m in student.named_modules() if hasattr(m, "weight_quantizer"))
    stored = next(t for k, t in graph.items() if k.endswith(f"{name}.codes"))
    codes, _, _ = quantize_to_codes(layer.weight, 4, layer.weight_quantizer.spec)
    assert np.array_equal(numpy_helper.to_array(stored).astype(np.int32), codes.numpy())


def test_calibrated_static_activations_travel_in_both_formats(families, tmp_path):
    """The paper's phone setting: fixed activation ranges, stored in the metadata and as constant ONNX scales."""
    from fraqat_cli.export.onnx_graph import export_onnx, run_onnxruntime
    from fraqat_cli.quant import calibrate_activations

    model_cfg, family, teacher, example = families["tiny_sd3"]
    student = quantized_student(teacher, model_cfg, "per_channel", static_activations=True)
    with torch.no_grad(), calibrate_activations(student):
        student_prediction(student, family, example)
    export_packed(student, tmp_path / "s.safetensors", {})
    layers = json.loads(read_metadata(tmp_path / "s.safetensors")["layers"])
    assert all(r["activation"]["static"] and r["activation"]["range"][0] < r["activation"]["range"][1]
               for r in layers.values())
    export_onnx(student, family, example, tmp_path / "s.onnx", {})
    with torch.no_grad():
        expected = student_prediction(student, family, example)
        assert relative_difference(student_prediction(load_packed(tmp_path / "s.safetensors").transformer, family,
                                                      example), expected) < 1e-6
    assert relative_difference(run_onnxruntime(tmp_path / "s.onnx", example), expected) < EXPORT_CONFIG.tolerance.onnx
    assert onnx_graph_facts(tmp_path / "s.onnx")["reduce_max"] == 0  # constant scales: nothing measured at run time


def test_a_graph_past_the_single_file_limit_keeps_its_tensors_beside_it(families, tmp_path):
    from fraqat_cli.export.onnx_graph import export_onnx, run_onnxruntime

    model_cfg, family, teacher, example = families["tiny_flux"]
    student = quantized_student(teacher, model_cfg, "per_channel")
    report = export_onnx(student, family, example, tmp_path / "s.onnx", {}, single_file_limit=0)
    assert report["data_file"] == "s.onnx.data" and (tmp_path / "s.onnx.data").stat().st_size > \
        (tmp_path / "s.onnx").stat().st_size
    with torch.no_grad():
        expected = student_prediction(student, family, example)
    assert relative_difference(run_onnxruntime(tmp_path / "s.onnx", example), expected) < EXPORT_CONFIG.tolerance.onnx


def test_a_graph_without_its_activation_quantizers_is_refused(families, tmp_path, monkeypatch):
    """An output comparison cannot see a missing 8-bit activation quantizer (too small an effect); the graph
    check does."""
    from fraqat_cli.export.onnx_graph import QDQLayer, export_onnx

    model_cfg, family, teacher, example = families["tiny_pixart"]
    student = quantized_student(teacher, model_cfg, "per_channel")
    monkeypatch.setattr(QDQLayer, "_activation", lambda self, x: x)
    with pytest.raises(RuntimeError, match="multiply dequantized weights by dequantized activations"):
        export_onnx(student, family, example, tmp_path / "s.onnx", {})
    assert not (tmp_path / "s.onnx").exists()
