"""The compiled student (`compile.enabled=true`): the fake quantizers under torch.compile compute what they compute
eagerly, and a change of bit-width reuses the compiled graphs instead of compiling again.

Dynamo's test counter (`CompileCounterWithBackend`) counts the graphs compiled; the fast tests trace with the
`eager` backend (dynamo's capture, no code generation), the slow ones with `aot_eager` and inductor."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.testing import CompileCounterWithBackend
from train_support import FAST, console, fraqat_train

from fraqat_cli.quant import QuantLinear, QuantSpec, calibrate_activations, set_weight_bits
from fraqat_cli.quant.fake_quant import grid_of
from fraqat_cli.quant.spec import ROUNDINGS
from fraqat_cli.quant.traced import traced_grid
from fraqat_cli.train.compiled import compile_blocks

FRACTIONAL = [8, 7, 6, 5.5, 5, 4.75, 4.5, 4.25, 4]  # conf/schedule/fractional.yaml's stages
SMOOTH = [8 - i / 8 for i in range(33)]  # a new width at every step, 8 down to 4


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_the_grid_from_the_bits_buffer_is_the_eager_grid(symmetric, rounding):
    spec = QuantSpec(symmetric=symmetric, rounding=rounding)
    for bits in [2 + i / 64 for i in range(64 * 14 + 1)]:  # every 1/64 bit from 2 to 16
        buffer = torch.tensor(bits, dtype=torch.float32)
        levels, lo, hi = grid_of(float(buffer), spec)
        traced = traced_grid(buffer, spec, torch.float32)
        assert [t.item() for t in traced] == [torch.tensor(levels, dtype=torch.float32).item(), lo, hi], bits


def quant_linear(scale: str, granularity: str, activations: str, static: bool = False) -> QuantLinear:
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(
        torch.nn.Linear(64, 32), weight_spec=QuantSpec(granularity=granularity, scale=scale), weight_bits=8,
        activation_spec=QuantSpec(granularity=activations, rounding="nearest"), activation_bits=8,
        static_activations=static)
    if static:
        with calibrate_activations(layer):
            layer(torch.randn(4, 10, 64))
    return layer


def step_through(widths, eager: QuantLinear, compiled: QuantLinear) -> tuple[float, float, float]:
    """Forward and backward of both layers at each width; the largest output difference, the largest relative
    difference of the input's and weight's gradients, and of a learned scale's (0 without one)."""
    out_diff = grad_diff = scale_diff = 0.0
    x = torch.randn(4, 10, 64, generator=torch.Generator().manual_seed(1))
    for bits in widths:
        grads = []
        for layer in (eager, compiled):
            layer.weight_quantizer.set_bits(bits)
            layer.zero_grad()
            xi = x.clone().requires_grad_()
            y = layer(xi)
            y.square().sum().backward()
            params = [xi.grad, layer.weight.grad] + ([layer.weight_quantizer.scale.grad]
                                                     if layer.weight_quantizer.spec.scale == "learned" else [])
            grads.append((y.detach(), params))
        (y_e, g_e), (y_c, g_c) = grads
        out_diff = max(out_diff, (y_e - y_c).abs().max().item())
        for i, (a, b) in enumerate(zip(g_e, g_c)):
            assert (a is None) == (b is None)  # a learned scale has no gradient at full precision
            if a is None:
                continue
            diff = ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()
            if i < 2:
                grad_diff = max(grad_diff, diff)
            else:
                scale_diff = max(scale_diff, diff)
    return out_diff, grad_diff, scale_diff


@pytest.mark.parametrize("activations", ["per_tensor", "per_channel"])  # per_channel: per-token activations
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
@pytest.mark.parametrize("scale", ["max", "learned", "mse"])
def test_a_change_of_bits_reuses_the_compiled_graphs(scale, granularity, activations):
    counts = {}
    for name, widths in (("fractional", FRACTIONAL), ("smooth", SMOOTH)):
        torch._dynamo.reset()
        eager = quant_linear(scale, granularity, activations)
        compiled = copy.deepcopy(eager)
        counter = CompileCounterWithBackend("eager")
        compiled.compile(backend=counter, fullgraph=scale != "mse")  # mse searches its clip ratio eagerly
        out_diff, grad_diff, scale_diff = step_through([32, *widths], eager, compiled)
        assert out_diff == 0.0, (name, out_diff)
        # learned: x * s / s is not always x in floats (measured: 2e-6 of the largest entry); LSQ's scale gradient
        # is a sum over the scale's group of terms that largely cancel, which autograd and the hand-written
        # backward add in different orders (measured: up to 3.5e-3 of it per tensor, 2e-6 per channel)
        assert grad_diff <= (1e-5 if scale == "learned" else 0.0), (name, grad_diff)
        assert scale_diff <= 1e-2, (name, scale_diff)
        counts[name] = counter.frame_count
    # 9 widths and 33 compile the same graphs: the full-precision one, the quantizing one and, for mse, the
    # pieces around its eager search on the first step at each new width
    assert counts["fractional"] == counts["smooth"], counts
    assert counts["smooth"] <= (2 if scale != "mse" else 8), counts


def test_static_activations_compile_to_the_eager_values():
    eager = quant_linear("max", "per_channel", "per_tensor", static=True)
    compiled = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("eager")
    compiled.compile(backend=counter, fullgraph=True)
    assert step_through(FRACTIONAL, eager, compiled) == (0.0, 0.0, 0.0)
    assert counter.frame_count == 1


