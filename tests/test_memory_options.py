"""The options that make a run fit (issue 11): 8-bit AdamW states (`optim=adamw8bit`) and low-rank QAT
(`trainable=lora`). Each is a plain config choice; each trains, resumes, evaluates and exports; LoRA's
deployed codes are its fake-quantized merged weights."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf
from train_support import FAST, console, fraqat_train, quantizer_preset

from fraqat_cli.quant import QuantLinear, fake_quantize, set_weight_bits
from fraqat_cli.student.build import build_student
from fraqat_cli.student.checkpoint import LAST, StudentCheckpoint, load_checkpoint
from fraqat_cli.student.lora import add_lora, merge_lora
from fraqat_cli.student.rebuild import rebuild_student
from fraqat_cli.train.distill import freeze_all_but

QUANTIZER = quantizer_preset("per_channel")
LORA_PATTERNS = list(OmegaConf.load("conf/trainable/lora.yaml").patterns)


def compose_train(*overrides: str):
    with initialize_config_module(config_module="fraqat_cli.conf", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


# --- optim: the config group ------------------------------------------------------------------------------------


def test_optim_is_a_group_whose_settings_still_override_and_recipes_still_set():
    import torchao.optim as torchao

    params = [torch.nn.Parameter(torch.zeros(4096))]
    default = instantiate(compose_train("optim.lr=3e-4").optim)(params)
    assert type(default) is torch.optim.AdamW and default.defaults["lr"] == 3e-4
    assert default.defaults["weight_decay"] == 0.0 and not default.defaults["fused"]  # CPU parameters: not fused
    eight = instantiate(compose_train("optim=adamw8bit", "optim.lr=3e-4", "optim.betas=[0.8,0.9]").optim)(params)
    assert type(eight) is torchao.AdamW8bit and eight.defaults["betas"] == (0.8, 0.9)
    assert float(eight.param_groups[0]["lr"]) == pytest.approx(3e-4) and eight.defaults["weight_decay"] == 0.0
    recipe = compose_train("experiment=sd35_medium_w4a8", "optim=adamw8bit")
    assert recipe.optim.lr == 1e-6 and recipe.optim._target_.endswith("adamw8bit")


# --- optim=adamw8bit --------------------------------------------------------------------------------------------


def state_bytes(optimizer) -> int:
    """Bytes of an optimizer's moments, a tensor subclass counted by the plain tensors inside it."""
    return sum(inner.nbytes for state in optimizer.state.values() for key in ("exp_avg", "exp_avg_sq")
               for inner in _plain_tensors(state[key]))


def fit_steps(model, optimizer, steps: int, first: int = 0) -> None:
    for step in range(first, first + steps):
        x = torch.randn(8, 256, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 256, bias=False), torch.nn.Tanh(),
                               torch.nn.Linear(256, 256, bias=False))


def test_adamw8bit_keeps_its_moments_in_about_a_quarter_of_adamws_bytes():
    from fraqat_cli.train.optimizers import adamw, adamw8bit

    full, eight = small_model(), small_model()
    optimizers = adamw(full.parameters(), lr=1e-3), adamw8bit(eight.parameters(), lr=1e-3)
    fit_steps(full, optimizers[0], 1)
    fit_steps(eight, optimizers[1], 1)
    ratio = state_bytes(optimizers[1]) / state_bytes(optimizers[0])
    values = 256 * 256  # per weight: 8-bit codes, a float32 scale per 256 values, a 256-entry float32 code map
    assert ratio == pytest.approx((values + 4 * values / 256 + 4 * 256) / (4 * values), rel=1e-6)  # 0.258
    moved = [(a - b).abs().max().item() for a, b in zip(full.parameters(), eight.parameters())]
    assert max(moved) < 1e-5, "one step of each moves the weights alike (the first step's moments are exact-ish)"


def test_checkpoint_sizing_counts_the_moments_each_optimizer_keeps():
    """`optimizers.state_bytes` (what fraqat-train prints and checks free disk space against) against the state
    torch's and torchao's optimizers really hold: 8-bit only for tensors of 4,096+ values in whole blocks."""
    from fraqat_cli.train.optimizers import adamw, adamw8bit
    from fraqat_cli.train.optimizers import state_bytes as sized

    shapes = [((256, 256), torch.float32), ((300, 100), torch.float32), ((64, 64), torch.float32),
              ((256,), torch.float32), ((256, 256), torch.bfloat16)]
    for name, make in (("adamw", adamw), ("adamw8bit", adamw8bit)):
        params = [torch.nn.Parameter(torch.randn(*shape, dtype=dtype)) for shape, dtype in shapes]
        optimizer = make(params, lr=1e-3)
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
        cfg = compose_train(f"optim={name}").optim
        for p in params:
            state = optimizer.state[p]
            plain = [inner for t in state.values() for inner in _plain_tensors(t)]
            assert sized(cfg, p) == (sum(t.nbytes for t in plain), len(plain)), (name, tuple(p.shape), p.dtype)


