"""`fraqat-export format=diffusers`: a folder diffusers' own loaders take, in a process that never imports fraqat,
whose torchao weights hold the student's own codes and scales, with a model card the Hub reads."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf
from train_support import FAST, cli_env, console, fraqat_train, quantizer_preset

from fraqat_cli.export.diffusers_folder import (
    TRANSFORMER,
    WEIGHTS,
    check_student,
    load_folder,
    weight_only_prediction,
    write_diffusers_folder,
    write_pipeline,
    write_transformer,
)
from fraqat_cli.export.example_inputs import example_inputs, relative_difference
from fraqat_cli.export.model_card import model_card
from fraqat_cli.export.safetensors_file import round_unquantized
from fraqat_cli.models.conditioning import conditioning_of
from fraqat_cli.models.loading import load_pipeline
from fraqat_cli.quant import QuantizedLayer, set_activation_bits, set_weight_bits
from fraqat_cli.quant.fake_quant import quantize_to_codes
from fraqat_cli.student.build import build_student

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPORT_CONFIG = OmegaConf.load(CONF / "export.yaml")
# family -> quantizer preset and overrides: every granularity appears; groups divide each model's narrowest input.
STUDENTS = {"tiny_flux": ("per_group", {"group_size": 16}), "tiny_sd3": ("per_channel", {}),
            "tiny_sana": ("per_group", {"group_size": 32}), "tiny_pixart": ("per_tensor", {}),
            "toy": ("per_group", {"group_size": 32})}

# Runs in a fresh interpreter: diffusers, torchao and torch only. For every exported folder it loads the transformer
# as users do (bfloat16, the torchao backend's compute dtype) and in float32 (exact arithmetic), runs one denoiser
# step on the parent's inputs, reads the torchao tensors' codes and scales, and generates with the whole pipeline.
LOADER = r"""
import json, sys
import torch
from diffusers import AutoModel, DiffusionPipeline
from torchao.quantization import IntxUnpackedToInt8Tensor

reference = torch.load(sys.argv[1], weights_only=True)
results = {}
for name, ref in reference.items():
    folder, out = ref["folder"], {}
    for dtype in (torch.bfloat16, torch.float32):
        model = AutoModel.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype).eval()
        cast = lambda v: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() and v.ndim > 1 else v
        kwargs = {k: ({i: cast(j) for i, j in v.items()} if isinstance(v, dict) else cast(v))
                  for k, v in ref["kwargs"].items()}
        with torch.no_grad():
            got = model(**kwargs, return_dict=False)[0].float()
        expected = ref["expected"]
        out[str(dtype)] = float((got - expected).norm() / expected.norm())
    weights = {n: m.weight for n, m in model.named_modules() if isinstance(getattr(m, "weight", None),
                                                                           IntxUnpackedToInt8Tensor)}
    out["torchao_layers"] = sorted(weights)
    out["codes_equal"] = all(torch.equal(weights[n].qdata.to(torch.int32), c) for n, (c, s) in ref["codes"].items())
    out["scales_equal"] = all(torch.equal(weights[n].scale.reshape(-1), s) for n, (c, s) in ref["codes"].items())
    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16)
    out["pipeline_transformer_is_torchao"] = any(isinstance(p, IntxUnpackedToInt8Tensor)
                                                 for p in pipe.transformer.parameters())
    images = pipe("a red circle on a blue background", num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0), **ref["pipeline_kwargs"]).images
    out["image_shape"] = list(images.shape)
    out["image_finite"] = bool(torch.isfinite(torch.as_tensor(images)).all())
    results[name] = out
results["fraqat_imported"] = any(m == "fraqat_cli" or m.startswith("fraqat_cli.") for m in sys.modules)
print(json.dumps(results))
"""


def quantized_student(teacher, name: str, bits: float = 4):
    """A student of `teacher` at the preset STUDENTS names, its weights moved off the teacher's (a mix-up shows)."""
    preset, overrides = STUDENTS[name]
    student, _ = build_student(teacher, OmegaConf.merge(quantizer_preset(preset), overrides), None, start_bits=bits)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return student.eval()


