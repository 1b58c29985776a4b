"""The distillation module in-process: what it trains, what it saves, and that it learns."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from train_support import quantizer_preset

from fraqat_cli.models.loading import load_pipeline
from fraqat_cli.quant import QuantLinear, set_weight_bits
from fraqat_cli.student.build import build_student
from fraqat_cli.train.distill import DistillationModule
from fraqat_cli.train.optimizers import adamw

QUANTIZER = quantizer_preset("per_channel")


@pytest.fixture(scope="module")
def tiny_sana():
    model_cfg = OmegaConf.load("conf/model/tiny_sana.yaml")
    pipe = load_pipeline(model_cfg, without=("tokenizer", "text_encoder"))
    return model_cfg, pipe


def make_module(model_cfg, pipe, quantizer=QUANTIZER, lr=1e-5, **kwargs) -> DistillationModule:
    student, _ = build_student(pipe.transformer, quantizer, None, start_bits=4)
    noise = instantiate(model_cfg.noise).bind(pipe.scheduler.config)
    return DistillationModule(pipe.transformer, student, instantiate(model_cfg.family), noise,
                              optimizer=partial(adamw, lr=lr), **kwargs)


def fixed_batch(size: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "latents": torch.randn(size, 4, 16, 16, generator=g),  # (B, C, H, W)
        "prompt_embeds": torch.randn(size, 16, 32, generator=g),  # (B, L, D)
        "prompt_attention_mask": torch.ones(size, 16, dtype=torch.long),  # (B, L)
    }


def loss_at_fixed_noise(module: DistillationModule, batch) -> float:
    torch.manual_seed(123)
    with torch.no_grad():
        return module.distillation_loss(batch)["loss"].item()


def test_distillation_loss_falls_on_a_fixed_batch(tiny_sana):
    module = make_module(*tiny_sana, lr=1e-4)
    batch = fixed_batch()
    before = loss_at_fixed_noise(module, batch)
    optimizer = module.configure_optimizers()
    for step in range(30):
        torch.manual_seed(step)
        optimizer.zero_grad()
        module.distillation_loss(batch)["loss"].backward()
        optimizer.step()
    after = loss_at_fixed_noise(module, batch)
    assert after < 0.5 * before, (before, after)


def test_student_starts_as_the_teacher_and_differs_only_by_quantization(tiny_sana):
    model_cfg, pipe = tiny_sana
    module = make_module(model_cfg, pipe)
    set_weight_bits(module.student, None)
    for layer in module.student.modules():
        if isinstance(layer, QuantLinear):
            layer.input_quantizer.set_bits(None)
    assert loss_at_fixed_noise(module, fixed_batch()) == 0.0
    set_weight_bits(module.student, 4)
    assert loss_at_fixed_noise(module, fixed_batch()) > 0.0


def test_only_the_student_is_trained_and_saved(tiny_sana):
    model_cfg, pipe = tiny_sana
    module = make_module(model_cfg, pipe)
    assert all(not p.requires_grad for p in module.teacher.parameters())
    assert not module.teacher.training
    assert all(k.startswith("student.") for k in module.state_dict())
    teacher_ids = {id(p) for p in module.teacher.parameters()}
    assert not teacher_ids & {id(p) for p in module.student.parameters()}


@pytest.mark.parametrize(
    ("trainable", "expect_trained", "expect_frozen"),
    [
        ("all", "time_embed.linear.weight", None),
        ("transformer_blocks", "transformer_blocks.0.attn1.to_q.weight", "time_embed.linear.weight"),
        ("attention", "transformer_blocks.1.attn2.to_v.weight", "transformer_blocks.0.ff.conv_inverted.weight"),
        ("feed_forward", "transformer_blocks.0.ff.conv_inverted.weight", "transformer_blocks.0.attn1.to_q.weight"),
    ],
)
def test_selective_training_freezes_the_rest(tiny_sana, trainable, expect_trained, expect_frozen):
    patterns = OmegaConf.load(f"conf/trainable/{trainable}.yaml").patterns
    module = make_module(*tiny_sana, trainable=patterns)
    params = dict(module.student.named_parameters())
    assert params[expect_trained].requires_grad
    if expect_frozen:
        assert not params[expect_frozen].requires_grad
    module.distillation_loss(fixed_batch())["loss"].backward()
    assert params[expect_trained].grad is not None


def test_trainable_pattern_matching_nothing_is_refused(tiny_sana):
    with pytest.raises(ValueError, match=r"trainable patterns \['\*nothing\*'\] match no parameter"):
        make_module(*tiny_sana, trainable=["*nothing*"])


def test_feature_loss_adds_a_per_block_term(tiny_sana):
    module = make_module(*tiny_sana, feature_loss_weight=0.5)
    torch.manual_seed(0)
    losses = module.distillation_loss(fixed_batch())
    assert losses["feature_loss"] > 0
    assert losses["loss"].item() == pytest.approx((losses["output_loss"] + 0.5 * losses["feature_loss"]).item())


def test_a_bf16_teacher_and_bf16_conditioning_train_a_float32_student():
    """Real models cache bf16 prompt embeddings; the float32 student (32-true training) gets them in float32."""
    model_cfg = OmegaConf.merge(OmegaConf.load("conf/model/tiny_sana.yaml"), {"dtype": "bfloat16"})
    pipe = load_pipeline(model_cfg, without=("tokenizer", "text_encoder"))
    module = make_module(model_cfg, pipe)
    assert next(module.teacher.parameters()).dtype == torch.bfloat16
    assert next(module.student.parameters()).dtype == torch.float32
    batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in fixed_batch().items()}
    loss = module.distillation_loss(batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss) and loss > 0


def test_static_activation_ranges_are_measured_on_the_calibration_batches(tiny_sana):
    from fraqat_cli.quant import ActivationQuantizer

    model_cfg, pipe = tiny_sana
    static = OmegaConf.merge(QUANTIZER, {"static_activations": True})
    batches = [fixed_batch(2), fixed_batch(3)]
    ranges = []
    for _ in range(2):
        module = make_module(model_cfg, pipe, quantizer=static, calibration_batches=batches)
        quantizers = [m for m in module.student.modules() if isinstance(m, ActivationQuantizer)]
        assert quantizers and not any(q.calibrated for q in quantizers)
        module.calibrate(batches)
        ranges.append(torch.stack([torch.stack([q.range_min, q.range_max]) for q in quantizers]))
    assert torch.isfinite(ranges[0]).all() and (ranges[0][:, 0] < ranges[0][:, 1]).all()
    torch.testing.assert_close(ranges[0], ranges[1], atol=0, rtol=0)  # same batches, same noise: same ranges
    assert torch.isfinite(module.distillation_loss(fixed_batch())["loss"])  # the static student now runs


def test_training_attention_uses_only_the_configured_kernels(tiny_sana):
    """`attention_backends` reaches the forward: a kernel list the CPU cannot serve fails, math alone agrees
    with torch's own choice, and the default leaves cuDNN out (its backward gave NaN on CUDA for FLUX)."""
    from fraqat_cli.train.attention_backends import attention_backends

    model_cfg, pipe = tiny_sana
    batch = fixed_batch()
    torch.manual_seed(0)
    free = make_module(model_cfg, pipe).distillation_loss(batch)["loss"]
    torch.manual_seed(0)
    math_only = make_module(model_cfg, pipe, attention_backends=attention_backends(["math"])).distillation_loss(batch)
    torch.testing.assert_close(math_only["loss"], free, rtol=1e-4, atol=1e-9)
    with pytest.raises(RuntimeError):
        make_module(model_cfg, pipe, attention_backends=attention_backends(["cudnn"])).distillation_loss(batch)
    assert "cudnn" not in OmegaConf.load("conf/train.yaml").attention_backends


@pytest.mark.parametrize(("names", "message"), [
    (["flash", "cudnn2"], "names unknown kernel(s) ['cudnn2']; allowed: flash, efficient, math, cudnn"),
    ("flash", "must be a list"),
])
def test_unknown_attention_backends_are_named(names, message):
    from fraqat_cli.train.attention_backends import attention_backends

    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        attention_backends(names)
    assert attention_backends(None) is None and attention_backends([]) is None
