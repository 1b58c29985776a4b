"""`fraqat-train`: distil a fake-quantized student from a full-precision teacher.

`train(cfg)` does the work and returns its metrics, so tests and sweepers can
call it in-process; `main` is the thin Hydra entry point.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from fraqat_cli.checks import positive_int, positive_number
from fraqat_cli.cli import instantiate_or_raise, quiet_console, quiet_lightning, run_reporting_errors, warn
from fraqat_cli.errors import ExpectedFailure
from fraqat_cli.files import atomic_write, check_writable, not_a_folder
from fraqat_cli.loggers import finish_run, make_logger
from fraqat_cli.models.generation import student_grid_maker
from fraqat_cli.student.build import build_quant_config
from fraqat_cli.student.checkpoint import LAST, read_head
from fraqat_cli.student.lora import check_lora_settings
from fraqat_cli.train.assembly import TrainingData, distillation_module, prepare_data
from fraqat_cli.train.attention_backends import attention_backends
from fraqat_cli.train.callbacks import BitScheduleCallback, SampleImagesCallback, StepStats
from fraqat_cli.train.checkpointing import (
    AtomicCheckpointIO,
    check_checkpoint_settings,
    checkpoint_callbacks,
    report_checkpoint_space,
    resume_path,
)
from fraqat_cli.train.curve import CURVE_FILE, TrainingCurve, draw_training_curve
from fraqat_cli.train.divergence import check_divergence_settings, divergence_guard, divergence_hint
from fraqat_cli.train.hydra_job import job_overrides, output_dir, run_dir_given
from fraqat_cli.train.last_run import point_last_run
from fraqat_cli.train.optimizers import check_optimizer
from fraqat_cli.train.progress_bar import TrainingProgress
from fraqat_cli.train.rng_state import RandomState
from fraqat_cli.train.run_config import previous_result
from fraqat_cli.train.run_folder import own_run_folder, remove_leftovers
from fraqat_cli.train.run_length import check_run_length, run_length, short_schedule_warning
from fraqat_cli.train.run_summary import summary_table
from fraqat_cli.train.sweep import METRICS_FILE
from fraqat_cli.train.validation import HeldOutLoss, held_out_rows


def check_numbers(cfg: DictConfig) -> None:
    """Reject nonsense before any model is built."""
    positive_int("trainer.max_steps", cfg.trainer.max_steps)
    positive_number("optim.lr", cfg.optim.lr)
    if cfg.optim.weight_decay < 0:
        raise ValueError(f"optim.weight_decay must be >= 0; got {cfg.optim.weight_decay!r}")
    check_run_length(cfg)
    check_checkpoint_settings(cfg.checkpoint)
    check_optimizer(cfg.optim, cfg.trainer)
    check_lora_settings(cfg.trainable)
    check_divergence_settings(cfg.divergence)
    positive_int("validation.every_n_steps", cfg.validation.every_n_steps)
    attention_backends(cfg.attention_backends)
    held_out_rows(2, cfg.validation.share, 0)  # the share's range, checked before any model is built
    build_quant_config(cfg.quantizer, cfg.selection)  # granularity, rounding, layer kinds: before any folder
    if (in_the_way := not_a_folder(Path(str(cfg.cache_dir)).expanduser())) is not None:  # a link loop, a file
        raise ValueError(f"cache_dir={str(cfg.cache_dir)!r} cannot be a folder: {in_the_way}; choose another cache_dir")


def train(cfg: DictConfig) -> dict:
    """Distil `cfg.model`'s teacher into a quantized student along `cfg.schedule`; return final metrics.

    The run folder is this run's alone while it trains (`run_folder`); a folder whose run is another config's
    is refused, and one whose run has finished gives its result without training again."""
    # 1. Everything that can be wrong with the config fails here, before a model is built.
    check_numbers(cfg)
    schedule, source = instantiate_or_raise(cfg.schedule), instantiate_or_raise(cfg.data)
    run_dir = output_dir()
    check_writable(run_dir / "checkpoints", "nothing was trained: make it writable or choose another hydra.run.dir")

    try:
        with own_run_folder(run_dir) as hydra_files:
            remove_leftovers(run_dir)
            ckpt_path = resume_path(cfg.resume, run_dir / "checkpoints")  # the newest readable one, when resuming
            if ckpt_path and (result := previous_result(cfg, ckpt_path, run_dir)) is not None:
                return result
            hydra_files.adopt()
            if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # DDP workers re-run this entry point
                point_last_run(cfg.last_run_link, run_dir)  # runs/last: fraqat-eval ckpt=runs/last
            return fit(cfg, schedule, source, run_dir, ckpt_path)
    except KeyboardInterrupt:  # Ctrl-C before the first step (Lightning turns one during fit into an exit)
        raise TrainingInterrupted("interrupted before training started; run the same command again") from None


class TrainingInterrupted(RuntimeError, ExpectedFailure):
    """Ctrl-C (SIGINT): one line saying where the run stopped and how it goes on."""


def fit(cfg: DictConfig, schedule, source, run_dir: Path, ckpt_path: str | None) -> dict:
    """Build the data, models and trainer, train from `ckpt_path` (or afresh), and report."""
    started = time.monotonic()
    L.seed_everything(cfg.seed, workers=True)
    # 2. Prompts -> text conditioning, clean latents: cached on disk, read a row at a time.
    data = prepare_data(cfg, source)
    # 3. Teacher (frozen, inference dtype) and student (float32, quantized from the schedule's first bits).
    module, summary = distillation_module(cfg, data, schedule)
    # 4. The trainer; its device count sets the accumulation that reaches the global batch, and the steps.
    trainer, stats = make_trainer(cfg, data, schedule, module.student, run_dir)
    fix_run_length(cfg, trainer, module, len(data.dataset))
    if (too_short := short_schedule_warning(schedule, cfg.trainer.max_steps)) is not None:
        warn(too_short)  # e.g. 20 steps of the fractional schedule never reach 5 bits
    # 5. Fit; last.ckpt resumable (optimizer, loop position, random state), step checkpoints the student alone.
    if ckpt_path:
        print(f"resuming from {ckpt_path}")
    # Lightning warns that a run resumed mid-epoch sees other data unless its loader is resumable; ours resumes
    # the epoch's order where it stopped (`rng_state.TrainingOrder`), DDP's sampler aside.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    try:
        trainer.fit(module, train_dataloaders=data.loader(trainer.world_size > 1), ckpt_path=ckpt_path)
    except SystemExit:
        if trainer.interrupted:  # Lightning's answer to Ctrl-C: a clean shutdown, then exit(1)
            raise TrainingInterrupted(interrupted_at(trainer, run_dir / "checkpoints")) from None
        raise
    finally:
        finish_run()  # the next job of a sweep (same process) starts its own logger run
    # 6. Report.
    return report(cfg, trainer, schedule, summary, stats, run_dir, time.monotonic() - started)


def interrupted_at(trainer, checkpoint_dir: Path) -> str:
    message = (f"interrupted at step {trainer.global_step}; resume with the same command"
               f"{'' if run_dir_given() else f' and hydra.run.dir={checkpoint_dir.parent}'}")
    try:
        step, _ = read_head(checkpoint_dir / LAST)
    except (ValueError, FileNotFoundError):
        return message + " (no checkpoint was written yet: it starts afresh)"
    return message + f" (it continues from step {step}, the last checkpoint)"


def make_trainer(cfg: DictConfig, data: TrainingData, schedule, student, run_dir: Path):
    """The Lightning trainer with the schedule, checkpoint, sample-grid and step-statistics callbacks."""
    # the sizes of both kinds, and a warning when they will not fit the disk
    report_checkpoint_space(cfg.checkpoint, cfg.optim, student, run_dir / "checkpoints")
    stats = StepStats()
    activations = instantiate_or_raise(cfg.activation_schedule) if cfg.get("activation_schedule") else None
    callbacks = [stats, BitScheduleCallback(schedule, activations), RandomState(data.order, data.batch_size),
                 TrainingCurve(),
                 *checkpoint_callbacks(cfg.checkpoint, run_dir / "checkpoints"),
                 *configured_callbacks(cfg.get("callbacks"))]
    if cfg.trainer.enable_progress_bar:  # Lightning refuses a bar among the callbacks when it is switched off
        callbacks.append(TrainingProgress())
    hint = divergence_hint(cfg.optim, cfg.trainer)
    if (guard := divergence_guard(cfg.divergence, hint, run_dir / "checkpoints")) is not None:  # NaN/inf: exit 2
        callbacks.append(guard)
    if data.held_out is not None:
        callbacks.append(HeldOutLoss(data.held_out, cfg.validation.every_n_steps, data.batch_size, cfg.validation.seed))
    if cfg.sample_every_n_steps > 0:
        make_grid = student_grid_maker(data.model, data.grid, cfg.num_sample_images, cfg.seed)
        callbacks.append(SampleImagesCallback(make_grid, cfg.sample_every_n_steps, run_dir / "samples"))
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if isinstance(trainer_kwargs.get("strategy"), dict):  # a strategy built from config (conf/trainer/fsdp.yaml)
        trainer_kwargs["strategy"] = instantiate_or_raise(trainer_kwargs["strategy"])
    trainer = L.Trainer(
        **trainer_kwargs,
        default_root_dir=str(run_dir), callbacks=callbacks, logger=make_logger(cfg, run_dir),
        plugins=[AtomicCheckpointIO()], enable_model_summary=False,
    )
    return trainer, stats


def configured_callbacks(callbacks: DictConfig | None) -> list[L.Callback]:
    """The callbacks the `callbacks` node (`conf/callbacks`) names; a null entry is one turned off."""
    return [instantiate_or_raise(node) for node in (callbacks or {}).values() if node is not None]


def fix_run_length(cfg: DictConfig, trainer, module, samples: int) -> None:
    """Accumulation and steps from the global batch and epochs, on the trainer and in the config that every
    checkpoint records (so a checkpoint says what actually ran)."""
    length = run_length(cfg, trainer.num_devices * trainer.num_nodes, samples)
    trainer.accumulate_grad_batches, trainer.fit_loop.epoch_loop.max_steps = length.accumulation, length.steps
    with open_dict(cfg):
        cfg.trainer.max_steps, cfg.trainer.accumulate_grad_batches = length.steps, length.accumulation
    module.record["config"] = OmegaConf.to_container(cfg, resolve=True)
    print(length)


def report(cfg: DictConfig, trainer, schedule, summary, stats, run_dir: Path, seconds: float) -> dict:
    """metrics.json and training.png beside the checkpoints (rank 0), and the metrics returned."""
    previous = run_dir / METRICS_FILE  # a run resumed at its last step trains no step: keep its last loss
    last_loss = json.loads(previous.read_text())["final_loss"] if previous.is_file() else float("nan")
    metrics = {
        "final_loss": float(trainer.callback_metrics.get("train/loss", last_loss)),
        "final_bits": float(schedule(cfg.trainer.max_steps - 1, cfg.trainer.max_steps)),
        "steps": int(trainer.global_step),
        **stats.summary(),
        **held_out_summary(trainer),
        "seconds": round(seconds, 1),
        "checkpoint": str(run_dir / "checkpoints" / LAST),
        "quantized_layers": summary.quantized_layers,
        "quantized_params": summary.quantized_params,
        "overrides": job_overrides(),
    }
    if trainer.is_global_zero:
        curve = next(c for c in trainer.callbacks if isinstance(c, TrainingCurve))
        draw_training_curve(curve.points, metrics.get("validation_curve", []), run_dir / CURVE_FILE)
        atomic_write(run_dir / METRICS_FILE, lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2)))
    return metrics


def held_out_summary(trainer) -> dict:
    """The validation loss (last and curve), when the run holds rows out."""
    return next((c.summary() for c in trainer.callbacks if isinstance(c, HeldOutLoss)), {})


@hydra.main(config_path="pkg://fraqat_cli.conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Train, print the metrics, and return the held-out validation loss: the objective a sweeper
    (`hparams_search=schedule`, Optuna) minimises. None when `validation.share=0` holds no rows out."""
    quiet_console()
    quiet_lightning()
    metrics = run_reporting_errors("fraqat-train", lambda: train(cfg))
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # DDP workers re-run this entry point
        print(summary_table(metrics, output_dir()))
        if cfg.print_json:
            print(json.dumps({k: v for k, v in metrics.items() if k != "overrides"}, indent=2))
    return metrics.get("validation_loss")
