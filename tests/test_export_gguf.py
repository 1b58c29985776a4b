"""`fraqat-export format=gguf`: the student's own codes in GGUF blocks, loaded by diffusers' `from_single_file` in a
process that never imports fraqat, computing what the student computes; the original checkpoint layout; refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from test_export_cli import edited_checkpoint, export_in_process, fraqat_export
from train_support import FAST, cli_env, quantizer_preset, train_sweep

from fraqat_cli.export.gguf_blocks import BLOCK, pack_blocks, unpack_blocks
from fraqat_cli.quant import QuantSpec
from fraqat_cli.quant.fake_quant import dequantize_codes, fake_quantize_spec, quantize_to_codes

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPORT_CONFIG = OmegaConf.load(CONF / "export.yaml")
FAMILIES = {"tiny_flux": "FluxTransformer2DModel", "tiny_sd3": "SD3Transformer2DModel",
            "tiny_sana": "SanaTransformer2DModel"}
Q = gguf.GGMLQuantizationType
# diffusers dequantizes a block in float16 (quantizers/gguf/utils.py: `d.view(torch.float16)` times the codes, no
# dtype given), so each weight it computes is the exact codes x scale rounded to the nearest float16: at most half
# a unit in the last place, 2^-11 of the weight (2^-25 absolute below float16's normal range).
LOADER_ROUNDING = 2.0**-11


# --- blocks and fp16 scales: no model ----------------------------------------------------------------------------


@pytest.mark.parametrize("qtype,low,high", [(Q.Q4_0, -8, 7), (Q.Q4_1, 0, 15), (Q.Q5_0, -16, 15), (Q.Q5_1, 0, 31),
                                            (Q.Q8_0, -127, 127)], ids=lambda v: getattr(v, "name", None))
def test_packed_blocks_read_back_through_ggufs_own_dequantizer(qtype, low, high):
    g = torch.Generator().manual_seed(int(qtype))
    codes = torch.randint(low, high + 1, (3, 2 * BLOCK), generator=g)
    codes[0, 0], codes[-1, -1] = low, high  # the extremes of the range survive packing
    scale = (torch.rand(3, 2, generator=g) * 0.01).half().float()
    offset = (torch.randn(3, 2, generator=g) * 0.01).half().float() if qtype in (Q.Q4_1, Q.Q5_1) else None
    blocks = pack_blocks(codes, scale, offset, qtype)
    assert blocks.shape == (3, 2 * gguf.GGML_QUANT_SIZES[qtype][1]) and blocks.dtype == np.uint8
    expected = codes.float().reshape(3, 2, BLOCK) * scale.unsqueeze(-1)
    if offset is not None:
        expected = expected + offset.unsqueeze(-1)
    assert np.array_equal(gguf.quants.dequantize(blocks, qtype), expected.reshape(3, -1).numpy())
    got_codes, got_scale, got_offset = unpack_blocks(blocks, qtype, 3, 2 * BLOCK)
    assert torch.equal(got_codes, codes.int()) and torch.equal(got_scale, scale)
    assert (got_offset is None) == (offset is None) and (offset is None or torch.equal(got_offset, offset))


@pytest.mark.parametrize("granularity,group_size", [("per_tensor", None), ("per_channel", None), ("per_group", 32)])
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
def test_fp16_scales_sit_on_the_half_grid_and_codes_still_dequantize_exactly(granularity, group_size, symmetric):
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(0)) * 0.05
    spec = QuantSpec(granularity, group_size, symmetric, scale_dtype="float16")
    codes, scale, offset = quantize_to_codes(weight, 4, spec)
    assert torch.equal(scale.half().float(), scale)
    assert offset is None or torch.equal(offset.half().float(), offset)
    assert torch.equal(dequantize_codes(codes, scale, offset, spec), fake_quantize_spec(weight, 4, spec))
    float32_codes, float32_scale, _ = quantize_to_codes(weight, 4, QuantSpec(granularity, group_size, symmetric))
    assert 0 < (scale - float32_scale).abs().max() <= float32_scale.abs().max() * 2.0**-11  # nudged to the grid
    assert (codes != float32_codes).float().mean() < 0.01  # and a code flips only right at a rounding boundary


def test_a_quantizer_config_saved_before_scale_dtype_keeps_float32_scales():
    from fraqat_cli.student.build import build_quant_config

    preset = OmegaConf.to_container(quantizer_preset("per_group"), resolve=True)
    assert build_quant_config({**preset, "scale_dtype": "float16"}).weight.scale_dtype == "float16"
    del preset["scale_dtype"]  # a checkpoint written before the key existed
    assert build_quant_config(preset).weight.scale_dtype == "float32"


# --- the original layout against diffusers' own conversion tables ------------------------------------------------


def original_state(state: dict, arch: str, num_layers: int) -> dict:
    """`state` under the original names, fused and swapped as the GGUF writer lays its blocks out."""
    from fraqat_cli.export.gguf_keys import original_layout

    out = {}
    for tensor in original_layout(list(state), arch, num_layers):
        value = torch.cat([state[p] for p in tensor.parts])
        if tensor.swap_halves:
            first, second = value.chunk(2)
            value = torch.cat([second, first])
        out[tensor.name] = value
    return out


def test_original_layout_is_what_diffusers_converts_back_to_its_own_names():
    """diffusers' converters (single_file_utils) are the reference: they must give back every tensor, unchanged.
    SD3 with dual attention and qk norm on real values; FLUX at FLUX.1's width (its converter assumes 3072) on the
    meta device, where shapes are all there is."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers,
        convert_sd3_transformer_checkpoint_to_diffusers,
    )

    torch.manual_seed(0)
    sd3 = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=32,
                                num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=64,
                                pooled_projection_dim=32, out_channels=4, pos_embed_max_size=32,
                                dual_attention_layers=(0,), qk_norm="rms_norm").state_dict()
    original = original_state(sd3, "sd3", 3)
    assert {"joint_blocks.0.x_block.attn.qkv.weight", "joint_blocks.0.x_block.attn2.qkv.weight",
            "final_layer.adaLN_modulation.1.weight", "pos_embed"} <= set(original)
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    assert set(back) == set(sd3) and all(torch.equal(back[k], sd3[k]) for k in sd3)

    with torch.device("meta"):
        flux = FluxTransformer2DModel(num_layers=1, num_single_layers=2, attention_head_dim=128,
                                      num_attention_heads=24, joint_attention_dim=64, pooled_projection_dim=32,
                                      in_channels=16).state_dict()
    original = original_state(flux, "flux", 1)
    assert {"double_blocks.0.img_attn.qkv.weight", "single_blocks.1.linear1.weight", "img_in.weight"} <= set(original)
    back = convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    assert set(back) == set(flux) and all(back[k].shape == flux[k].shape for k in flux)


