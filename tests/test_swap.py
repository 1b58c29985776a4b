"""quantize_model on a tiny real SanaTransformer2DModel: which layers, the summary, gradients, bit-widths."""

import copy
import re

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from train_support import QUANTIZER_PRESET_NAMES, quantizer_preset

from fraqat_cli.quant import (
    QuantConfig,
    QuantLinear,
    QuantSpec,
    calibrate_activations,
    quantize_model,
    set_activation_bits,
    set_weight_bits,
    weight_bits_of,
)
from fraqat_cli.student.build import build_quant_config

pytestmark = pytest.mark.usefixtures("single_threaded_torch")



def _linear_names(model, cls=nn.Linear):
    return {name for name, m in model.named_modules() if isinstance(m, cls)}


def _quantized_names(model):
    return _linear_names(model, QuantLinear)


def test_default_quantizes_only_the_linear_layers_under_transformer_blocks(tiny_sana_transformer):
    model = tiny_sana_transformer
    in_blocks = {n for n in _linear_names(model) if n.startswith("transformer_blocks.")}
    quantize_model(model)
    assert _quantized_names(model) == in_blocks
    assert len(in_blocks) == 16  # 2 blocks x (self- and cross-attention) x (q, k, v, out)
    for outside in [
        "time_embed.emb.timestep_embedder.linear_1",
        "time_embed.linear",
        "caption_projection.linear_1",
        "caption_projection.linear_2",
        "proj_out",
    ]:
        assert type(model.get_submodule(outside)) is nn.Linear, outside


def test_summary_counts_quantized_layers_and_parameters(tiny_sana_transformer):
    model = tiny_sana_transformer
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    total_params = sum(p.numel() for p in model.parameters())
    block_weights = sum(m.weight.numel() for n, m in linears.items() if n.startswith("transformer_blocks."))
    summary = quantize_model(model)
    assert summary.quantized_layers == 16
    assert summary.eligible_layers == len(linears) == 22
    assert summary.quantized_params == block_weights == 16 * 64 * 64
    assert summary.total_params == total_params  # swapping shares parameters: nothing added or copied
    assert summary.quantized_fraction == pytest.approx(block_weights / total_params)
    assert "16/22 linear layers quantized" in str(summary)


def test_quantized_model_runs_forward_and_backward_into_the_quantized_weights(
    tiny_sana_transformer, tiny_sana_batch
):
    model = tiny_sana_transformer
    quantize_model(model, QuantConfig(weight_bits=4, activation_bits=8))
    out = model(**tiny_sana_batch).sample  # (B, 4, 16, 16)
    assert out.shape == tiny_sana_batch["hidden_states"].shape and torch.isfinite(out).all()
    out.square().mean().backward()
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert quantized
    for name, layer in quantized.items():
        assert layer.weight.grad is not None, name
        assert layer.weight.grad.abs().sum() > 0, name


def test_full_precision_quantized_model_matches_the_original_exactly(tiny_sana_transformer, tiny_sana_batch):
    original = copy.deepcopy(tiny_sana_transformer)
    quantize_model(tiny_sana_transformer, QuantConfig(weight_bits=None, activation_bits=None))
    with torch.no_grad():
        torch.testing.assert_close(
            tiny_sana_transformer(**tiny_sana_batch).sample, original(**tiny_sana_batch).sample, atol=0, rtol=0
        )


def test_quantization_changes_the_output(tiny_sana_transformer, tiny_sana_batch):
    with torch.no_grad():
        before = tiny_sana_transformer(**tiny_sana_batch).sample
        quantize_model(tiny_sana_transformer, QuantConfig(weight_bits=4, activation_bits=8))
        assert not torch.equal(tiny_sana_transformer(**tiny_sana_batch).sample, before)


@pytest.mark.parametrize(
    "include, exclude, expected",
    [
        (
            ["*attn1.*"],
            ["*to_out*"],
            {f"transformer_blocks.{b}.attn1.to_{p}" for b in (0, 1) for p in "qkv"},
        ),
        (["proj_out"], [], {"proj_out"}),
        (
            ["transformer_blocks.1.*"],
            ["*attn2.*"],
            {f"transformer_blocks.1.attn1.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")},
        ),
        (
            ["*"],
            ["time_embed.*", "caption_projection.*"],
            {f"transformer_blocks.{b}.attn{a}.{p}" for b in (0, 1) for a in (1, 2)
             for p in ("to_q", "to_k", "to_v", "to_out.0")} | {"proj_out"},
        ),
    ],
    ids=["self_attention_without_out", "proj_out_only", "second_block_self_attention", "all_but_embeddings"],
)
def test_include_and_exclude_patterns_select_the_layers(tiny_sana_transformer, include, exclude, expected):
    summary = quantize_model(tiny_sana_transformer, QuantConfig(include=include, exclude=exclude))
    assert _quantized_names(tiny_sana_transformer) == expected
    assert summary.quantized_layers == len(expected)


