"""What `fraqat-eval ckpt=...` names: a checkpoint, a run folder, a sweep folder, several, or the teacher.

Targets are paths plus what the table needs (config, step, bits), read from the memory-mapped
checkpoint without its weights; each student is loaded only when the evaluation reaches it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fraqat_cli.checkpointing import StudentCheckpoint

TEACHER = "teacher"


@dataclass
class EvalTarget:
    """One model to evaluate: the teacher of `config.model`, or the student in `checkpoint`."""

    label: str
    config: DictConfig  # the training config (model, quantizer, schedule, ...)
    checkpoint: Path | None = None
    step: int | None = None
    weight_bits: float | None = None
    sweep_dir: Path | None = None

    @property
    def is_teacher(self) -> bool:
        return self.checkpoint is None


def checkpoint_target(path: Path, model_name: str | None, sweep_dir: Path | None) -> EvalTarget:
    """The student in `path` (either checkpoint kind); its tensors are not kept."""
    stored = StudentCheckpoint.read(path)
    config = stored.config
    if model_name and config.model.name != model_name:
        raise ValueError(
            f"checkpoint {str(path)!r} is a student of model {config.model.name!r}, not of model={model_name!r}; "
            f"drop model= or pick a checkpoint of that model"
        )
    return EvalTarget(label=stored.label, config=config, checkpoint=Path(path), step=stored.step,
                      weight_bits=stored.weight_bits, sweep_dir=sweep_dir)


def resolve_targets(ckpt, model_cfg: DictConfig | None) -> list[EvalTarget]:
    """Every model `ckpt` names; `model_cfg` is the teacher's model (ckpt=teacher) or a check on checkpoints."""
    entries = list(ckpt) if OmegaConf.is_list(ckpt) or isinstance(ckpt, (list, tuple)) else [ckpt]
    targets = []
    for entry in entries:
        if entry in (None, TEACHER):
            if model_cfg is None:
                raise ValueError("ckpt=teacher evaluates a model's full-precision teacher: also give model=NAME")
            config = OmegaConf.create({"model": OmegaConf.to_container(model_cfg)})
            targets.append(EvalTarget(label=f"{model_cfg.name}-teacher", config=config))
            continue
        files, sweep_dir = StudentCheckpoint.locate(entry)
        name = model_cfg.name if model_cfg is not None else None
        targets.extend(checkpoint_target(f, name, sweep_dir) for f in files)
    return targets