# --- trained students through the real CLI, loaded by diffusers without fraqat ------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """One tiny student per GGUF family (one `fraqat-train --multirun`), W4 per-group-32 on the fp16 scale grid."""
    sweep = train_sweep(tmp_path_factory.mktemp("gguf"), cache_dir,
                        [f"model={','.join(FAMILIES)}", *FAST[1:], "quantizer=per_group",
                         "quantizer.scale_dtype=float16"])
    jobs = sorted(sweep.glob("*/checkpoints/last.ckpt"), key=lambda p: int(p.parent.parent.name.split("-")[0]))
    assert len(jobs) == len(FAMILIES)
    return dict(zip(FAMILIES, (job.parent.parent for job in jobs)))


@pytest.fixture(scope="module")
def exports(runs, cache_dir, tmp_path_factory):
    """(family, layout) -> the .gguf file: tiny_flux through the real `fraqat-export`, the others in process."""
    work = tmp_path_factory.mktemp("gguf-exports")
    result = fraqat_export([f"ckpt={runs['tiny_flux']}", "format=gguf"], work, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Q4_0" in result.stdout and "the student's weights kept exactly" in result.stdout
    files = {("tiny_flux", "diffusers"): runs["tiny_flux"] / "export" / "student.gguf"}
    for name, layout in [("tiny_sd3", "diffusers"), ("tiny_sd3", "original"), ("tiny_sana", "diffusers")]:
        out = work / f"{name}-{layout}.gguf"
        export_in_process([f"ckpt={runs[name]}", "format=gguf", f"layout={layout}", f"out={out}"], cache_dir)
        files[name, layout] = out
    return files


def stored_student(run_dir: Path, cache_dir: Path):
    """(the run's student as the GGUF holds it, its family, its transformer kwargs on the export's example):
    unquantized tensors in float16 (what `dtype=auto` ships for a float32 model), activations unquantized."""
    from fraqat_cli.export.example_inputs import example_inputs
    from fraqat_cli.export.safetensors_file import round_unquantized
    from fraqat_cli.models.conditioning import conditioning_of
    from fraqat_cli.models.loading import family_of, load_model
    from fraqat_cli.quant import set_activation_bits
    from fraqat_cli.student.build import model_skeleton
    from fraqat_cli.student.checkpoint import StudentCheckpoint
    from fraqat_cli.student.rebuild import rebuild_student

    stored = StudentCheckpoint.read(run_dir / "checkpoints" / "last.ckpt")
    family = family_of(stored.config.model)
    pipe = load_model(stored.config.model).pipe
    example = example_inputs(stored.config.model, pipe, EXPORT_CONFIG.example, str(cache_dir))
    student = rebuild_student(stored, model_skeleton(pipe.transformer)).eval()
    round_unquantized(student, "float16")
    set_activation_bits(student, None)
    return student, family, family.transformer_kwargs(example["latents"], example["timestep"], conditioning_of(example))


LOADER = r"""
import json, sys
import diffusers, gguf, torch
from diffusers.quantizers.gguf.utils import GGUFLinear, dequantize_gguf_tensor

results = {}
for key, case in json.load(open(sys.argv[1])).items():
    cls = getattr(diffusers, case["class"])
    quantization = diffusers.GGUFQuantizationConfig(compute_dtype=torch.float32)
    model = cls.from_single_file(case["file"], config=case["config"], subfolder="transformer",
                                 quantization_config=quantization, torch_dtype=torch.float32)
    with torch.no_grad():
        output = model(**torch.load(case["inputs"], weights_only=True), return_dict=False)[0]
    tensors = {t.name: t for t in gguf.GGUFReader(case["file"]).tensors}
    worst, layers = 0.0, 0
    for name, module in model.named_modules():
        if isinstance(module, GGUFLinear) and name + ".weight" in tensors:  # the diffusers layout names them
            loaded = dequantize_gguf_tensor(module.weight)
            exact = torch.from_numpy(gguf.quants.dequantize(tensors[name + ".weight"].data, module.weight.quant_type))
            bound = exact.abs() * 2.0**-11 + 2.0**-25
            worst, layers = max(worst, float(((loaded.float() - exact).abs() / bound).max())), layers + 1
    results[key] = {"output": output, "gguf_linears": sum(isinstance(m, GGUFLinear) for m in model.modules()),
                    "checked_layers": layers, "worst_rounding_over_bound": worst}
torch.save(results, sys.argv[2])
assert "fraqat_cli" not in sys.modules, "the loader process imported fraqat"
"""


@pytest.fixture(scope="module")
def loaded(runs, exports, cache_dir, tmp_path_factory):
    """Every export loaded by diffusers' `from_single_file` in one fresh process that never imports fraqat; the
    students' own outputs (computed here) beside the loaded models' ones."""
    work = tmp_path_factory.mktemp("gguf-load")
    cases, expected = {}, {}
    for (name, layout), file in exports.items():
        student, family, kwargs = stored_student(runs[name], cache_dir)
        with torch.no_grad():
            expected[name, layout] = student(**kwargs, return_dict=False)[0]
        key = f"{name}-{layout}"
        torch.save(kwargs, work / f"{key}.pt")
        config = work / key / "transformer"
        config.mkdir(parents=True)
        plain = json.dumps(dict(student.config), default=OmegaConf.to_container)  # tiny configs hold ListConfigs
        (config / "config.json").write_text(plain)  # the local config folder a user passes as config=
        cases[key] = {"class": FAMILIES[name], "file": str(file), "config": str(config.parent),
                      "inputs": str(work / f"{key}.pt")}
    (work / "cases.json").write_text(json.dumps(cases))
    result = subprocess.run([sys.executable, "-c", LOADER, str(work / "cases.json"), str(work / "out.pt")],
                            env=cli_env(cache_dir), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(work / "out.pt", weights_only=True)
    return {(name, layout): (expected[name, layout], got[f"{name}-{layout}"]) for name, layout in exports}


@pytest.mark.slow
def test_diffusers_loads_each_gguf_without_fraqat_and_computes_what_the_student_computes(loaded):
    from fraqat_cli.export.example_inputs import relative_difference

    for (name, layout), (expected, got) in loaded.items():
        assert got["gguf_linears"] > 0, (name, layout)  # loaded as quantized GGUFLinear layers, not dequantized
        if layout == "diffusers":
            assert got["checked_layers"] == got["gguf_linears"] and got["worst_rounding_over_bound"] <= 1.0
        # Each weight off by at most LOADER_ROUNDING of itself; the outputs move by less (2e-5 to 1.5e-4 measured).
        difference = relative_difference(got["output"], expected)
        assert difference < 4 * LOADER_ROUNDING, (name, layout, difference)
        assert difference <= EXPORT_CONFIG.tolerance.gguf


@pytest.mark.slow
def test_the_file_holds_the_students_own_codes_and_fp16_scales_exactly(runs, exports, cache_dir):
    from fraqat_cli.quant import QuantLinear

    for name in FAMILIES:
        student, _, _ = stored_student(runs[name], cache_dir)
        tensors = {t.name: t for t in gguf.GGUFReader(str(exports[name, "diffusers"])).tensors}
        layers = {n: m for n, m in student.named_modules() if isinstance(m, QuantLinear) and m.weight_bits == 4}
        assert layers
        for layer_name, layer in layers.items():
            stored = tensors[f"{layer_name}.weight"]
            assert stored.tensor_type == Q.Q4_0
            with torch.no_grad():
                weight = layer.quantize_weight()  # the student's fake-quantized weight (scales on the fp16 grid)
            read = gguf.quants.dequantize(stored.data, stored.tensor_type)
            assert np.array_equal(read, weight.numpy()), layer_name  # atol=0
            codes, scale, _ = quantize_to_codes(weight, 4, layer.weight_quantizer.spec)
            got_codes, got_scale, _ = unpack_blocks(stored.data, Q.Q4_0, *weight.shape)
            assert torch.equal(got_scale, scale) and torch.equal(got_codes, codes), layer_name


@pytest.mark.slow
def test_the_report_says_what_gguf_kept_and_what_it_dropped(runs, exports):
    report = json.loads((runs["tiny_flux"] / "export" / "student.gguf.json").read_text())
    assert report["format"] == "gguf" and report["layout"] == "diffusers" and report["tensor_types"] == ["F16", "Q4_0"]
    assert report["weights_exact"] is True and report["fp16_scales_moved"] == 0.0
    assert report["activation_quantizer_dropped"] > 0  # the 8-bit activation quantizer has no GGUF form
    assert report["check"]["relative_difference"] < report["check"]["tolerance"]
    assert report["size"]["file_bytes"] == exports["tiny_flux", "diffusers"].stat().st_size
    assert not list((runs["tiny_flux"] / "export").glob(".*"))  # no partial file left behind
    card = (runs["tiny_flux"] / "export" / "README.md").read_text()  # the Hub's model card beside the file
    assert card.startswith("---\nlibrary_name: diffusers\npipeline_tag: text-to-image\n")
    assert "student.gguf" in card and "from_single_file" in card and "README.md" in report["files"]


# --- what GGUF cannot take -----------------------------------------------------------------------------------------


def test_an_unknown_layout_exits_2_with_one_line_and_writes_nothing(runs, cache_dir, tmp_path):
    result = fraqat_export([f"ckpt={runs['tiny_sd3']}", "format=gguf", "layout=fused"], tmp_path, cache_dir)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "fraqat-export: error: layout='fused' is not offered for format=gguf; allowed: diffusers, original" \
        in result.stderr
    assert "Traceback" not in result.stderr and not list(tmp_path.iterdir())


def edited_config(run_dir: Path, folder: Path, **quantizer) -> Path:
    """A copy of the run whose stored quantizer config says `quantizer` (as a run trained so would)."""
    from fraqat_cli.student.checkpoint import RECORD

    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    state[RECORD]["config"]["quantizer"].update(quantizer)
    (folder / "checkpoints").mkdir(parents=True)
    torch.save(state, folder / "checkpoints" / "last.ckpt")
    return folder


@pytest.mark.parametrize("name,args,make,messages", [
    ("tiny_flux", ["layout=original"], None, ["layout=original needs FLUX.1's width 3072", "use layout=diffusers"]),
    ("tiny_sana", ["layout=original"], None, ["layout=original is offered for flux, sd3", "not sana"]),
    ("tiny_sd3", [], lambda run, folder: edited_config(run, folder, group_size=16),
     ["quantizer.group_size=16 does not divide into GGUF's 32-wide blocks", "allowed: a multiple of 32"]),
    ("tiny_sd3", [], lambda run, folder: edited_checkpoint(run, folder, 5.5),
     ["fractional weight bit-width (5.5 bits", "only integer bit-widths deploy"]),
], ids=["flux-original-tiny", "sana-original", "group-16", "fractional"])
def test_what_gguf_cannot_express_is_refused_naming_what_is_allowed(runs, cache_dir, tmp_path, name, args, make,
                                                                   messages):
    run = make(runs[name], tmp_path / "run") if make else runs[name]
    out = tmp_path / "out" / "student.gguf"
    with pytest.raises(ValueError) as error:
        export_in_process([f"ckpt={run}", "format=gguf", f"out={out}", *args], cache_dir)
    assert all(m in str(error.value) for m in messages), str(error.value)
    assert not out.parent.exists() or not list(out.parent.iterdir())


def test_pixart_is_refused_with_a_pointer_to_the_diffusers_folder(tmp_path):
    from diffusers import PixArtTransformer2DModel

    from fraqat_cli.export.gguf import write_gguf
    from fraqat_cli.quant import QuantConfig, quantize_model

    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8,
                                     num_layers=1, cross_attention_dim=64, sample_size=16, patch_size=2,
                                     caption_channels=32)
    quantize_model(model, QuantConfig(weight=QuantSpec("per_group", 32), weight_bits=4))
    with pytest.raises(ValueError, match="PixArt has no GGUF loader in diffusers.*export format=diffusers"):
        write_gguf(model, None, {}, tmp_path / "s.gguf", "diffusers", "float16", {}, "the student")
    assert not list(tmp_path.iterdir())


def test_eight_bit_asymmetric_weights_have_no_block_type():
    from fraqat_cli.export.gguf_blocks import block_type

    assert [block_type(b, s, "x") for b, s in [(4, True), (4, False), (5, True), (5, False), (8, True)]] == \
        [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]
    with pytest.raises(ValueError, match="x has 8-bit asymmetric weights.*allowed: 2-8 bits symmetric"):
        block_type(8, False, "x")


def test_float32_scales_are_reported_and_sana_convolutions_stored_dequantized(tmp_path):
    """A student trained with float32 scales still exports: the report says how far fp16 scales moved it. Sana's
    quantized 1x1 convolutions have no GGUF linear type: stored dequantized in 16 bits, listed, and still loaded,
    from a bf16 export (BF16 linear weights, F16 for the rest, which diffusers' loader takes as plain tensors)."""
    from hydra.utils import instantiate

    from fraqat_cli.export.example_inputs import example_inputs, relative_difference, student_prediction
    from fraqat_cli.export.gguf import load_gguf, write_gguf
    from fraqat_cli.export.safetensors_file import round_unquantized
    from fraqat_cli.models.loading import load_pipeline
    from fraqat_cli.student.build import build_student

    model_cfg = OmegaConf.load(CONF / "model" / "tiny_sana.yaml")
    family = instantiate(model_cfg.family)
    pipe = load_pipeline(model_cfg, without=family.text_parts)
    example = example_inputs(model_cfg, pipe, EXPORT_CONFIG.example, str(tmp_path / "cache"))
    quantizer = OmegaConf.merge(quantizer_preset("per_channel"), {"layers": ["linear", "pointwise_conv"]})
    student, _ = build_student(pipe.transformer, quantizer, None, start_bits=4)
    round_unquantized(student.eval(), "bfloat16")  # as the real models ship
    report = write_gguf(student, family, example, tmp_path / "s.gguf", "diffusers", "bfloat16", {}, "the student")
    assert report["weights_exact"] is False and 0 < report["fp16_scales_moved"] < 1e-3
    assert report["tensor_types"] == ["BF16", "F16", "Q4_0"]  # BF16: the unquantized linear layers alone
    convs = report["dequantized_16bit"]
    assert convs and all(name.endswith(("conv_inverted", "conv_point")) for name in convs)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(tmp_path / "s.gguf")).tensors}
    assert {types[f"{name}.weight"] for name in convs} == {Q.F16}
    with torch.no_grad():
        got = student_prediction(load_gguf(tmp_path / "s.gguf"), family, example)
    assert relative_difference(got, report["expected"]) <= EXPORT_CONFIG.tolerance.gguf
