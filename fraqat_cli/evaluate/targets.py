"""What `fraqat-eval ckpt=...` names: a checkpoint, a run folder, a sweep folder, an exported file
(`.safetensors`/`.onnx` from fraqat-export: the deployed model itself), several, or the teacher.

Targets are paths plus what the table needs (config, step, bits), read from the memory-mapped
checkpoint without its weights; each student is loaded only when the evaluation reaches it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fraqat_cli.export.deployed import is_artifact
from fraqat_cli.moved_modules import upgrade_stored_config
from fraqat_cli.train.checkpointing import StudentCheckpoint

TEACHER = "teacher"


@dataclass
class EvalTarget:
    """One model to evaluate: the teacher of `config.model`, the student in `checkpoint`, or the deployed
    student in `artifact` (a fraqat-export file)."""

    label: str
    config: DictConfig  # the training config (model, quantizer, schedule, ...)
    checkpoint: Path | None = None
    step: int | None = None
    weight_bits: float | None = None
    sweep_dir: Path | None = None
    artifact: Path | None = None

    @property
    def is_teacher(self) -> bool:
        return self.checkpoint is None and self.artifact is None

    @property
    def source(self) -> Path | None:
        """The file the evaluated model comes from (checkpoint or exported file); None for the teacher."""
        return self.artifact or self.checkpoint


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


def artifact_target(path: Path, model_name: str | None) -> EvalTarget:
    """The deployed student in a fraqat-export file; its config is the model config the export stored."""
    from fraqat_cli.export.deployed import artifact_info

    info = artifact_info(Path(path))
    if model_name and info["model"] != model_name:
        raise ValueError(f"{str(path)!r} is an export of model {info['model']!r}, not of model={model_name!r}; "
                         f"drop model= or pick an export of that model")
    config = OmegaConf.create({"model": upgrade_stored_config(info["model_config"]),
                               "schedule": {"name": info.get("schedule")},
                               "quantizer": {"granularity": info.get("granularity")}})
    stem = Path(path).name.replace(".", "-")
    return EvalTarget(label=f"{info['model']}-{info.get('schedule')}-{info.get('granularity')}-deployed-{stem}",
                      config=config, step=info.get("step"), weight_bits=info.get("weight_bits"),
                      artifact=Path(path).expanduser())


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
        if is_artifact(entry):
            targets.append(artifact_target(Path(str(entry)), model_cfg.name if model_cfg is not None else None))
            continue
        files, sweep_dir = StudentCheckpoint.locate(entry)
        name = model_cfg.name if model_cfg is not None else None
        targets.extend(checkpoint_target(f, name, sweep_dir) for f in files)
    return targets
