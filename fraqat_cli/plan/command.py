"""`fraqat-plan`: what a `fraqat-train` run will cost per device, and whether it fits, before it runs.

It takes fraqat-train's overrides, traces one training step (`fraqat_cli.plan.trace`: fake tensors, torch's
FLOP counter and memory tracker on the real architecture), spreads what the step holds over the configured
devices (DDP replicates the student; FSDP shards its weights, gradients and optimizer state), and writes
`plan.json` into the run's folder. The step is traced once, as configured; a run that does not fit gets the
options that would make it fit, each traced with its new peak (or, for a layout change alone, the same trace
spread again).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import hydra
import torch
from hydra import compose
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from fraqat_cli.checks import positive_int, positive_number
from fraqat_cli.cli import instantiate_or_raise, quiet_console, quiet_lightning, run_reporting_errors
from fraqat_cli.files import atomic_write
from fraqat_cli.plan.depth import trace_by_depth
from fraqat_cli.plan.trace import StepTrace, example_row
from fraqat_cli.train.checkpointing import FRAMING_BYTES_PER_FILE, FRAMING_BYTES_PER_TENSOR
from fraqat_cli.train.hydra_job import job_overrides, output_dir
from fraqat_cli.train.run_length import run_length
from fraqat_cli.train.sharding import BlockShardedFSDP

PLAN_FILE = "plan.json"
GB = 1e9


@dataclass(frozen=True)
class Layout:
    """How the run spreads over devices: `strategy` is single, ddp or fsdp."""

    strategy: str
    devices: int
    gpu: bool
    assumed: str | None = None  # what the plan had to assume about the machine, said beside the numbers


def layout_of(cfg: DictConfig) -> Layout:
    """The device count and strategy the trainer config asks for (`auto` devices: this machine's GPUs, or 1)."""
    trainer = cfg.trainer
    devices = trainer.devices
    if isinstance(devices, str) and devices != "auto":
        devices = int(devices) if devices.lstrip("-").isdigit() else devices
    assumed = None
    if devices in ("auto", -1):
        if torch.cuda.device_count() == 0:
            assumed = (f"1 device: trainer.devices={devices} counts this machine's GPUs and it has none; "
                       f"give trainer.devices=N (and trainer.num_nodes) to plan for N")
        devices = max(1, torch.cuda.device_count())
    elif OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        devices = len(devices)
    devices = positive_int("trainer.devices", devices) * positive_int("trainer.num_nodes",
                                                                        trainer.get("num_nodes", 1))
    strategy = trainer.get("strategy", "auto")
    if OmegaConf.is_dict(strategy):
        kind = "fsdp" if issubclass(get_class(strategy._target_), BlockShardedFSDP) else "ddp"
    else:
        kind = "fsdp" if "fsdp" in str(strategy) else "ddp" if "ddp" in str(strategy) else "single"
    return Layout(kind, devices, str(trainer.accelerator) != "cpu", assumed)


def per_device(trace: StepTrace, layout: Layout) -> dict:
    """Bytes per device by component, and the peak, from a trace of the whole student on one device.

    DDP keeps a second copy of the gradients in its communication buckets. FSDP divides the student's weights,
    gradients and optimizer state by the device count, and gathers at most two blocks at a time (the one
    computing and the one prefetched) with their unsharded gradients in backward, plus the parts outside
    the blocks. The teacher and the activations are the same on every device.
    """
    shards = layout.devices if layout.strategy == "fsdp" else 1
    parts = {
        "teacher_weights": trace.teacher_bytes,
        "student_weights": trace.student_bytes // shards,
        "gradients": trace.gradient_bytes // shards,
        "optimizer_state": trace.optimizer_bytes // shards,
        "activations": trace.activation_bytes,
    }
    extra = 0
    if layout.strategy == "ddp":
        extra = parts["ddp_buckets"] = trace.gradient_bytes
    if layout.strategy == "fsdp" and shards > 1:
        extra = parts["fsdp_gathered"] = 4 * trace.largest_block_bytes + trace.outside_blocks_bytes
    at_peak = trace.peak_breakdown
    shardable = at_peak.get("Parameter", 0) - trace.teacher_bytes + at_peak.get("Gradient", 0) \
        + at_peak.get("Optstate", 0)
    peak = trace.peak_bytes - shardable + shardable // shards + extra
    return {"parts": parts, "peak": peak}


def training_samples(cfg: DictConfig) -> int:
    """Rows the run trains on: `plan.samples`, else what the data config draws (COCO images or prompts)."""
    plan = cfg.get("plan") or {}
    if plan.get("samples") is not None:
        return positive_int("plan.samples", plan.samples)
    for key in ("max_images", "num_prompts"):
        if cfg.data.get(key) is not None:
            return positive_int(f"data.{key}", cfg.data[key])
    raise ValueError("the plan cannot tell how many rows the data config trains on; give plan.samples=N")


def _gpu(cfg: DictConfig) -> tuple[str, float, float]:
    """(name, peak bf16 FLOP/s, memory bytes) of `plan.gpu`, memory overridden by `plan.gpu_memory_gb`."""
    plan = cfg.plan
    if plan.gpu not in plan.gpus:
        raise ValueError(f"plan.gpu={plan.gpu!r} is not in the table; allowed: {', '.join(plan.gpus)} "
                         f"(or add it under plan.gpus with its tflops and memory_gb)")
    entry = plan.gpus[plan.gpu]
    memory = plan.gpu_memory_gb if plan.gpu_memory_gb is not None else entry.memory_gb
    positive_number("plan.gpu_memory_gb", memory)
    return plan.gpu, entry.tflops * 1e12, memory * GB


def trace_run(cfg: DictConfig, layout: Layout, samples: int, row: dict) -> tuple[StepTrace, object]:
    """The step `cfg` trains: its per-device batch, with gradients present when it accumulates (`row`: one
    training row, `example_row`; traced on shallow twins of a real model, `fraqat_cli.plan.depth`)."""

    length = run_length(cfg, layout.devices, samples)
    return trace_by_depth(cfg, cfg.data.batch_size, accumulating=length.accumulation > 1, row=row), length


def check_fractions(plan: DictConfig) -> None:
    """`plan.mfu` and `plan.usable_fraction` are fractions in (0, 1]."""
    for key in ("mfu", "usable_fraction"):
        value = positive_number(f"plan.{key}", plan[key])
        if value > 1:
            raise ValueError(f"plan.{key}={value!r} is a fraction; allowed: 0 < plan.{key} <= 1")


def make_plan(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """The plan of `cfg`'s run (plan.json's content). `overrides` (the command line's) let the suggestions
    compose the same config with one option changed."""
    check_fractions(cfg.plan)
    gpu, peak_flops, memory = _gpu(cfg)
    budget = memory * cfg.plan.usable_fraction
    layout, samples = layout_of(cfg), training_samples(cfg)
    row = example_row(cfg.model)  # the same row for every trace below: the options leave the model as it is
    trace, length = trace_run(cfg, layout, samples, row)
    spread = per_device(trace, layout)
    # The other gradient-checkpointing setting is traced only when it is offered as an option (below): no
    # arithmetic on this trace gives what the step without checkpointing would keep alive.
    activations = {bool(cfg.gradient_checkpointing): trace.activation_bytes, not cfg.gradient_checkpointing: None}
    epochs = cfg.plan.epochs if cfg.plan.epochs is not None else length.epochs
    steps = length.steps if cfg.plan.epochs is None else math.ceil(epochs * samples / length.global_batch)
    flops_per_step = trace.flops * length.accumulation
    gpu_hours = flops_per_step * steps * layout.devices / (peak_flops * cfg.plan.mfu) / 3600
    framing = _framing()
    student_ckpt = trace.student_state_bytes + framing[0] * trace.student_state_tensors + framing[1]
    plan = {
        "model": cfg.model.name,
        "devices": layout.devices,
        "assumed": layout.assumed,
        "strategy": layout.strategy,
        "precision": str(cfg.trainer.precision),
        "per_device_batch": length.per_device_batch,
        "accumulation": length.accumulation,
        "global_batch": length.global_batch,
        "gradient_checkpointing": bool(cfg.gradient_checkpointing),
        "teacher_params": trace.teacher_params,
        "student_params": trace.student_params,
        "trainable_params": trace.trainable_params,
        "bytes_per_device": spread["parts"],
        "activation_bytes": {"with_checkpointing": activations[True], "without_checkpointing": activations[False]},
        "peak_bytes_per_device": spread["peak"],
        "checkpoint_bytes": {
            "resumable": student_ckpt + trace.optimizer_bytes + framing[0] * trace.optimizer_tensors,
            "student": student_ckpt,
        },
        "cache_bytes": samples * trace.cond_row_bytes,
        "latent_cache_bytes": samples * trace.latent_row_bytes,
        "samples": samples,
        "flops_per_step": flops_per_step,
        "steps_per_epoch": math.ceil(samples / length.global_batch),
        "steps": steps,
        "epochs": epochs,
        "gpu": gpu,
        "gpu_memory_bytes": memory,
        "usable_bytes": budget,
        "mfu": cfg.plan.mfu,
        "gpu_hours": gpu_hours,
        "fits": spread["peak"] <= budget,
        "suggestions": [],
    }
    if not plan["fits"] and cfg.plan.suggest:
        plan["suggestions"] = suggestions(cfg, overrides, layout, samples, budget, trace, row)
        for s in plan["suggestions"]:
            if s["overrides"] == ["gradient_checkpointing=true"]:
                plan["activation_bytes"]["with_checkpointing"] = s["activation_bytes"]
    return plan


def _framing() -> tuple[int, int]:
    return FRAMING_BYTES_PER_TENSOR, FRAMING_BYTES_PER_FILE


def compose_with(cfg: DictConfig, overrides: list[str] | None, extra: list[str]) -> DictConfig:
    """`cfg` composed again from the same command line plus `extra` (Hydra's compose: group options too)."""

    config = compose(config_name="plan", overrides=[*(overrides or []), *extra])
    OmegaConf.set_struct(config, False)
    return config


def _option_exists(group: str, option: str) -> bool:
    return (resources.files("fraqat_cli.conf") / group / f"{option}.yaml").is_file()


def suggestions(cfg, overrides, layout: Layout, samples: int, budget: float, trace: StepTrace,
                row: dict) -> list[dict]:
    """Each option that changes what a device holds, with its new peak and activations (traced, or from the
    same trace when only the layout changes); then, when none fits alone, the options combined in order until
    they fit."""
    options = []
    if not cfg.gradient_checkpointing:
        options.append((["gradient_checkpointing=true"], None))
    if layout.devices > 1 and layout.strategy != "fsdp":
        sharded = Layout("fsdp", layout.devices, layout.gpu)
        options.append((["trainer=fsdp"], lambda: (per_device(trace, sharded)["peak"], trace.activation_bytes)))
    for group, option in (("optim", "adamw8bit"), ("trainable", "lora")):
        chosen = OmegaConf.select(cfg, "optim._target_" if group == "optim" else "trainable.lora")
        if _option_exists(group, option) and not (chosen and option in str(chosen) or group == "trainable" and chosen):
            options.append(([f"{group}={option}"], None))
    if cfg.data.batch_size > 1:  # a quarter of the batch per micro-batch, the same global batch
        smaller = max(1, cfg.data.batch_size // 4)
        options.append(([f"data.batch_size={smaller}", *_accumulation(cfg, cfg.data.batch_size // smaller)], None))

    def traced(extra: list[str]) -> tuple[int, int]:
        """(peak per device, activation bytes) of the run with `extra` overrides, traced."""
        changed = compose_with(cfg, overrides, extra)
        changed_layout = Layout("fsdp", layout.devices, layout.gpu) if "trainer=fsdp" in extra else layout
        if "trainer=fsdp" in extra:
            changed.trainer.devices, changed.trainer.accelerator = layout.devices, cfg.trainer.accelerator
        changed_trace = trace_run(changed, changed_layout, samples, row)[0]
        return per_device(changed_trace, changed_layout)["peak"], changed_trace.activation_bytes

    def suggestion(extra: list[str], peak: int, activations: int) -> dict:
        return {"overrides": list(extra), "peak_bytes_per_device": peak, "activation_bytes": activations,
                "fits": peak <= budget}

    found = [suggestion(extra, *(known() if known else traced(extra))) for extra, known in options]
    if len(found) > 1 and not any(s["fits"] for s in found):
        combined = list(options[0][0])
        for extra, _ in options[1:]:
            combined += extra
            found.append(suggestion(combined, *traced(combined)))
            if found[-1]["fits"]:
                break
    return found


def _accumulation(cfg: DictConfig, factor: int) -> list[str]:
    """Keep the global batch when the per-device batch shrinks: accumulation makes it up."""
    if cfg.get("global_batch_size") is not None:
        return []  # run_length derives the accumulation from the global batch
    return [f"trainer.accumulate_grad_batches={cfg.trainer.accumulate_grad_batches * factor}"]


def _size(value: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} B"


def describe(plan: dict) -> str:
    """The plan as the table fraqat-plan prints."""
    rows = [
        ("model", f"{plan['model']}: {plan['devices']} device(s), {plan['strategy']}, {plan['precision']}, "
                  f"batch {plan['per_device_batch']} per device x {plan['accumulation']} accumulation "
                  f"= {plan['global_batch']} global"),
        *((("assumed", plan["assumed"]),) if plan.get("assumed") else ()),
        ("parameters", f"teacher {plan['teacher_params']:,}, student {plan['student_params']:,}, "
                       f"trainable {plan['trainable_params']:,}"),
        *((f"  {name.replace('_', ' ')}", _size(value)) for name, value in plan["bytes_per_device"].items()),
        ("activations", _activations(plan)),
        ("peak per device", f"{_size(plan['peak_bytes_per_device'])} of {_size(plan['usable_bytes'])} usable on "
                            f"{plan['gpu']} ({_size(plan['gpu_memory_bytes'])}): "
                            f"{'fits' if plan['fits'] else 'does NOT fit'}"),
        ("checkpoints", f"resumable {_size(plan['checkpoint_bytes']['resumable'])}, "
                        f"student-only {_size(plan['checkpoint_bytes']['student'])}"),
        ("caches on disk", f"conditioning {_size(plan['cache_bytes'])}, latents {_size(plan['latent_cache_bytes'])} "
                           f"({plan['samples']:,} rows)"),
        ("FLOPs per step", f"{plan['flops_per_step']:.3e} per device"),
        ("steps", f"{plan['steps_per_epoch']:,} per epoch, {plan['steps']:,} in all"
                  + (f" ({plan['epochs']:g} epochs)" if plan["epochs"] else "")),
        ("GPU-hours", f"{plan['gpu_hours']:,.3g} on {plan['gpu']} at {plan['mfu']:.0%} model-FLOPs utilisation"),
    ]
    for s in plan["suggestions"]:
        rows.append(("  option", f"{' '.join(s['overrides'])}: peak {_size(s['peak_bytes_per_device'])}"
                                 f"{' (fits)' if s['fits'] else ''}"))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def _activations(plan: dict) -> str:
    """Activations at the peak with and without gradient checkpointing; a setting not traced is named."""
    with_it, without = plan["activation_bytes"]["with_checkpointing"], plan["activation_bytes"]["without_checkpointing"]
    if with_it is not None and without is not None:
        return f"{_size(with_it)} with gradient checkpointing, {_size(without)} without"
    on = with_it is not None
    return (f"{_size(with_it if on else without)} {'with' if on else 'without'} gradient checkpointing "
            f"(the other setting is not traced: gradient_checkpointing={str(not on).lower()} plans it)")


def write_plan(plan: dict, run_dir: Path) -> Path:
    path = Path(run_dir) / PLAN_FILE
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(plan, indent=2)))
    return path


@hydra.main(config_path="pkg://fraqat_cli.conf", config_name="plan", version_base="1.3")
def main(cfg: DictConfig) -> None:
    quiet_console()
    quiet_lightning()

    def work():
        instantiate_or_raise(cfg.schedule)  # a bad schedule fails as fraqat-train's would
        plan = make_plan(cfg, job_overrides())
        print(describe(plan))
        print(f"wrote {write_plan(plan, output_dir())}")

    run_reporting_errors("fraqat-plan", work)
