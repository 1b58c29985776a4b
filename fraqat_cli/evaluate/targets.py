"""What `fraqat-eval ckpt=...` names: a checkpoint, a run folder, a sweep folder, an exported file
(`.safetensors`/`.onnx` from fraqat-export: the deployed model itself), several, or the teacher.

Targets are paths plus what the table needs (config, step, bits), read from the memory-mapped
checkpoint without its weights; each student is loaded only when the evaluation reaches it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fraqat_cli.export.exported_denoiser import artifact_info, is_artifact
from fraqat_cli.stored_config import trusted_config
from fraqat_cli.student.checkpoint import StudentCheckpoint

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


def checkpoint_target(path: Path, model_cfg: DictConfig | None, sweep_dir: Path | None) -> EvalTarget:
    """The student in `path` (either checkpoint kind); its tensors are not kept. `model_cfg` (the user's
    `model=`) must name the checkpoint's model and stands in for the model config the file stored."""
    stored = StudentCheckpoint.read(path, model=model_cfg)
    return EvalTarget(label=stored.label, config=stored.config, checkpoint=Path(path), step=stored.step,
                      weight_bits=stored.weight_bits, sweep_dir=sweep_dir)


def artifact_target(path: Path, model_cfg: DictConfig | None) -> EvalTarget:
    """The deployed student in a fraqat-export file; its config is the model config the export stored (checked
    as data, `fraqat_cli.stored_config`), or the user's `model=`, which must name the same model."""

    info = artifact_info(Path(path))
    source = f"{str(path)!r}"
    stored = {"model": info["model_config"], "schedule": {"name": info.get("schedule")},
              "quantizer": {"granularity": info.get("granularity")}}
    config = trusted_config(stored, source, model_cfg)
    stem = Path(path).name.replace(".", "-")
    return EvalTarget(label=f"{config.model.name}-{info.get('schedule')}-{info.get('granularity')}-deployed-{stem}",
                      config=config, step=info.get("step"), weight_bits=info.get("weight_bits"),
                      artifact=Path(path).expanduser())


def deployed_files_in(folder: Path) -> str:
    """`: here, ckpt=<file>, ...` for each fraqat-export file or diffusers folder in `folder` (e.g.
    `<run>/export`, copied from `ls`), which fraqat-eval takes one at a time; "" when there are none."""
    if not folder.is_dir():
        return ""
    found = [str(p) for p in sorted(folder.iterdir()) if is_artifact(p) and (p.is_file() or p.is_dir())]
    return f": here, {', '.join(f'ckpt={p}' for p in found)}" if found else ""


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
            targets.append(artifact_target(Path(str(entry)), model_cfg))
            continue
        try:
            files, sweep_dir = StudentCheckpoint.locate(entry)
        except FileNotFoundError as error:  # an export folder, say: name the files in it that evaluate
            raise FileNotFoundError(f"{error}, or a file fraqat-export wrote (.safetensors, .onnx) or its diffusers "
                                    f"folder{deployed_files_in(Path(str(entry)).expanduser())}") from None
        targets.extend(checkpoint_target(f, model_cfg, sweep_dir) for f in files)
    return targets