def _plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The tensors a checkpoint stores for `t`: itself, or the plain tensors inside a tensor subclass."""
    names = t.__tensor_flatten__()[0] if hasattr(t, "__tensor_flatten__") else None
    return [getattr(t, n) for n in names] if names else [t]


def test_adamw8bit_resumes_from_a_weights_only_checkpoint_exactly(tmp_path):
    """2 steps, a checkpoint written and read as fraqat's are (weights_only), 2 more steps: the weights equal
    4 uninterrupted steps bit for bit. (A fresh interpreter, torchao not yet imported, reads such a file in the
    slow test below: fraqat-export maps the whole last.ckpt.)"""
    from fraqat_cli.train.checkpointing import AtomicCheckpointIO
    from fraqat_cli.train.optimizers import adamw8bit

    straight = small_model()
    fit_steps(straight, adamw8bit(straight.parameters(), lr=1e-3), 4)

    first = small_model()
    optimizer = adamw8bit(first.parameters(), lr=1e-3)
    fit_steps(first, optimizer, 2)
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": first.state_dict(),
                                          "optimizer_states": [optimizer.state_dict()]}, path)
    stored = load_checkpoint(path)
    resumed = small_model()
    resumed.load_state_dict(stored["state_dict"])
    optimizer = adamw8bit(resumed.parameters(), lr=1e-3)
    optimizer.load_state_dict(stored["optimizer_states"][0])
    assert type(optimizer.state[resumed[0].weight]["exp_avg"]).__name__ == "OptimState8bit"
    fit_steps(resumed, optimizer, 2, first=2)
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))



# --- trainable=lora ---------------------------------------------------------------------------------------------


def lora_student(teacher, rank: int = 4, alpha: float = 8.0):
    student, _ = build_student(teacher, QUANTIZER, None, start_bits=4)
    summary = add_lora(student, rank, alpha)
    freeze_all_but(student, LORA_PATTERNS)
    return student, summary


def quantized_weights(model) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {n: m.weight_quantizer(m.weight).clone() for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def train_lora(student, batch, steps: int = 3, lr: float = 1e-2) -> None:
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr)
    target = torch.randn_like(student(**batch).sample)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(student(**batch).sample, target).backward()
        optimizer.step()


def test_a_lora_student_starts_as_the_full_qat_student(tiny_sana_transformer, tiny_sana_batch):
    full, _ = build_student(tiny_sana_transformer, QUANTIZER, None, start_bits=4)
    student, _ = lora_student(tiny_sana_transformer)
    with torch.no_grad():
        assert torch.equal(student(**tiny_sana_batch).sample, full(**tiny_sana_batch).sample)


def test_only_the_low_rank_updates_train_and_the_base_weights_stay(tiny_sana_transformer, tiny_sana_batch):
    student, summary = lora_student(tiny_sana_transformer, rank=4)
    layers = {n: m for n, m in student.named_modules() if isinstance(m, QuantLinear)}
    trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
    assert summary.layers == len(layers) and len(trainable) == 2 * len(layers)
    expected = sum(4 * (m.in_features + m.out_features) for m in layers.values())
    assert summary.trainable_params == expected == sum(p.numel() for p in trainable.values())
    base = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
    before = quantized_weights(student)
    train_lora(student, tiny_sana_batch)
    assert all(torch.equal(p, base[n]) for n, p in student.named_parameters() if not p.requires_grad)
    after = quantized_weights(student)
    assert sum(not torch.equal(before[k], after[k]) for k in before) > len(before) // 2


def test_the_quantizer_sees_the_merged_weight_at_the_scheduled_bits(tiny_sana_transformer, tiny_sana_batch):
    student, _ = lora_student(tiny_sana_transformer, rank=2, alpha=4)
    train_lora(student, tiny_sana_batch)
    set_weight_bits(student, 5.5)  # what the fractional schedule's callback does
    for name, layer in ((n, m) for n, m in student.named_modules() if isinstance(m, QuantLinear)):
        update = layer.parametrizations.weight[0]
        merged = layer.parametrizations.weight.original + (update.lora_B @ update.lora_A) * (4 / 2)
        expected = fake_quantize(merged, 5.5, granularity=QUANTIZER.granularity, rounding=QUANTIZER.rounding)
        assert torch.equal(quantized_weights(layer)[""], expected), name


def test_merging_bakes_the_update_into_the_weight_exactly(tiny_sana_transformer, tiny_sana_batch):
    student, _ = lora_student(tiny_sana_transformer)
    train_lora(student, tiny_sana_batch)
    expected = quantized_weights(student)
    with torch.no_grad():
        output = student(**tiny_sana_batch).sample
    assert merge_lora(student) == len(expected)
    assert not any("lora" in k or "parametrizations" in k for k in student.state_dict())
    got = quantized_weights(student)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    with torch.no_grad():
        assert torch.equal(student(**tiny_sana_batch).sample, output)


def test_a_lora_checkpoint_rebuilds_to_the_student_it_trained(tiny_sana_transformer, tiny_sana_batch, tmp_path):
    student, _ = lora_student(tiny_sana_transformer)
    train_lora(student, tiny_sana_batch)
    config = {"quantizer": OmegaConf.to_container(QUANTIZER), "selection": None, "trainable": {"lora": {}}}
    path = StudentCheckpoint.of_student(student, config, step=3).write(tmp_path / "step-000003.ckpt")
    expected = quantized_weights(student)
    with torch.no_grad():
        output = student.eval()(**tiny_sana_batch).sample
    for bake in (False, True):  # export reads master weights, eval quantizes once
        rebuilt = rebuild_student(StudentCheckpoint.read(path), tiny_sana_transformer, bake=bake)
        got = quantized_weights(rebuilt)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
        with torch.no_grad():
            assert torch.equal(rebuilt(**tiny_sana_batch).sample, output)


def test_a_16bit_base_trains_and_rebuilds_as_the_float32_copy_of_it(tiny_sana_transformer, tiny_sana_batch,
                                                                     tmp_path):
    """`trainable.lora.base_dtype: teacher`: a bf16 teacher's student keeps its frozen base in bf16 (half the
    bytes) and computes, trains and rebuilds exactly as the float32 copy of the same bf16 values does."""
    teacher = copy.deepcopy(tiny_sana_transformer).to(torch.bfloat16)
    students = {}
    for dtype in (None, torch.bfloat16):
        student, _ = build_student(teacher, QUANTIZER, None, start_bits=4)
        torch.manual_seed(1)  # the same A for both
        add_lora(student, 4, 8.0, base_dtype=dtype)
        freeze_all_but(student, LORA_PATTERNS)
        students[dtype] = student
    wide, narrow = students[None], students[torch.bfloat16]
    bases = [n for n, _ in narrow.named_parameters() if n.endswith(".parametrizations.weight.original")]
    assert bases and all(narrow.get_parameter(n).dtype == torch.bfloat16 for n in bases)
    assert all(wide.get_parameter(n).dtype == torch.float32 for n in bases)
    saved = sum(wide.get_parameter(n).nbytes - narrow.get_parameter(n).nbytes for n in bases)
    assert saved == sum(narrow.get_parameter(n).nbytes for n in bases)  # half of the float32 base
    batch = {k: v.float() if v.is_floating_point() else v for k, v in tiny_sana_batch.items()}
    for student in (wide, narrow):
        torch.manual_seed(2)
        train_lora(student, batch)
    trained = dict(narrow.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in wide.named_parameters() if p.requires_grad)
    assert quantized_weights(narrow).keys() == quantized_weights(wide).keys()
    assert all(torch.equal(a, b) for a, b in zip(quantized_weights(narrow).values(), quantized_weights(wide).values()))
    config = {"quantizer": OmegaConf.to_container(QUANTIZER), "selection": None, "trainable": {"lora": {}}}
    path = StudentCheckpoint.of_student(narrow, config, step=3).write(tmp_path / "step-000003.ckpt")
    with torch.no_grad():
        output = wide.eval()(**batch).sample
        rebuilt = rebuild_student(StudentCheckpoint.read(path), teacher)
        assert torch.equal(rebuilt(**batch).sample, output)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rank": 0, "alpha": 1}, "trainable.lora.rank must be a positive integer; got 0"),
    ({"rank": 4, "alpha": -1}, "trainable.lora.alpha must be a positive number; got -1"),
    ({"rank": 4, "alpha": 4, "layers": ["*nothing*"]}, r"trainable.lora.layers \['\*nothing\*'\] match no quantized"),
], ids=["rank", "alpha", "layers"])
def test_bad_lora_settings_name_the_value_and_what_is_allowed(tiny_sana_transformer, kwargs, message):
    student, _ = build_student(tiny_sana_transformer, QUANTIZER, None, start_bits=4)
    with pytest.raises(ValueError, match=message):
        add_lora(student, **kwargs)


# --- both, through the console scripts ---------------------------------------------------------------------------


@pytest.mark.slow
def test_lora_with_8bit_adamw_trains_resumes_evaluates_and_exports_the_toy(tmp_path, cache_dir):
    """The one-GPU setting for large models, on the toy: 2 steps, resumed to 4, exported and evaluated. The
    exported codes are the fake-quantized merged weights W + alpha/rank B A, computed here from the checkpoint."""
    from fraqat_cli.export.safetensors_file import load_packed

    run = tmp_path / "run"
    fast = [a for a in FAST[1:] if not a.startswith("trainer.max_steps=")]
    args = ["model=toy", *fast, "optim=adamw8bit", "trainable=lora", "trainable.lora.rank=32",
            "trainable.lora.alpha=64", f"hydra.run.dir={run}"]
    first = fraqat_train([*args, "trainer.max_steps=2"], cwd=tmp_path, cache_dir=cache_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "LoRA-QAT rank 32 (alpha 64)" in first.stdout
    resumed = fraqat_train([*args, "trainer.max_steps=4", "resume=force"], cwd=tmp_path, cache_dir=cache_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and json.loads((run / "metrics.json").read_text())["steps"] == 4
    stored = load_checkpoint(run / "checkpoints" / LAST)
    moments = stored["optimizer_states"][0]["state"]
    # torchao keeps tensors of at least 4,096 values (a multiple of its 256-value block) in 8 bits; the toy's
    # layers are 128 wide or more, so at rank 32 every A (32 x in) and B (out x 32) qualifies
    assert moments and all(type(m["exp_avg"]).__name__ == "OptimState8bit" for m in moments.values())
    printed = re.search(r"resumable ([0-9.]+) MiB \(last.ckpt: \+ 8-bit AdamW state", first.stdout)
    assert printed and float(printed.group(1)) * 2**20 == pytest.approx(
        (run / "checkpoints" / LAST).stat().st_size, rel=0.03), "sized before training as the file came out"

    exported = console("fraqat-export", [f"ckpt={run}"], cwd=tmp_path, cache_dir=cache_dir)
    assert exported.returncode == 0, exported.stderr[-3000:]
    deployed = load_packed(run / "export" / "student.safetensors").transformer.state_dict()
    state = {k.removeprefix("student."): v for k, v in stored["state_dict"].items()}
    layers = [k.removesuffix(".parametrizations.weight.original") for k in state if k.endswith("weight.original")]
    assert layers and all(f"{layer}.weight" in deployed for layer in layers)
    for layer in layers:
        update = f"{layer}.parametrizations.weight.0."
        merged = state[f"{layer}.parametrizations.weight.original"] + (
            state[update + "lora_B"] @ state[update + "lora_A"]) * (64 / 32)
        expected = fake_quantize(merged, 4, granularity="per_tensor", rounding="nearest_int_range")
        assert torch.equal(deployed[f"{layer}.weight"], expected), layer

    evaluated = console("fraqat-eval", [f"ckpt={run}", "prompts.count=4", "batch_size=4", "logger=none",
                                        "clip.model=null", f"hydra.run.dir={tmp_path}/eval",
                                        f"results_csv={tmp_path}/results.csv"], cwd=tmp_path, cache_dir=cache_dir)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    results = json.loads(next((run / "eval").glob("*/results.json")).read_text())
    assert results["weight_bits"] == 4.0 and results["fid"] >= 0


def test_8bit_moments_under_fsdp_are_refused_before_a_model_is_built():
    from fraqat_cli.train.command import check_numbers

    check_numbers(compose_train("trainer=ddp", "optim=adamw8bit"))
    check_numbers(compose_train("trainer=fsdp", "optim=adamw"))
    with pytest.raises(ValueError, match="optim=adamw8bit cannot be checkpointed under trainer=fsdp"):
        check_numbers(compose_train("trainer=fsdp", "optim=adamw8bit"))


@pytest.mark.parametrize(("override", "message"), [
    ("trainable.lora.rank=0", "trainable.lora.rank must be a positive integer; got 0"),
    ("trainable.lora.alpha=0", "trainable.lora.alpha must be a positive number; got 0"),
    ("trainable.lora.base_dtype=fp8", "trainable.lora.base_dtype='fp8' is not allowed; allowed: teacher, float32"),
], ids=["rank", "alpha", "base_dtype"])
def test_bad_lora_numbers_are_refused_before_a_model_is_built(override, message):
    from fraqat_cli.train.command import check_numbers

    with pytest.raises(ValueError, match=message):
        check_numbers(compose_train("trainable=lora", override))
