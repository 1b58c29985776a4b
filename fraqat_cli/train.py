"""`fraqat-train`: distil a fake-quantized student from a full-precision teacher.

`train(cfg)` does the work and returns its metrics, so tests and sweepers can
call it in-process; `main` is the thin Hydra entry point.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from fraqat_cli.checks import positive_int, positive_number
from fraqat_cli.cli import instantiate_or_raise, quiet_console, run_reporting_errors
from fraqat_cli.files import atomic_write
from fraqat_cli.run_length import check_run_length, run_length
from fraqat_cli.sweep import METRICS_FILE


def output_dir() -> Path:
    """Hydra's run folder for this job, or the working directory outside Hydra."""
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return Path.cwd()


def job_overrides() -> list[str]:
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def check_numbers(cfg: DictConfig) -> None:
    """Reject nonsense before any model is built."""
    from fraqat_cli.checkpointing import check_checkpoint_settings

    positive_int("trainer.max_steps", cfg.trainer.max_steps)
    positive_number("optim.lr", cfg.optim.lr)
    if cfg.optim.weight_decay < 0:
        raise ValueError(f"optim.weight_decay must be >= 0; got {cfg.optim.weight_decay!r}")
    positive_int("checkpoint_every_n_steps", cfg.checkpoint_every_n_steps)
    check_run_length(cfg)
    check_checkpoint_settings(cfg)
    if cfg.quantizer.static_activations:
        positive_int("quantizer.calibration_batches", cfg.quantizer.calibration_batches)


