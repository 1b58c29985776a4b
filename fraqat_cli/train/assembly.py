"""What a run trains: the data the teacher's pipeline and the caches give it, and the distillation module around
teacher and student. `fraqat-train` fits it; `fraqat-plan` traces it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import default_collate

from fraqat_cli.cli import instantiate_or_raise
from fraqat_cli.data.conditioning import conditioning_store
from fraqat_cli.data.sources import ConditionedLatents
from fraqat_cli.models.architecture import block_classes
from fraqat_cli.models.conditioning import Conditioning
from fraqat_cli.models.loading import load_model
from fraqat_cli.student.build import build_student
from fraqat_cli.student.lora import lora_from_config
from fraqat_cli.train.attention_backends import attention_backends
from fraqat_cli.train.compiled import compile_blocks
from fraqat_cli.train.distill import DistillationModule
from fraqat_cli.train.rng_state import TrainingOrder
from fraqat_cli.train.validation import split_rows


@dataclass
class TrainingData:
    """What the teacher's pipeline and the caches give a run: the rows to train on and a few to draw."""

    model: object  # LoadedModel: the pipeline without its text encoders (its transformer is the teacher), family
    noise: object
    dataset: object  # (conditioning, latents) rows, read lazily from the caches
    batch_size: int
    num_workers: int
    grid: object  # Conditioning: the sample grid's prompts, in memory
    order: object  # TrainingOrder: the rows' order in each epoch, from the seed alone (`rng_state`)
    held_out: object = None  # rows never trained on: the validation loss's (`fraqat_cli.train.validation`)

    def loader(self, distributed: bool = False):
        """Batches in `order`, resumable mid-epoch; `distributed`: Lightning shards the rows over the ranks with
        its `DistributedSampler` (shuffled by seed and epoch) instead."""
        drop_last = len(self.dataset) >= self.batch_size
        if distributed:
            return torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True,
                                               num_workers=self.num_workers, drop_last=drop_last)
        return torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=self.order, num_workers=self.num_workers,
            drop_last=drop_last, generator=torch.Generator().manual_seed(self.order.seed),  # not the global RNG
        )


def prepare_data(cfg: DictConfig, source) -> TrainingData:
    prompts = source.prompts()
    if len(prompts) < 2 and cfg.validation.share > 0:  # held_out_rows would hold none out, silently
        raise ValueError(f"data gives {len(prompts)} prompt(s): too few to hold out validation.share="
                         f"{cfg.validation.share} of them for the validation loss; allowed: 2 prompts or more "
                         f"(data.num_prompts), or validation.share=0")
    noise = instantiate(cfg.model.noise)
    conditioning = conditioning_store(cfg.model, prompts, cfg.cache_dir)
    model = load_model(cfg.model)
    latents = source.latent_store(model, conditioning, cfg.cache_dir, cfg.seed)
    noise.bind(model.pipe.scheduler.config)
    rows = ConditionedLatents(conditioning, latents)
    train_rows, held_out = split_rows(rows, cfg.validation.share, cfg.validation.seed)
    grid = Conditioning(conditioning.read(0, cfg.num_sample_images), conditioning.shared())
    order = TrainingOrder(len(train_rows), cfg.seed)
    return TrainingData(model, noise, train_rows, source.batch_size, source.num_workers, grid, order, held_out)


def distillation_module(cfg: DictConfig, data: TrainingData, schedule):
    teacher = data.model.transformer
    student, summary = build_student(teacher, cfg.quantizer, cfg.selection, schedule(0, cfg.trainer.max_steps))
    teacher_dtype = next(teacher.parameters()).dtype  # LoRA's frozen base may stay in it
    if (lora := lora_from_config(student, cfg.trainable, teacher_dtype)) is not None:  # trainable=lora: low-rank QAT
        print(lora)
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    print(f"student: {summary}; schedule: {schedule}")
    module = DistillationModule(
        teacher, student, data.model.family, data.noise,
        optimizer=instantiate_or_raise(cfg.optim),
        trainable=cfg.trainable.patterns, feature_loss_weight=cfg.feature_loss_weight,
        record={"schedule": repr(schedule)}, attention_backends=attention_backends(cfg.attention_backends),
        compile_student=student_compiler(cfg),
    )
    if cfg.quantizer.static_activations:
        module.calibration_batches = first_batches(data.dataset, data.batch_size, cfg.quantizer.calibration_batches)
    return module, summary


def student_compiler(cfg: DictConfig):
    """`compile_blocks` bound to `cfg.compile`'s options and the model's block classes; None when it is off."""
    options = cfg.get("compile")
    if options is None or not options.enabled:
        return None
    classes = block_classes(cfg.model)
    return lambda student: compile_blocks(student, classes, backend=options.backend, mode=options.mode)


def first_batches(dataset, batch_size: int, count: int) -> list[dict]:
    """The dataset's first `count` batches, in order: the same on every rank (static activation calibration)."""
    rows = range(min(len(dataset), count * batch_size))
    return [default_collate([dataset[i] for i in rows[s:s + batch_size]]) for s in range(0, len(rows), batch_size)]