def layer_codes(student) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each quantized layer's codes (weight-shaped, int32) and scales (flat; a per-tensor scale once per output
    channel, as the folder stores it), as fraqat computes them."""
    codes = {}
    for name, layer in student.named_modules():
        if isinstance(layer, QuantizedLayer):
            c, s, _ = quantize_to_codes(layer.weight_matrix(), layer.weight_bits, layer.weight_quantizer.spec)
            codes[name] = (c.reshape(layer.weight.shape), s.expand(c.shape[0]) if s.numel() == 1 else s.reshape(-1))
    return codes


def bfloat16_reference(student, family, example: dict, expected: torch.Tensor) -> float:
    """How far the fraqat student itself moves when it computes in bfloat16 (weights, activations, inputs)."""
    low = copy.deepcopy(student).to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() and k != "timestep" else v for k, v in example.items()}
    return relative_difference(weight_only_prediction(low, family, inputs).float(), expected)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Per family: a student exported to a diffusers folder, and what the fresh process reported on loading it."""
    work = tmp_path_factory.mktemp("diffusers-export")
    reference, facts = {}, {}
    torch.manual_seed(0)
    for name in STUDENTS:
        model_cfg = OmegaConf.load(CONF / "model" / f"{name}.yaml")
        family = instantiate(model_cfg.family)
        pipe = load_pipeline(model_cfg, without=family.text_parts)
        example = example_inputs(model_cfg, pipe, EXPORT_CONFIG.example, str(work / "cache"))
        student = round_unquantized(quantized_student(pipe.transformer, name), "bfloat16")
        info = {"model": name, "schedule": "fractional", "granularity": STUDENTS[name][0], "step": 0,
                "weight_bits": 4.0, "model_config": OmegaConf.to_container(model_cfg, resolve=True)}
        folder = work / name
        report = write_diffusers_folder(student, family, example, folder, info, "the test student", "bfloat16")
        kwargs = family.transformer_kwargs(example["latents"], example["timestep"], conditioning_of(example))
        sampler = model_cfg.sampler
        reference[name] = {
            "folder": str(folder), "kwargs": kwargs, "expected": report["expected"], "codes": layer_codes(student),
            "pipeline_kwargs": {"height": model_cfg.resolution, "width": model_cfg.resolution,
                                "max_sequence_length": model_cfg.max_sequence_length,
                                "guidance_scale": sampler.guidance_scale,
                                **OmegaConf.to_container(sampler.extra)}}
        facts[name] = {"report": report, "quantized_layers": sorted(reference[name]["codes"]),
                       "bfloat16_reference": bfloat16_reference(student, family, example, report["expected"])}
    torch.save(reference, work / "reference.pt")
    loaded = subprocess.run([sys.executable, "-c", LOADER, str(work / "reference.pt")], capture_output=True,
                            text=True, timeout=600, env=cli_env(work / "cache"))
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    results = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert results.pop("fraqat_imported") is False  # diffusers alone read the folders
    return {name: {**facts[name], "loaded": results[name], "folder": work / name} for name in STUDENTS}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STUDENTS))
def test_diffusers_loads_the_folder_and_computes_the_students_step(exported, name):
    """In float32 the torchao layers compute the student's own weights: the step agrees exactly (measured 0). In
    bfloat16 (how diffusers runs torchao integer weights) it differs by bfloat16 arithmetic: the fraqat student
    itself, run in bfloat16, moves by `bfloat16_reference` (5e-3 to 1.7e-2 measured); diffusers' step stays
    within twice that (it also rounds each scale to bfloat16). bfloat16 hides small errors (one code off in
    every group moves the step by only 5e-3 to 1.4e-2, measured), so the codes and scales are compared exactly
    and the float32 step must agree to float32 rounding."""
    facts = exported[name]
    loaded = facts["loaded"]
    assert loaded["torch.float32"] < 1e-5, loaded
    assert loaded["torch.bfloat16"] < 2 * facts["bfloat16_reference"], (loaded, facts["bfloat16_reference"])
    assert loaded["torch.bfloat16"] < EXPORT_CONFIG.tolerance.diffusers
    assert loaded["codes_equal"] and loaded["scales_equal"] and facts["report"]["weights_exact"]
    assert loaded["torchao_layers"] == facts["quantized_layers"]  # every quantized layer, no other


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STUDENTS))
def test_the_whole_pipeline_generates_with_the_student(exported, name):
    loaded = exported[name]["loaded"]
    assert loaded["pipeline_transformer_is_torchao"] and loaded["image_finite"]
    resolution = OmegaConf.load(CONF / "model" / f"{name}.yaml").resolution
    assert loaded["image_shape"] == [1, resolution, resolution, 3]


