"""fraqat-plan: one traced step of the real architecture on fake tensors gives parameter counts, FLOPs and
memory; the plan spreads them over devices and says whether the run fits."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_module
from torch.utils.flop_counter import FlopCounterMode
from train_support import console

from fraqat_cli.models.architecture import build_transformer, count_parameters
from fraqat_cli.plan.command import Layout, per_device
from fraqat_cli.plan.depth import block_counts, trace_by_depth, with_depth
from fraqat_cli.plan.trace import FLOP_FORMULAS, example_row, stand_in_data, trace_step
from fraqat_cli.quant import QuantizedLayer
from fraqat_cli.student.build import build_student
from fraqat_cli.train.distill import freeze_all_but

TINY = ["tiny_sana", "tiny_pixart", "tiny_sd3", "tiny_flux", "toy"]


def plan_config(*overrides: str):
    with initialize_config_module("fraqat_cli.conf", version_base="1.3"):
        return compose("plan", overrides=list(overrides))


@pytest.mark.parametrize("model", TINY)
def test_planned_parameter_counts_equal_the_instantiated_models(model):
    cfg = plan_config(f"model={model}", "data.batch_size=2")
    trace = trace_step(cfg, 2, accumulating=False)
    teacher = build_transformer(cfg.model, device="cpu")  # real weights, as training instantiates it
    student, _ = build_student(teacher, cfg.quantizer, cfg.selection, 8.0)
    assert trace.teacher_params == count_parameters(teacher)
    assert trace.student_params == count_parameters(student)
    assert trace.trainable_params == freeze_all_but(student, cfg.trainable.patterns)
    assert trace.student_bytes >= 4 * trace.student_params  # float32 master weights
    assert 0 < trace.activation_bytes < trace.peak_bytes


def real_step_flops(cfg, batch_size: int) -> int:
    """FLOPs of one real training step (real tensors, random weights) under torch's FLOP counter (with the
    plan's formula for grouped convolutions' backward, which torch overcounts)."""
    from hydra.utils import instantiate

    from fraqat_cli.train.assembly import distillation_module

    row = example_row(cfg.model)
    teacher = build_transformer(cfg.model, device="cpu")
    data = stand_in_data(cfg, teacher, batch_size)
    module, _ = distillation_module(cfg, data, instantiate(cfg.schedule))
    batch = {k: v.expand(batch_size, *v.shape[1:]).clone() for k, v in row.items()}
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        module.distillation_loss(batch)["loss"].backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("model", ["tiny_sana", "tiny_flux"])
def test_planned_flops_match_the_flop_counter_on_the_real_tiny_model(model):
    cfg = plan_config(f"model={model}", "selection=all_linear")
    planned = trace_step(cfg, 4, accumulating=False).flops
    measured = real_step_flops(cfg, 4)
    assert measured > 0
    assert abs(planned - measured) / measured < 0.10


def test_a_depthwise_convolution_backward_costs_twice_its_forward():
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, groups=64)
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as forward:
        y = conv(x)
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as backward:
        y.sum().backward()
    assert forward.get_total_flops() == 2 * 2 * 64 * 9 * 8 * 8  # 2 x batch x (C x 1 x 3 x 3) x H x W
    assert backward.get_total_flops() == 2 * forward.get_total_flops()  # input and weight gradients


def test_gradient_checkpointing_costs_recomputation_and_saves_activations():
    cfg = plan_config("model=tiny_flux", "model.resolution=128")
    plain = trace_step(cfg, 4, accumulating=False)
    cfg.gradient_checkpointing = True
    checkpointed = trace_step(cfg, 4, accumulating=False)
    assert checkpointed.flops > plain.flops
    assert checkpointed.activation_bytes < plain.activation_bytes


def test_accumulation_keeps_the_gradients_through_the_next_micro_batch():
    cfg = plan_config("model=tiny_sana")
    alone = trace_step(cfg, 4, accumulating=False)
    accumulating = trace_step(cfg, 4, accumulating=True)
    assert accumulating.peak_bytes > alone.peak_bytes
    assert accumulating.peak_breakdown["Gradient"] >= alone.gradient_bytes


def test_8bit_optimizer_and_lora_shrink_what_they_should():
    full = trace_step(plan_config("model=tiny_sana", "trainable=all"), 4, accumulating=False)
    eight_bit = trace_step(plan_config("model=tiny_sana", "trainable=all", "optim=adamw8bit"), 4, False)
    lora = trace_step(plan_config("model=tiny_sana", "trainable=lora", "trainable.lora.rank=2"), 4, False)
    assert eight_bit.trainable_params == full.trainable_params
    assert eight_bit.optimizer_bytes < 0.6 * full.optimizer_bytes  # small tensors keep float32 moments
    assert lora.trainable_params < full.trainable_params / 4
    assert lora.optimizer_bytes < full.optimizer_bytes / 4 and lora.gradient_bytes < full.gradient_bytes / 4


def test_fsdp_shards_the_student_and_ddp_adds_gradient_buckets():
    trace = trace_step(plan_config("model=tiny_sana"), 4, accumulating=False)
    single = per_device(trace, Layout("single", 1, True))
    ddp = per_device(trace, Layout("ddp", 4, True))
    fsdp = per_device(trace, Layout("fsdp", 4, True))
    assert single["peak"] == trace.peak_bytes
    assert ddp["peak"] == trace.peak_bytes + trace.gradient_bytes
    assert fsdp["parts"]["optimizer_state"] == trace.optimizer_bytes // 4
    assert fsdp["parts"]["teacher_weights"] == trace.teacher_bytes  # never sharded


@pytest.mark.slow
def test_fraqat_plan_writes_plan_json_with_options_when_it_does_not_fit(tmp_path, cache_dir):
    result = console("fraqat-plan", ["model=tiny_pixart", "plan.gpu=a100", "plan.gpu_memory_gb=0.001",
                                     "data.batch_size=2", f"hydra.run.dir={tmp_path}"], tmp_path, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads((tmp_path / "plan.json").read_text())
    for key in ("teacher_params", "student_params", "trainable_params", "bytes_per_device", "peak_bytes_per_device",
                "checkpoint_bytes", "cache_bytes", "flops_per_step", "steps", "gpu_hours", "fits", "suggestions"):
        assert key in plan
    assert plan["fits"] is False  # 1 MB of GPU
    assert {"resumable", "student"} == set(plan["checkpoint_bytes"])
    assert plan["checkpoint_bytes"]["resumable"] > plan["checkpoint_bytes"]["student"]
    options = {" ".join(s["overrides"]): s for s in plan["suggestions"]}
    assert {"gradient_checkpointing=true", "optim=adamw8bit", "trainable=lora",
            "data.batch_size=1 trainer.accumulate_grad_batches=2"} <= set(options)
    assert all(0 < s["peak_bytes_per_device"] < plan["peak_bytes_per_device"] for s in plan["suggestions"])
    assert not any(s["fits"] for s in plan["suggestions"])  # nothing brings a DiT under 1 MB
    assert "does NOT fit" in result.stdout


def test_an_unknown_gpu_is_refused_naming_the_allowed_ones(tmp_path, cache_dir):
    result = console("fraqat-plan", ["model=tiny_sana", "plan.gpu=tpu9", f"hydra.run.dir={tmp_path}"],
                     tmp_path, cache_dir)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("fraqat-plan: error: plan.gpu='tpu9' is not in the table; allowed: h100,")
    assert not (tmp_path / "plan.json").exists()


@pytest.mark.slow
def test_flux_fits_eight_80gb_gpus_with_fsdp_and_not_one_without():
    cfg = plan_config("experiment=flux_schnell_w4a8")
    trace = trace_step(cfg, cfg.data.batch_size, accumulating=False)
    usable = 80e9 * cfg.plan.usable_fraction
    assert trace.student_params > 11e9
    assert per_device(trace, Layout("fsdp", 8, True))["peak"] < usable
    assert per_device(trace, Layout("single", 1, True))["peak"] > usable
    assert per_device(trace, Layout("ddp", 8, True))["peak"] > usable


@pytest.mark.skipif(torch.cuda.is_available(), reason="the assumption is made on a machine without a GPU")
def test_a_plan_without_a_gpu_says_it_assumed_one_device():
    from fraqat_cli.plan.command import layout_of

    assumed = layout_of(plan_config("trainer=ddp")).assumed
    assert assumed.startswith("1 device: trainer.devices=auto") and "trainer.devices=N" in assumed
    assert layout_of(plan_config("trainer=ddp", "trainer.devices=8")).assumed is None


@pytest.mark.slow
def test_learned_scales_are_counted_as_trained_parameters_with_their_optimizer_state():
    plain = trace_step(plan_config("model=tiny_sana", "trainable=all", "quantizer=per_channel"), 2, False)
    cfg = plan_config("model=tiny_sana", "trainable=all", "quantizer=per_channel", "quantizer.scale=learned")
    learned = trace_step(cfg, 2, accumulating=False)
    student, _ = build_student(build_transformer(cfg.model, device="cpu"), cfg.quantizer, cfg.selection, 8.0)
    layers = [m for m in student.modules() if isinstance(m, QuantizedLayer)]
    scales = sum(m.weight_quantizer.scale.numel() for m in layers)
    assert scales == sum(m.weight.shape[0] for m in layers)  # per channel: one per output channel
    assert learned.student_params - plain.student_params == scales
    assert learned.trainable_params - plain.trainable_params == scales
    # AdamW: two float32 moments per scale, and a step count per scale tensor
    assert learned.optimizer_bytes - plain.optimizer_bytes == 8 * scales + 4 * len(layers)


@pytest.mark.parametrize("overrides, counts", [
    (["model=pixart_sigma"], {"num_layers": 28}),
    (["model=flux_schnell"], {"num_layers": 19, "num_single_layers": 38}),
    (["model=sd35_medium"], {"dual_attention_layers": 13, "num_layers": 11}),  # 13 dual blocks first, 11 others
    (["model=sd35_medium", "model.architecture.dual_attention_layers=[0,5]"], None),  # blocks differ by index
    (["model=tiny_pixart"], None)],  # no architecture: traced whole, it is small
    ids=["pixart_sigma", "flux_schnell", "sd35_medium", "sd35_scattered_dual_blocks", "tiny_pixart"])
def test_the_models_whose_blocks_repeat_are_traced_on_shallow_twins(overrides, counts):
    assert block_counts(plan_config(*overrides).model) == counts


def test_an_sd35_twin_keeps_its_dual_blocks_first_and_its_last_block_last():
    twin = with_depth(plan_config("model=sd35_medium"), {"dual_attention_layers": 3, "num_layers": 2}).model
    assert twin.architecture.num_layers == 5 and list(twin.architecture.dual_attention_layers) == [0, 1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["pixart_sigma", "sd35_medium"])
@pytest.mark.parametrize("overrides", [(), ("trainable=lora", "gradient_checkpointing=true")])
def test_the_step_extrapolated_from_shallow_twins_is_the_whole_models_trace(model, overrides):
    """The real-size PixArt-Sigma XL-2 (28 blocks) and SD3.5 Medium (13 dual blocks, 11 others), on fake
    tensors: what two or three shallow traces derive against one trace of the whole depth. Planned peaks stay
    within 5% of the whole trace; counts and FLOPs add up exactly."""
    cfg = plan_config(f"model={model}", "data.batch_size=2", *overrides)
    row = example_row(cfg.model)
    derived = trace_by_depth(cfg, 2, accumulating=False, row=row)
    whole = trace_step(cfg, 2, accumulating=False, row=row)
    assert derived.peak_bytes == pytest.approx(whole.peak_bytes, rel=0.05)
    assert derived.activation_bytes == pytest.approx(whole.activation_bytes, rel=0.05)
    for exact in ("student_params", "trainable_params", "teacher_bytes", "student_bytes", "optimizer_bytes",
                  "flops", "student_state_bytes", "largest_block_bytes", "outside_blocks_bytes"):
        assert getattr(derived, exact) == getattr(whole, exact), exact


@pytest.mark.slow
def test_the_one_gpu_flux_recipe_fits_one_80gb_gpu_with_a_margin():
    """experiment=flux_schnell_w4a8_1gpu: LoRA with its base in bf16, 8-bit AdamW, gradient checkpointing."""
    cfg = plan_config("experiment=flux_schnell_w4a8_1gpu")
    trace = trace_by_depth(cfg, cfg.data.batch_size, accumulating=True)
    usable = 80e9 * cfg.plan.usable_fraction
    assert per_device(trace, Layout("single", 1, True))["peak"] < 0.9 * usable  # a margin of 10% of the usable
    assert trace.trainable_params < 0.01 * trace.student_params
    assert trace.student_bytes < 0.55 * 4 * trace.student_params  # the base in 2 bytes a parameter, not 4


@pytest.mark.parametrize("override, message", [("plan.mfu=1.5", "plan.mfu=1.5 is a fraction"),
                                               ("plan.usable_fraction=0", "plan.usable_fraction must be a positive")])
def test_plan_fractions_outside_0_to_1_are_refused_naming_the_range(override, message):
    from fraqat_cli.plan.command import check_fractions

    with pytest.raises(ValueError, match=message):
        check_fractions(plan_config(override).plan)