@pytest.mark.parametrize("kind", ["include", "exclude"])
def test_pattern_that_matches_no_layer_raises_naming_it(tiny_sana_transformer, kind):
    config = QuantConfig(**{kind: ["transformer_blocks.*.ff.nope"]})
    with pytest.raises(ValueError, match=re.escape(f"{kind} pattern 'transformer_blocks.*.ff.nope'")):
        quantize_model(tiny_sana_transformer, config)
    assert not _quantized_names(tiny_sana_transformer)  # checked before anything is swapped


def test_patterns_that_leave_nothing_to_quantize_raise(tiny_sana_transformer):
    with pytest.raises(ValueError, match="leave no layer"):
        quantize_model(tiny_sana_transformer, QuantConfig(include=["proj_out"], exclude=["proj_*"]))


@pytest.mark.parametrize("kind", ["include", "exclude"])
def test_a_single_string_pattern_raises_naming_it(kind):
    with pytest.raises(ValueError, match=re.escape("'proj_out'")):
        QuantConfig(**{kind: "proj_out"})


def test_set_weight_bits_returns_the_layer_count_and_weight_bits_of_reports_the_bits(tiny_sana_transformer):
    model = tiny_sana_transformer
    quantize_model(model, QuantConfig(weight_bits=8))
    assert weight_bits_of(model) == {8.0}
    assert set_weight_bits(model, 4.75) == 16
    assert weight_bits_of(model) == {4.75}
    assert set_weight_bits(model, None) == 16
    assert weight_bits_of(model) == {32.0}
    assert set_activation_bits(model, None) == 16
    assert {m.input_quantizer.current_bits for m in model.modules() if isinstance(m, QuantLinear)} == {32.0}


def test_set_weight_bits_rejects_bad_bits_and_unquantized_models(tiny_sana_transformer):
    with pytest.raises(ValueError, match="no quantized layer"):
        set_weight_bits(tiny_sana_transformer, 4)
    quantize_model(tiny_sana_transformer)
    with pytest.raises(ValueError, match="bits=1.5"):
        set_weight_bits(tiny_sana_transformer, 1.5)
    assert weight_bits_of(tiny_sana_transformer) == {8.0}


def test_static_activations_calibrate_on_the_model_then_run(tiny_sana_transformer, tiny_sana_batch):
    model = tiny_sana_transformer
    quantize_model(model, QuantConfig(weight_bits=4, static_activations=True))
    with pytest.raises(RuntimeError, match="calibrat"):
        model(**tiny_sana_batch)
    with torch.no_grad(), calibrate_activations(model):
        model(**tiny_sana_batch)
    quantizers = [m.input_quantizer for m in model.modules() if isinstance(m, QuantLinear)]
    assert all(q.calibrated and q.range_min < q.range_max for q in quantizers)
    assert torch.isfinite(model(**tiny_sana_batch).sample).all()


@pytest.mark.parametrize("preset", QUANTIZER_PRESET_NAMES)
def test_every_quantizer_preset_builds_a_config_that_quantize_model_accepts(
    preset, tiny_sana_transformer, tiny_sana_batch
):
    entry = quantizer_preset(preset)
    config = build_quant_config(entry, weight_bits=4)
    assert config.weight == QuantSpec(
        granularity=entry.granularity, group_size=entry.group_size, symmetric=entry.symmetric, rounding=entry.rounding
    )
    assert config.activation_bits == entry.activation_bits
    summary = quantize_model(tiny_sana_transformer, config)
    assert summary.quantized_layers == 16
    assert weight_bits_of(tiny_sana_transformer) == {4.0}
    with torch.no_grad():
        assert torch.isfinite(tiny_sana_transformer(**tiny_sana_batch).sample).all()


def test_the_selection_names_the_quantized_layers():
    entry = quantizer_preset(QUANTIZER_PRESET_NAMES[0])
    config = build_quant_config(entry, {"include": ["transformer_blocks.*.attn1.*"], "exclude": ["*to_out*"]})
    assert config.include == ("transformer_blocks.*.attn1.*",) and config.exclude == ("*to_out*",)
    assert build_quant_config(entry, OmegaConf.load("conf/selection/all_linear.yaml")).include == ("*",)