@pytest.mark.slow
def test_the_folder_carries_a_card_the_hub_reads(exported):
    folder = exported["toy"]["folder"]
    card = (folder / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["library_name"] == "diffusers" and header["pipeline_tag"] == "text-to-image"
    assert {"fraqat", "torchao", "int4"} <= set(header["tags"])
    assert "| granularity | per_group |" in card and "| group size | 32 |" in card
    assert 'DiffusionPipeline.from_pretrained("<this folder or repo>", torch_dtype=torch.bfloat16)' in card
    config = json.loads((folder / TRANSFORMER / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    assert (folder / TRANSFORMER / WEIGHTS).is_file() and (folder / "model_index.json").is_file()


def test_a_card_names_its_base_model_and_the_students_evaluation(tmp_path):
    run = tmp_path / "run"
    (run / "eval" / "abc").mkdir(parents=True)
    (run / "eval" / "abc" / "results.json").write_text(json.dumps(
        {"checkpoint": "runs/x/checkpoints/last.ckpt", "num_images": 64, "reference": "teacher", "fid": 12.5,
         "kid": 0.01}))
    layers = {"a": {"bits": 4, "kind": "linear", "group_size": 64, "symmetric": True, "activation": {"bits": 8}}}
    info = {"model": "flux_schnell", "schedule": "fractional", "granularity": "per_group", "step": 500,
            "model_config": {"hub_id": "black-forest-labs/FLUX.1-schnell", "pipeline": "diffusers.FluxPipeline",
                             "transformer_class": "diffusers.FluxTransformer2DModel"}}
    card = model_card("gguf", info, layers, checkpoint=run / "checkpoints" / "last.ckpt", file_name="student.gguf",
                      layout="original")
    header = yaml.safe_load(card.split("---")[1])
    assert header["base_model"] == "black-forest-labs/FLUX.1-schnell" and header["base_model_relation"] == "quantized"
    assert "| 64 | teacher | 12.5 | 0.01 |" in card
    assert "FluxTransformer2DModel.from_single_file(" in card and "ComfyUI-GGUF" in card
    with pytest.raises(ValueError, match="no model card for format 'onnx'; allowed: diffusers, gguf"):
        model_card("onnx", info, layers)


def test_a_local_teacher_folders_parts_are_copied_around_the_student(tmp_path):
    model_cfg = OmegaConf.load(CONF / "model" / "tiny_pixart.yaml")
    teacher = tmp_path / "teacher"  # a local diffusers folder, as model.path names one
    assert write_pipeline(model_cfg, teacher, "PixArtTransformer2DModel")
    (teacher / TRANSFORMER).mkdir()
    (teacher / TRANSFORMER / "config.json").write_text("{}")  # the teacher's own transformer: never copied
    out = tmp_path / "out"
    out.mkdir()
    assert write_pipeline(OmegaConf.merge(model_cfg, {"path": str(teacher), "components": None}), out,
                          "PixArtTransformer2DModel")
    copied = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert copied == sorted(p.relative_to(teacher) for p in teacher.rglob("*")
                            if p.is_file() and p.parts[len(teacher.parts)] != TRANSFORMER)
    assert all((out / f).read_bytes() == (teacher / f).read_bytes() for f in copied if f.name != "model_index.json")
    index = json.loads((out / "model_index.json").read_text())
    assert index[TRANSFORMER] == ["diffusers", "PixArtTransformer2DModel"] and index["vae"] == ["diffusers",
                                                                                                  "AutoencoderKL"]
    hub_only = OmegaConf.merge(model_cfg, {"components": None, "hub_id": "PixArt-alpha/PixArt-Sigma-XL-2-512-MS"})
    assert not write_pipeline(hub_only, tmp_path / "hub", "PixArtTransformer2DModel")  # the card loads it instead


def reloaded_in_float32(student, folder: Path):
    """The student's layers as written, diffusers' float32 load of them, and both models' outputs on one input
    (activations unquantized: the format is weight-only)."""
    layers = check_student(student, "the student")
    write_transformer(student, layers, folder / TRANSFORMER, torch.float32, {})
    loaded = load_folder(folder, torch.float32)
    g = torch.Generator().manual_seed(0)
    inputs = {"hidden_states": torch.randn(1, 4, 16, 16, generator=g), "timestep": torch.tensor([500.0]),
              "encoder_hidden_states": torch.randn(1, 5, 32, generator=g), "encoder_attention_mask": torch.ones(1, 5)}
    with torch.no_grad():
        got = loaded(**inputs, return_dict=False)[0]
        set_activation_bits(student, None)
        expected = student(**inputs, return_dict=False)[0]
    return layers, loaded, relative_difference(got, expected)


def test_quantized_convolutions_load_as_torchao_convolutions_with_their_codes(tmp_path):
    """Sana's 1x1 and depthwise convolutions: torchao's tensor runs conv2d too, so they keep their codes (GGUF
    has no such type and stores them dequantized)."""
    teacher = load_pipeline(OmegaConf.load(CONF / "model" / "tiny_sana.yaml"),
                            without=("tokenizer", "text_encoder", "vae")).transformer
    kinds = "quantizer.layers=[linear,pointwise_conv,depthwise_conv]"
    student, _ = build_student(teacher, quantizer_preset("per_channel", kinds), None, 4)
    layers, loaded, difference = reloaded_in_float32(student.eval(), tmp_path)
    assert {m.kind for m in layers.values()} == {"linear", "pointwise_conv", "depthwise_conv"}
    convolutions = [n for n, m in layers.items() if m.kind != "linear"]
    assert all(type(loaded.get_submodule(n).weight).__name__ == "IntxUnpackedToInt8Tensor" for n in convolutions)
    assert difference < 1e-6  # the student's weights; float32 sums in another order at most


def test_layers_at_different_bits_keep_their_own_widths(tmp_path):
    teacher = load_pipeline(OmegaConf.load(CONF / "model" / "tiny_sana.yaml"),
                            without=("tokenizer", "text_encoder", "vae")).transformer
    student, _ = build_student(teacher, quantizer_preset("per_group", "quantizer.group_size=16"), None, 4)
    wide = next(n for n, m in student.named_modules() if isinstance(m, QuantizedLayer))
    student.get_submodule(wide).weight_quantizer.set_bits(8)  # as a mixed-precision plan leaves a layer
    layers, loaded, difference = reloaded_in_float32(student.eval(), tmp_path)
    widths = {n: loaded.get_submodule(n).weight.target_dtype for n in layers}
    assert widths[wide] == torch.int8 and {w for n, w in widths.items() if n != wide} == {torch.int4}
    config = json.loads((tmp_path / TRANSFORMER / "config.json").read_text())["quantization_config"]
    assert set(config["quant_type"]["default"]["_data"]["fqn_to_config"]) == set(layers)
    assert difference < 1e-6  # the student's weights; float32 sums in another order at most


def test_students_torchao_cannot_hold_exactly_are_refused():
    model_cfg = OmegaConf.load(CONF / "model" / "tiny_pixart.yaml")
    teacher = load_pipeline(model_cfg, without=("tokenizer", "text_encoder", "vae")).transformer
    student, _ = build_student(teacher, quantizer_preset("per_channel", "quantizer.symmetric=false"), None, 4)
    with pytest.raises(ValueError, match="asymmetric weights .* allowed: symmetric students"):
        check_student(student, "the student")
    student, _ = build_student(teacher, quantizer_preset("per_channel"), None, 4)
    set_weight_bits(student, 12)
    with pytest.raises(ValueError, match="is at 12 bits; format=diffusers holds 2-8 bit codes"):
        check_student(student, "the student")


# --- through the real fraqat-export --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory, cache_dir):
    """A tiny FLUX student trained to the end of the fractional schedule (W4 per-group 16)."""
    work = tmp_path_factory.mktemp("diffusers-run")
    result = fraqat_train([*FAST, "model=tiny_flux", "quantizer=per_group", "quantizer.group_size=16",
                           f"hydra.run.dir={work}/run"], cwd=work, cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "run"


@pytest.fixture(scope="module")
def flux_folder(flux_run, cache_dir, tmp_path_factory):
    """`fraqat-export format=diffusers` run once on the trained FLUX student: (the folder, the command's result)."""
    result = console("fraqat-export", [f"ckpt={flux_run}", "format=diffusers"], tmp_path_factory.mktemp("cwd"),
                     cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return flux_run / "export" / "diffusers", result


@pytest.mark.slow
def test_fraqat_export_writes_the_folder_and_its_report(flux_run, flux_folder):
    folder, result = flux_folder
    report = json.loads((flux_run / "export" / "diffusers.json").read_text())
    assert report["format"] == "diffusers" and report["file"] == str(folder) and report["pipeline"]
    assert report["check"]["relative_difference"] < report["check"]["tolerance"] and report["weights_exact"]
    assert 0 <= report["activation_quantizer_dropped"] < 1 and report["size"]["plain_dtype"] == "bfloat16"
    assert {"README.md", "model_index.json", f"{TRANSFORMER}/{WEIGHTS}"} <= set(report["files"])
    assert "| training steps | 4 |" in (folder / "README.md").read_text()
    assert not [f for f in (flux_run / "export").iterdir() if f.name.startswith(".")]  # no staging left
    assert "fraqat-export: diffusers ->" in result.stdout and "weights kept exactly" in result.stdout


@pytest.mark.slow
def test_an_existing_folder_is_refused_and_left_as_it_was(flux_run, flux_folder, cache_dir, tmp_path):
    folder, _ = flux_folder
    before = sorted((p.relative_to(folder), p.stat().st_mtime_ns) for p in folder.rglob("*"))
    again = console("fraqat-export", [f"ckpt={flux_run}", "format=diffusers"], tmp_path, cache_dir)
    assert again.returncode == 2, again.stderr[-2000:]
    errors = [line for line in again.stderr.splitlines() if line.startswith("fraqat-export: error:")]
    assert len(errors) == 1 and "already exists; format=diffusers writes a new folder" in errors[0]
    assert sorted((p.relative_to(folder), p.stat().st_mtime_ns) for p in folder.rglob("*")) == before


@pytest.mark.slow
def test_fraqat_eval_measures_the_deployed_folder(flux_run, flux_folder, cache_dir, tmp_path):
    """The folder evaluated inside the pipeline: diffusers' model (float32, the eval's dtype: the student's
    weights exactly, no activation quantizer), not the checkpoint."""
    folder, _ = flux_folder
    evaluated = console("fraqat-eval", [f"ckpt={folder}", "prompts=offline", "prompts.count=4", "batch_size=4",
                                        "logger=none", "clip.model=null", f"results_csv={tmp_path}/results.csv",
                                        f"hydra.run.dir={tmp_path}/out"], tmp_path, cache_dir)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    (results,) = [json.loads(p.read_text()) for p in (folder.parent / "eval").glob("*/results.json")]
    assert results["checkpoint"] == str(folder) and results["num_images"] == 4 and results["fid"] >= 0
    assert "deployed-diffusers" in results["label"] and results["model"] == "tiny_flux"


@pytest.mark.slow
def test_a_fractional_bit_checkpoint_is_refused_and_nothing_is_written(flux_run, cache_dir, tmp_path):
    state = torch.load(flux_run / "checkpoints" / "last.ckpt", weights_only=True)
    for key in state["state_dict"]:
        if key.endswith("weight_quantizer.bits"):
            state["state_dict"][key].fill_(4.5)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "run" / "checkpoints" / "last.ckpt")
    result = subprocess.run([str(Path(sys.executable).parent / "fraqat-export"), f"ckpt={tmp_path}/run",
                             "format=diffusers"], cwd=tmp_path, env=cli_env(cache_dir), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "fractional weight bit-width (4.5 bits" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "export").exists()
