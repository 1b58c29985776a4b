"""The real models as data: each `conf/model/*` transformer built on the meta device (no weights, no hub),
counted, its block classes found, and quantized under each `conf/selection/*`."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from train_support import quantizer_preset

from fraqat_cli.models.architecture import block_classes, build_transformer, count_parameters, transformer_kwargs
from fraqat_cli.models.loading import load_pipeline
from fraqat_cli.quant import QuantLinear, quantize_model, set_weight_bits
from fraqat_cli.student.build import build_quant_config

CONF = Path(__file__).resolve().parents[1] / "conf"
REAL = ("sana", "pixart_sigma", "sd35_medium", "flux_schnell")
SMALL = ("tiny_sana", "tiny_pixart", "tiny_sd3", "tiny_flux", "toy", "toy_pixart", "toy_flux")

# name: (the figure from the public configs in billions, the exact count diffusers 0.42 builds,
#        the number of blocks of each block class)
REAL_FIGURES = {
    "sana": (0.592, 591_747_872, (28,)),
    "pixart_sigma": (0.611, 610_856_096, (28,)),
    "sd35_medium": (2.243, 2_243_171_520, (24,)),
    "flux_schnell": (11.891, 11_891_178_560, (19, 38)),
}

# Linear layers each selection quantizes, and the share of all parameters they hold.
# transformer_blocks = blocks x linears per block:
#   Sana 28 x 8 (self- and cross-attention q, k, v, out; its feed-forward is convolutions);
#   PixArt 28 x 10 (two attentions x 4, feed-forward 2);
#   SD3.5-M 24 x 14 (joint attention 8, adaLN 2, two feed-forwards 4), less 3 in the last (context-free)
#     block, plus 13 x 4 for the dual attention = 385;
#   FLUX 19 x 14 double + 38 x 6 single = 494.
# all_linear adds the embedders, adaLN, caption and output projections (6, 6, 7, 8 layers).
SELECTION_COUNTS = {
    "sana": {"transformer_blocks": 224, "all_linear": 230},
    "pixart_sigma": {"transformer_blocks": 280, "all_linear": 286},
    "sd35_medium": {"transformer_blocks": 385, "all_linear": 392},
    "flux_schnell": {"transformer_blocks": 494, "all_linear": 502},
}


def model_config(name):
    return OmegaConf.load(CONF / "model" / f"{name}.yaml")


def selection(name):
    return OmegaConf.load(CONF / "selection" / f"{name}.yaml")


@pytest.mark.parametrize("name", REAL)
def test_real_transformer_built_on_meta_has_the_public_parameter_count(name):
    figure, exact, _ = REAL_FIGURES[name]
    model = build_transformer(model_config(name))
    count = count_parameters(model)
    print(f"{name}: {count:,} parameters ({count / 1e9:.3f} B)")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert count == pytest.approx(figure * 1e9, rel=0.01)
    assert count == exact


@pytest.mark.parametrize("name", SMALL)
def test_small_model_built_on_meta_matches_the_pipeline_it_loads(name):
    cfg = model_config(name)
    meta = build_transformer(cfg)
    others = tuple(part for part in cfg.components if part != "transformer")
    loaded = load_pipeline(cfg, without=others).transformer
    assert type(meta) is type(loaded)
    assert count_parameters(meta) == count_parameters(loaded)
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in loaded.state_dict().items()}


@pytest.mark.parametrize("name", REAL + SMALL)
def test_every_block_class_resolves_and_occurs_in_the_model(name):
    cfg = model_config(name)
    model = build_transformer(cfg)
    classes = block_classes(cfg)
    counts = tuple(sum(isinstance(m, cls) for m in model.modules()) for cls in classes)
    assert all(n >= 1 for n in counts), dict(zip(cfg.block_classes, counts))
    if name in REAL_FIGURES:
        assert counts == REAL_FIGURES[name][2]
    # The blocks hold the bulk of the weights: wrapping one unit per block shards nearly everything.
    in_blocks = sum(p.numel() for m in model.modules() if isinstance(m, classes) for p in m.parameters())
    assert in_blocks / count_parameters(model) > (0.97 if name in REAL else 0.7)


@pytest.mark.parametrize("name", REAL)
def test_selections_quantize_the_expected_layers_of_the_real_models(name):
    quantizer = quantizer_preset("per_tensor")
    summaries = {}
    for choice in ("transformer_blocks", "all_linear"):
        model = build_transformer(model_config(name))
        summaries[choice] = quantize_model(model, build_quant_config(quantizer, selection(choice)))
        print(f"{name} {choice}: {summaries[choice]}")
        assert summaries[choice].quantized_layers == SELECTION_COUNTS[name][choice]
    blocks, everything = summaries["transformer_blocks"], summaries["all_linear"]
    assert everything.quantized_layers == everything.eligible_layers
    assert blocks.quantized_layers < everything.quantized_layers
    assert blocks.quantized_fraction < everything.quantized_fraction
    if name == "sana":
        # Sana's feed-forward blocks are convolutions: only about half its weights are in linear layers.
        assert 0.50 < blocks.quantized_fraction < everything.quantized_fraction < 0.55
    else:
        assert everything.quantized_fraction >= 0.99
        assert blocks.quantized_fraction > 0.97


def test_quantizing_on_the_meta_device_keeps_every_tensor_there():
    model = build_transformer(model_config("pixart_sigma"), layers=1)
    with torch.device("meta"):  # even inside a meta-device context the quantizers know their bit-widths
        quantize_model(model, build_quant_config(quantizer_preset("per_tensor"), selection("all_linear")))
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
    set_weight_bits(model, 5.5)
    assert {m.weight_bits for m in model.modules() if isinstance(m, QuantLinear)} == {5.5}


def test_layers_keeps_the_width_and_builds_fewer_blocks():
    cfg = model_config("flux_schnell")
    full, short = build_transformer(cfg), build_transformer(cfg, layers=2)
    assert len(short.transformer_blocks) == len(short.single_transformer_blocks) == 2
    assert short.x_embedder.weight.shape == full.x_embedder.weight.shape
    assert transformer_kwargs(cfg)["num_layers"] == 19  # the config itself is untouched


def test_random_weights_are_drawn_from_the_seed_in_the_given_dtype():
    cfg = model_config("tiny_pixart")
    first = build_transformer(cfg, device="cpu", dtype=torch.bfloat16, seed=3)
    again = build_transformer(cfg, device="cpu", dtype=torch.bfloat16, seed=3)
    other = build_transformer(cfg, device="cpu", dtype=torch.bfloat16, seed=4)
    assert {p.dtype for p in first.parameters()} == {torch.bfloat16}
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters()))
    assert not torch.equal(first.proj_out.weight, other.proj_out.weight)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"block_classes": ["diffusers.NoSuchBlock"]}, "'diffusers.NoSuchBlock' does not resolve"),
        ({"block_classes": ["fraqat_cli.quant.QuantConfig"]}, "is not a torch.nn.Module class"),
        ({"architecture": None, "components": None}, "neither `architecture` nor `components.transformer`"),
    ],
    ids=["unknown-block", "not-a-module", "no-architecture"],
)
def test_bad_model_configs_are_named_in_the_error(change, message):
    cfg = OmegaConf.merge(model_config("sana"), change)
    with pytest.raises(ValueError, match=message):
        block_classes(cfg)
        build_transformer(cfg)


def test_bad_layer_count_is_refused():
    with pytest.raises(ValueError, match="layers=0 is not allowed"):
        build_transformer(model_config("sana"), layers=0)


def test_unknown_architecture_key_is_refused_by_the_class():
    cfg = OmegaConf.merge(model_config("sd35_medium"), {"architecture": {"no_such_argument": 1}})
    with pytest.raises(TypeError, match="no_such_argument"):
        build_transformer(cfg)



# --- scripts/random_real_model.py ---------------------------------------------------------------------------

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "random_real_model.py"


def random_real_model_main():
    spec = importlib.util.spec_from_file_location("random_real_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "tiny_sana"], "--model 'tiny_sana' has no rehearsal parts; allowed: flux_schnell, pixart_sigma"),
        (["--model", "sana", "--check-resolution", "8"], "--check-resolution 8 is too small; allowed: >= 32 px"),
    ],
    ids=["not-a-real-model", "tiny-check"],
)
def test_random_real_model_refuses_bad_input_in_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        random_real_model_main()([*args, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_random_real_model_refuses_an_existing_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        random_real_model_main()(["--model", "sana", "--out", str(tmp_path)])
    assert "already exists; allowed: a path that does not exist yet" in capsys.readouterr().err


@pytest.mark.slow
def test_random_real_model_writes_a_folder_that_loads_as_the_real_model(tmp_path):
    out = tmp_path / "sana"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", "sana", "--out", str(out), "--layers", "1",
         "--check-resolution", "64"],
        env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "forward at 64 px, latents (1, 32, 2, 2) -> (1, 32, 2, 2)" in result.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folder left behind
    cfg = OmegaConf.merge(model_config("sana"), {"path": str(out)})
    pipe = load_pipeline(cfg)
    real = transformer_kwargs(cfg)
    assert pipe.transformer.dtype == torch.bfloat16 and len(pipe.transformer.transformer_blocks) == 1
    assert {k: pipe.transformer.config[k] for k in real if k != "num_layers"} == {
        k: v for k, v in real.items() if k != "num_layers"
    }
    assert pipe.text_encoder.config.hidden_size == real["caption_channels"]  # Gemma-2-2B's width, 1 layer
    assert pipe.vae.config.latent_channels == real["in_channels"] and pipe.vae_scale_factor == 32
    assert pipe.scheduler.config.use_flow_sigmas and pipe.scheduler.config.flow_shift == 3.0