def test_compiled_blocks_of_a_real_student_match_eager_and_hooks_do_not_recompile(tiny_sana_transformer,
                                                                                  tiny_sana_batch):
    from train_support import quantizer_preset

    from fraqat_cli.student.build import build_student

    student, _ = build_student(tiny_sana_transformer, quantizer_preset("per_channel"), None, start_bits=8)
    compiled = copy.deepcopy(student)
    counter = CompileCounterWithBackend("eager")
    blocks = compile_blocks(compiled, (type(student.transformer_blocks[0]),), backend=counter)
    assert blocks == len(student.transformer_blocks)
    assert set(compiled.state_dict()) == set(student.state_dict())  # checkpoints see the same module
    graphs = []
    for bits in FRACTIONAL:
        outputs = []
        for model in (student, compiled):
            set_weight_bits(model, bits)
            hook = model.transformer_blocks[0].register_forward_hook(lambda *args: None)  # as the feature loss
            outputs.append(model(**tiny_sana_batch, return_dict=False)[0])
            hook.remove()
        assert torch.equal(*outputs), bits
        graphs.append(counter.frame_count)
    assert graphs[0] >= 1 and graphs[-1] == graphs[0], graphs  # all blocks share one graph, at every width


def test_no_block_of_the_named_classes_is_one_clear_error(tiny_sana_transformer):
    message = r"compile.enabled=true: no block of the student is one of model.block_classes \(Bilinear\)"
    with pytest.raises(ValueError, match=message):
        compile_blocks(tiny_sana_transformer, (torch.nn.Bilinear,))


@pytest.mark.slow
def test_inductor_compiles_a_quantized_layer_to_the_eager_values():
    eager = quant_linear("max", "per_channel", "per_channel")
    compiled = copy.deepcopy(eager)
    compiled.compile(backend="inductor")
    out_diff, grad_diff, _ = step_through(FRACTIONAL, eager, compiled)
    assert out_diff == 0.0 and grad_diff <= 1e-6, (out_diff, grad_diff)


def student_tensors(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("student.")}


@pytest.mark.slow
def test_a_compiled_run_resumes_and_exports_as_the_eager_run(tmp_path, cache_dir):
    """Trained compiled (aot_eager: AOTAutograd's graphs, eager kernels) for 4 steps, and again resumed from its
    step-2 checkpoint, the student ends where the eager run's does and exports the same integer codes."""
    runs = {name: tmp_path / name for name in ("eager", "compiled", "resumed")}
    common = [*FAST, "quantizer=per_channel", "checkpoint.optimizer=true"]  # step checkpoints resumable
    on = ["compile.enabled=true", "compile.backend=aot_eager"]
    step_2 = runs["compiled"] / "checkpoints" / "step-000002.ckpt"
    for name, extra in (("eager", []), ("compiled", on), ("resumed", [*on, f"resume={step_2}"])):
        result = fraqat_train([*common, *extra, f"hydra.run.dir={runs[name]}"], cwd=tmp_path, cache_dir=cache_dir)
        assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {step_2}" in result.stdout + result.stderr
    reference = student_tensors(runs["eager"])
    for name in ("compiled", "resumed"):
        tensors = student_tensors(runs[name])
        assert tensors.keys() == reference.keys()
        for key in reference:
            torch.testing.assert_close(tensors[key], reference[key], rtol=1e-4, atol=1e-6, equal_nan=True,
                                       msg=f"{name} {key}")
    codes = {}
    for name in ("eager", "resumed"):
        out = runs[name] / "student.safetensors"
        result = console("fraqat-export", [f"ckpt={runs[name]}", f"out={out}"], cwd=tmp_path, cache_dir=cache_dir)
        assert result.returncode == 0, result.stderr[-3000:]
        codes[name] = {k: v for k, v in load_file(out).items() if v.dtype in (torch.int8, torch.uint8)}
    assert codes["eager"] and codes["eager"].keys() == codes["resumed"].keys()
    differing = [k for k in codes["eager"] if not torch.equal(codes["eager"][k], codes["resumed"][k])]
    assert not differing, f"{len(differing)} of {len(codes['eager'])} code tensors differ, e.g. {differing[:3]}"


@pytest.mark.slow
def test_a_compiled_student_shards_and_replicates_alike(tmp_path, cache_dir):
    """FSDP2 (a unit per block, its all-gather hooks eager around the compiled forward) and DDP, each with the
    compiled student on two CPU processes, train the same 3 steps to the same student."""
    from test_sharding import TWO_CPU_PROCESSES

    runs = {}
    for strategy in ("fsdp", "ddp"):
        runs[strategy] = tmp_path / strategy
        result = fraqat_train([*FAST, *TWO_CPU_PROCESSES, f"trainer={strategy}", "trainer.max_steps=3",
                               "compile.enabled=true", "compile.backend=aot_eager", f"hydra.run.dir={runs[strategy]}"],
                              tmp_path, cache_dir)
        assert result.returncode == 0, result.stderr[-3000:]
    sharded, replicated = (student_tensors(runs[s]) for s in ("fsdp", "ddp"))
    assert sharded.keys() == replicated.keys()
    for key in sharded:
        torch.testing.assert_close(sharded[key], replicated[key], atol=1e-6, rtol=0, equal_nan=True, msg=key)
