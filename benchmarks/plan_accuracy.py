"""How close `fraqat-plan`'s traced peak is to the peak of the same training step run for real.

For each model and memory option (full QAT with AdamW, 8-bit AdamW, LoRA rank 16), the plan traces one step
on fake tensors (`fraqat_cli.plan.trace.trace_step`), then the same step runs on real tensors with random
weights: teacher and student built by `train.distillation_module`, the optimizer's state created by a first
step, then one measured micro-batch (teacher forward, student forward, backward, optimizer step).

Measured peak, CPU: the highest total of torch's memory profiler timeline over the step (`torch.profiler` with
`profile_memory`; it counts the tensors that existed before the step and are used in it), the step run eagerly.
CUDA: `torch.cuda.max_memory_allocated` over the step as training runs it (a compiled optimizer compiled).
Saving: full's peak minus the option's, planned against measured.

    python benchmarks/plan_accuracy.py                              # CPU: the toy and a larger tiny Sana
    python benchmarks/plan_accuracy.py --device cuda --model pixart_sigma --resolution 512 --batch-size 2
    python benchmarks/plan_accuracy.py --model flux_schnell --options lora-base --resolution 256 \
        --override model.architecture.num_layers=1 model.architecture.num_single_layers=1 \
        model.max_sequence_length=64 --batch-size 1    # one real-width FLUX block of each kind: bf16 LoRA base
    python benchmarks/plan_accuracy.py --model pixart_sigma --resolution 512 --save-row row.safetensors  # then,
    python benchmarks/plan_accuracy.py --device cuda --model pixart_sigma --resolution 512 --row row.safetensors
                                       # where transformers (the stand-in text encoders) is not installed
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
import warnings

import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from safetensors.torch import load_file, save_file

from fraqat_cli.models.architecture import build_transformer
from fraqat_cli.models.loading import model_dtype
from fraqat_cli.plan.trace import (
    _first_optimizer,
    autocast_dtype,
    example_row,
    stand_in_data,
    trace_step,
)

OPTIONS = {"full AdamW": [], "8-bit AdamW": ["optim=adamw8bit"],
           "LoRA r16": ["trainable=lora", "trainable.lora.rank=16"]}
# A tiny Sana wide enough that activations, not fixed costs, dominate: 4 blocks of width 256 (~4.6 M parameters).
LARGER_TINY_SANA = ["model=tiny_sana", "model.components.transformer.num_attention_heads=4",
                    "model.components.transformer.attention_head_dim=64", "model.components.transformer.num_layers=4",
                    "model.components.transformer.cross_attention_dim=256", "model.resolution=64"]
CPU_MODELS = {"toy": ["model=toy"], "larger tiny_sana": LARGER_TINY_SANA}
# The 1-GPU FLUX recipe's memory options: LoRA with 8-bit AdamW, its frozen base a float32 copy or the teacher's
# 16-bit values (trainable.lora.base_dtype); the first option of a set is the one the others' savings are against.
LORA_BASE = {f"LoRA r16 + 8-bit, {name} base": ["optim=adamw8bit", "trainable=lora", f"trainable.lora.base_dtype={key}"]
             for name, key in (("float32", "float32"), ("bf16", "teacher"))}
OPTION_SETS = {"memory": OPTIONS, "lora-base": LORA_BASE}


def config(overrides: list[str]):
    with initialize_config_module("fraqat_cli.conf", version_base="1.3"):
        return compose("plan", overrides=overrides)


def measured_peak(cfg, batch_size: int, device: str, row: dict) -> int:
    """Peak bytes of one real step, after a first step has created the optimizer state."""
    from fraqat_cli.train.assembly import distillation_module

    teacher = build_transformer(cfg.model, device=device, dtype=model_dtype(cfg.model))
    data = stand_in_data(cfg, teacher, batch_size)
    module, _ = distillation_module(cfg, data, instantiate(cfg.schedule))
    optimizer = _first_optimizer(module.configure_optimizers())
    params = [p for p in module.student.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    batch = {k: v.expand(batch_size, *v.shape[1:]).contiguous().to(device) for k, v in row.items()}
    compute = autocast_dtype(cfg.trainer.precision)

    def step():
        with torch.autocast(device, dtype=compute or torch.bfloat16, enabled=compute is not None):
            loss = module.distillation_loss(batch)["loss"]
        loss.backward()
        optimizer.step()

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    # Eager, as the plan traces it: under the profiler a compiled update (torchao's 8-bit AdamW, recompiled per
    # parameter shape) takes minutes and its timeline longer; on CUDA the measured step is the compiled one.
    with torch.compiler.set_stance("force_eager"), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
            with_stack=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as folder:  # the profiler's memory timeline: bytes per category over time
        path = os.path.join(folder, "timeline.json")
        prof.export_memory_timeline(path, device="cpu")
        _, sizes = json.loads(open(path).read())
    return max(sum(categories) for categories in sizes)


def run(models: dict, device: str, batch_size: int, row_file: str | None, options: dict = OPTIONS) -> list[dict]:
    rows = []
    for name, base in models.items():
        row = load_file(row_file) if row_file else example_row(config(base).model)
        for option, extra in options.items():
            cfg = config([*base, *extra])
            start = time.perf_counter()
            try:
                planned = trace_step(cfg, batch_size, accumulating=False, row=row).peak_bytes
            except ValueError as error:  # an option this machine cannot run (optim=adamw8bit without torchao)
                print(f"{name}, {option}: skipped ({error})")
                continue
            plan_s = time.perf_counter() - start
            measured = measured_peak(cfg, batch_size, device, row)
            rows.append({"model": name, "option": option, "planned": planned, "measured": measured, "plan_s": plan_s})
            gc.collect()  # the step's models go before the next option's are built
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict]) -> None:
    print("| model | option | planned peak | measured peak | planned / measured | planned saving | measured saving "
          "| saving ratio | plan time |")
    print("|---|---|---|---|---|---|---|---|---|")
    full = {}
    for r in rows:  # each model's first option: the one the savings are against
        full.setdefault(r["model"], r)
    for r in rows:
        base = full[r["model"]]
        saving_p, saving_m = base["planned"] - r["planned"], base["measured"] - r["measured"]
        ratio = f"{saving_p / saving_m:.3f}" if r is not base and saving_m > 0 else "-"
        print(f"| {r['model']} | {r['option']} | {r['planned'] / 2**20:,.1f} MiB | {r['measured'] / 2**20:,.1f} MiB "
              f"| {r['planned'] / r['measured']:.3f} | {saving_p / 2**20:,.1f} MiB | {saving_m / 2**20:,.1f} MiB "
              f"| {ratio} | {r['plan_s']:.1f} s |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default=None, help="a conf/model name (default: the toy and a larger tiny Sana)")
    parser.add_argument("--resolution", type=int, default=None, help="model.resolution override (px)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--save-row", default=None, help="write --model's example training row (its conditioning "
                        "and latents, from the stand-in text encoders and VAE) to this safetensors file and stop")
    parser.add_argument("--row", default=None, help="read the example row from a --save-row file (a machine "
                        "without transformers)")
    parser.add_argument("--options", default="memory", choices=sorted(OPTION_SETS),
                        help="memory: full AdamW, 8-bit AdamW, LoRA; lora-base: LoRA + 8-bit, a float32 or bf16 base")
    parser.add_argument("--override", nargs="*", default=[], help="more config overrides for --model (e.g. fewer "
                        "blocks of the real width: model.architecture.num_layers=1)")
    parser.add_argument("--precision", default=None, help="trainer.precision (default: 32-true on CPU, "
                                                          "bf16-mixed on CUDA)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", message=".*export_memory_timeline.* is deprecated")  # the CPU timeline's only API
    precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32-true")
    common = [f"trainer.precision={precision}", "logger=none", "selection=all_linear"]
    if args.resolution:
        common.append(f"model.resolution={args.resolution}")
    models = {args.model: [f"model={args.model}", *args.override]} if args.model else CPU_MODELS
    models = {name: [*overrides, *common] for name, overrides in models.items()}
    if args.save_row:
        if not args.model:
            raise SystemExit("--save-row needs --model")
        save_file(example_row(config(models[args.model]).model), args.save_row)
        print(f"wrote {args.save_row}")
        return
    print(f"device {args.device}, batch {args.batch_size}, {precision}, every linear layer quantized, "
          f"per-tensor W4A8 fake quantization")
    print_table(run(models, args.device, args.batch_size, row_file=args.row, options=OPTION_SETS[args.options]))


if __name__ == "__main__":
    main()