def train(cfg: DictConfig) -> dict:
    """Distil `cfg.model`'s teacher into a quantized student along `cfg.schedule`; return final metrics."""
    import lightning as L
    import torch

    from fraqat_cli.callbacks import BitScheduleCallback, SampleImagesCallback, StepStats
    from fraqat_cli.checkpointing import AtomicCheckpointIO, checkpoint_callbacks, checkpoint_sizes, resume_path
    from fraqat_cli.conditioning import conditioning_store
    from fraqat_cli.data import ConditionedLatents
    from fraqat_cli.distill import DistillationModule
    from fraqat_cli.models import load_pipeline
    from fraqat_cli.sampling import student_grid_maker
    from fraqat_cli.student import build_student

    # 1. Everything that can be wrong with the config fails here, before a model is built.
    check_numbers(cfg)
    schedule = instantiate_or_raise(cfg.schedule)
    source = instantiate_or_raise(cfg.data)
    family = instantiate(cfg.model.family)
    noise = instantiate(cfg.model.noise)
    run_dir = output_dir()
    checkpoint_dir = run_dir / "checkpoints"
    ckpt_path = resume_path(cfg.resume, checkpoint_dir)
    L.seed_everything(cfg.seed, workers=True)

    # 2. Prompts -> cached text conditioning; clean latents (teacher samples or VAE-encoded images).
    #    Both stay on disk and are read a row at a time; only the sample grid's few rows are in memory.
    prompts = source.prompts()
    conditioning = conditioning_store(cfg.model, prompts, cfg.cache_dir)
    cond, negative = conditioning.read(0, cfg.num_sample_images), conditioning.shared()
    pipe = load_pipeline(cfg.model, without=family.text_parts)
    latents = source.latent_store(pipe, family, cfg.model, conditioning, cfg.cache_dir, cfg.seed)
    noise.bind(pipe.scheduler.config)

    # 3. Teacher (frozen, inference dtype) and student (float32, quantized from the schedule's first bits).
    teacher = pipe.transformer
    student, summary = build_student(teacher, cfg.quantizer, cfg.selection, schedule(0, cfg.trainer.max_steps))
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    print(f"student: {summary}; schedule: {schedule}")
    module = DistillationModule(
        teacher, student, family, noise,
        lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas,
        trainable=cfg.trainable.patterns, feature_loss_weight=cfg.feature_loss_weight,
        record={"config": OmegaConf.to_container(cfg, resolve=True), "schedule": repr(schedule)},
    )
    dataset = ConditionedLatents(conditioning, latents)
    if cfg.quantizer.static_activations:
        module.calibration_batches = first_batches(dataset, source.batch_size, cfg.quantizer.calibration_batches)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=source.batch_size, shuffle=True,
        num_workers=source.num_workers, drop_last=len(latents) >= source.batch_size,
    )

    # 4. Fit; last.ckpt resumable (optimizer, loop position), step checkpoints the student alone.
    print(checkpoint_sizes(student))
    stats = StepStats()
    callbacks = [stats, BitScheduleCallback(schedule), *checkpoint_callbacks(cfg, checkpoint_dir)]
    if cfg.sample_every_n_steps > 0:
        make_grid = student_grid_maker(pipe, family, cfg.model, cond, negative, cfg.num_sample_images, cfg.seed)
        callbacks.append(SampleImagesCallback(make_grid, cfg.sample_every_n_steps, run_dir / "samples"))
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if isinstance(trainer_kwargs.get("strategy"), dict):  # a strategy built from config (conf/trainer/fsdp.yaml)
        trainer_kwargs["strategy"] = instantiate_or_raise(trainer_kwargs["strategy"])
    trainer = L.Trainer(
        **trainer_kwargs,
        default_root_dir=str(run_dir), callbacks=callbacks, logger=make_logger(cfg, run_dir),
        plugins=[AtomicCheckpointIO()], enable_model_summary=False,
    )
    length = run_length(cfg, trainer.num_devices * trainer.num_nodes, len(dataset))
    trainer.accumulate_grad_batches, trainer.fit_loop.epoch_loop.max_steps = length.accumulation, length.steps
    with open_dict(cfg):  # the checkpoints' record and the report say what actually ran
        cfg.trainer.max_steps, cfg.trainer.accumulate_grad_batches = length.steps, length.accumulation
    module.record["config"] = OmegaConf.to_container(cfg, resolve=True)
    print(length)
    if ckpt_path:
        print(f"resuming from {ckpt_path}")
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)

    # 5. Report.
    previous = run_dir / METRICS_FILE  # a run resumed at its last step trains no step: keep its last loss
    last_loss = json.loads(previous.read_text())["final_loss"] if previous.is_file() else float("nan")
    metrics = {
        "final_loss": float(trainer.callback_metrics.get("train/loss", last_loss)),
        "final_bits": float(schedule(cfg.trainer.max_steps - 1, cfg.trainer.max_steps)),
        "steps": int(trainer.global_step),
        **stats.summary(),
        "checkpoint": str(checkpoint_dir / "last.ckpt"),
        "quantized_layers": summary.quantized_layers,
        "quantized_params": summary.quantized_params,
        "overrides": job_overrides(),
    }
    if trainer.is_global_zero:
        atomic_write(run_dir / METRICS_FILE, lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2)))
    return metrics


def first_batches(dataset, batch_size: int, count: int) -> list[dict]:
    """The dataset's first `count` batches, in order: the same on every rank (static activation calibration)."""
    from torch.utils.data import default_collate

    rows = range(min(len(dataset), count * batch_size))
    return [default_collate([dataset[i] for i in rows[s:s + batch_size]]) for s in range(0, len(rows), batch_size)]


def make_logger(cfg: DictConfig, run_dir: Path):
    """The configured Lightning logger (wandb: offline unless WANDB_MODE says otherwise, `quiet_console`)."""
    if not cfg.logger:
        return False
    return instantiate(cfg.logger, save_dir=str(run_dir))


@hydra.main(config_path="pkg://fraqat_cli.conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    quiet_console()
    metrics = run_reporting_errors("fraqat-train", lambda: train(cfg))
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # DDP workers re-run this entry point
        print(json.dumps({k: v for k, v in metrics.items() if k != "overrides"}, indent=2))
