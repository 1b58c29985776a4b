"""Where a distillation step's time goes: teacher forward, student forward, backward (+ optimizer).

Prints, from one run with the phases interleaved round-robin and medians taken:
  teacher forward / whole distillation step     (target < 0.35)
  whole distillation step / plain fp training step of the same model   (target <= 1.6)
and the peak memory of each kind of step, each measured in a fresh process
(on CPU, resident memory sampled every ms above its level before the steps; on a
GPU, `torch.cuda.max_memory_allocated`).

With --compile, the compiled student instead (`compile.enabled=true`: its blocks under torch.compile, inductor),
four distillation steps interleaved (eager and compiled, W4A8 and full precision), the teacher eager in all as
in training:
  compiled W4A8 step / compiled step of the same student at full precision   (target <= 1.10)
  compiled W4A8 step / eager W4A8 step                                       (target <= 0.8 at "larger")
and the seconds the first steps took to compile.

    python benchmarks/train_step.py            # the "larger" Sana (~5 M parameters)
    python benchmarks/train_step.py --smoke    # tiny model, seconds
    python benchmarks/train_step.py --compile  # compiled against eager, "larger"
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from functools import partial

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from fraqat_cli.models.conditioning import conditioning_of
from fraqat_cli.models.families import SanaFamily
from fraqat_cli.models.noise import FlowMatchingNoise
from fraqat_cli.quant import set_activation_bits, set_weight_bits
from fraqat_cli.student.build import build_student
from fraqat_cli.train.compiled import compile_blocks
from fraqat_cli.train.distill import DistillationModule
from fraqat_cli.train.optimizers import adamw

# The tiny model is conf/model/tiny_sana.yaml's transformer, composed as fraqat-train composes it; "larger" widens it.
with initialize_config_module(config_module="fraqat_cli.conf", version_base="1.3"):
    CFG = compose(config_name="train",
                  overrides=["model=tiny_sana", "quantizer=per_channel", "quantizer.rounding=floor"])
SIZES = {
    # (overrides of the tiny transformer's config, batch, latent side, caption length)
    "tiny": ({}, 4, 16, 16),
    "larger": (dict(num_attention_heads=8, num_layers=6, num_cross_attention_heads=8, cross_attention_dim=256,
                    caption_channels=64), 8, 32, 32),
}
QUANTIZER, SELECTION = CFG.quantizer, CFG.selection


def build(size: str, device: str):
    kwargs, batch, side, length = SIZES[size]
    torch.manual_seed(0)
    teacher = instantiate(CFG.model.components.transformer, sample_size=side, **kwargs).to(device)
    noise = FlowMatchingNoise().bind({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})
    student, _ = build_student(teacher, QUANTIZER, SELECTION, start_bits=4)
    module = DistillationModule(teacher, student, SanaFamily(), noise, optimizer=partial(adamw, lr=1e-5),
                                trainable=["*"])
    plain = copy.deepcopy(teacher).train().requires_grad_(True)  # the same transformer, no quantizers
    g = torch.Generator().manual_seed(1)
    data = {
        "latents": torch.randn(batch, 4, side, side, generator=g),  # (B, C, H, W)
        "prompt_embeds": torch.randn(batch, length, teacher.config.caption_channels, generator=g),  # (B, L, D)
        "prompt_attention_mask": torch.ones(batch, length, dtype=torch.long),  # (B, L)
    }
    return module, plain, {k: v.to(device) for k, v in data.items()}


def sync(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def distillation_phases(module, batch, optimizer, device) -> dict[str, float]:
    """One distillation step, timed phase by phase (the same work as DistillationModule.distillation_loss)."""
    family, latents = module.family, batch["latents"]
    cond = conditioning_of(batch)
    noisy, timesteps = module.noise(latents, torch.randn_like(latents))
    kwargs = family.transformer_kwargs(noisy, timesteps, cond)
    t0 = sync(device)
    with torch.no_grad():
        target = module.teacher(**kwargs, return_dict=False)[0]
    t1 = sync(device)
    prediction = module.student(**kwargs, return_dict=False)[0]
    loss = F.mse_loss(prediction.float(), target.float())
    t2 = sync(device)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    t3 = sync(device)
    return {"teacher_forward": t1 - t0, "student_forward": t2 - t1, "backward_and_step": t3 - t2, "step": t3 - t0}


def plain_step(model, batch, optimizer, noise, family, device) -> float:
    """A full-precision training step of the same transformer (denoising MSE against random targets)."""
    latents = batch["latents"]
    cond = conditioning_of(batch)
    noisy, timesteps = noise(latents, torch.randn_like(latents))
    t0 = sync(device)
    prediction = model(**family.transformer_kwargs(noisy, timesteps, cond), return_dict=False)[0]
    loss = F.mse_loss(prediction.float(), latents.float())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return sync(device) - t0


class RssSampler:
    """Sample this process's resident memory every millisecond; report the peak above the starting level."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self.rss()
        self.running = True
        self.thread = threading.Thread(target=self.poll, daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def poll(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.001)

    def __enter__(self) -> RssSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()


def peak_memory_mib(size: str, kind: str, device: str) -> float:
    """Run steps of one kind in this (fresh) process; return the peak memory the steps need on top of the
    models and optimizer state (CPU: resident memory sampled every ms; GPU: max allocated)."""
    module, plain, batch = build(size, device)
    if kind == "distill":
        module.teacher.to(device)
        module.student.to(device)
        optimizer = module.configure_optimizers()
        step = lambda: distillation_phases(module, batch, optimizer, device)  # noqa: E731
    else:
        plain.to(device)
        optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-5)
        step = lambda: plain_step(plain, batch, optimizer, module.noise, module.family, device)  # noqa: E731
    step()  # creates the optimizer state
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step()
        return torch.cuda.max_memory_allocated() / 2**20
    with RssSampler() as sampler:
        for _ in range(3):
            step()
    return (sampler.peak - sampler.start) / 2**20


def measure(size: str, reps: int, device: str) -> dict:
    module, plain, batch = build(size, device)
    module.student.to(device)
    plain.to(device)
    optimizer = module.configure_optimizers()
    plain_optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-5)
    for _ in range(2):  # warm-up
        distillation_phases(module, batch, optimizer, device)
        plain_step(plain, batch, plain_optimizer, module.noise, module.family, device)
    phases, plains = [], []
    for _ in range(reps):  # interleaved, so machine noise hits both alike
        phases.append(distillation_phases(module, batch, optimizer, device))
        plains.append(plain_step(plain, batch, plain_optimizer, module.noise, module.family, device))
    median = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
    median["plain_step"] = statistics.median(plains)
    median["params"] = sum(p.numel() for p in plain.parameters())
    return median


def measure_compiled(size: str, reps: int, device: str) -> dict:
    """Median phase times of the student eager and compiled, each fake-quantized and at full precision (weights
    and activations at 32 bits: the same model without fake quantizers), interleaved; and each compile's time."""
    module, _, batch = build(size, device)
    module.student.to(device)
    arms = {"eager": module}
    for name in ("eager_fp", "compiled", "compiled_fp"):
        arm = DistillationModule(module.teacher, copy.deepcopy(module.student), module.family, module.noise,
                                 optimizer=partial(adamw, lr=1e-5), trainable=["*"])  # the same teacher
        if name.endswith("_fp"):
            set_weight_bits(arm.student, None)
            set_activation_bits(arm.student, None)
        if name.startswith("compiled"):
            compile_blocks(arm.student, (type(arm.student.transformer_blocks[0]),))
        arms[name] = arm
    optimizers = {name: torch.optim.AdamW([p for p in arm.student.parameters() if p.requires_grad], lr=1e-5)
                  for name, arm in arms.items()}
    warm_up = {}
    for name, arm in arms.items():  # the compiles happen here: forward and backward graphs, the first 2 steps
        start = time.perf_counter()
        for _ in range(2):
            distillation_phases(arm, batch, optimizers[name], device)
        warm_up[name] = time.perf_counter() - start
    steps = {name: [] for name in arms}
    for _ in range(reps):  # interleaved, so machine noise hits all four alike
        for name, arm in arms.items():
            steps[name].append(distillation_phases(arm, batch, optimizers[name], device))
    median = {name: {k: statistics.median(p[k] for p in phases) for k in phases[0]} for name, phases in steps.items()}
    return {"median": median, "warm_up": warm_up,
            "params": sum(p.numel() for p in module.student.parameters())}


def report_compiled(size: str, reps: int, device: str) -> None:
    m = measure_compiled(size, reps, device)
    median, warm = m["median"], m["warm_up"]
    print(f"Sana '{size}' ({m['params'] / 1e6:.2f} M params), device {device}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, median of {reps} interleaved steps")
    phases = ("teacher_forward", "student_forward", "backward_and_step", "step")
    print(f"| student | {' | '.join(f'{p}, ms' for p in phases)} | first 2 steps (compile), s |")
    print(f"|---|{'---|' * len(phases)}---|")
    for name in ("eager", "eager_fp", "compiled", "compiled_fp"):
        print(f"| {name} | {' | '.join(f'{1000 * median[name][p]:.1f}' for p in phases)} | {warm[name]:.1f} |")
    print()
    qat_over_fp = median["compiled"]["step"] / median["compiled_fp"]["step"]
    over_eager = median["compiled"]["step"] / median["eager"]["step"]
    print(f"eager W4A8 / eager fp         = {median['eager']['step'] / median['eager_fp']['step']:.3f}")
    print(f"compiled W4A8 / compiled fp   = {qat_over_fp:.3f}   (target <= 1.10: "
          f"{'met' if qat_over_fp <= 1.10 else 'MISSED'})")
    print(f"compiled W4A8 / eager W4A8    = {over_eager:.3f}   (target <= 0.8: "
          f"{'met' if over_eager <= 0.8 else 'MISSED'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model, few repetitions")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--size", choices=sorted(SIZES), default="larger")
    parser.add_argument("--compile", action="store_true", help="the compiled student against the eager one")
    parser.add_argument("--memory-of", choices=["distill", "plain"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size, reps = ("tiny", 2) if args.smoke else (args.size, args.reps)
    if args.compile:
        report_compiled(size, reps, device)
        return
    if args.memory_of:
        print(json.dumps({"peak_mib": peak_memory_mib(size, args.memory_of, device)}))
        return

    m = measure(size, reps, device)
    memory = {}
    for kind in ("distill", "plain"):
        out = subprocess.run(
            [sys.executable, __file__, "--size", size, "--memory-of", kind], capture_output=True, text=True, check=True
        )
        memory[kind] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
    ms = {k: 1000 * v for k, v in m.items() if k != "params"}
    teacher_share = m["teacher_forward"] / m["step"]
    overhead = m["step"] / m["plain_step"]
    print(
        f"Sana '{size}' ({m['params'] / 1e6:.2f} M params), device {device}, {torch.get_num_threads()} threads, "
        f"median of {reps} interleaved steps"
    )
    print("| phase | ms |\n|---|---|")
    for key in ("teacher_forward", "student_forward", "backward_and_step", "step", "plain_step"):
        print(f"| {key} | {ms[key]:.1f} |")
    label = "peak allocated" if device == "cuda" else "peak memory of the steps, above models + optimizer"
    print(f"| {label}, distillation (MiB) | {memory['distill']:.0f} |")
    print(f"| {label}, plain training (MiB) | {memory['plain']:.0f} |")
    print()
    verdict = "met" if teacher_share < 0.35 else "MISSED"
    print(f"teacher forward / whole step = {teacher_share:.3f}   (target < 0.35: {verdict})")
    print(f"whole step / plain fp step   = {overhead:.3f}   (target <= 1.6: {'met' if overhead <= 1.6 else 'MISSED'})")
    print(f"peak memory distill / plain  = {memory['distill'] / memory['plain']:.3f}")


if __name__ == "__main__":
    main()
