"""What `fraqat-eval ckpt=...` names: a checkpoint, a run folder, a sweep folder, several, or the teacher."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fraqat_cli.checkpointing import LAST, load_checkpoint

TEACHER = "teacher"


@dataclass
class EvalTarget:
    """One model to evaluate: the teacher of `config.model`, or the student in `checkpoint`."""

    label: str
    config: DictConfig  # the training config (model, quantizer, schedule, ...)
    checkpoint: Path | None = None
    state: dict | None = None  # the loaded checkpoint
    sweep_dir: Path | None = None

    @property
    def is_teacher(self) -> bool:
        return self.checkpoint is None

    @property
    def weight_bits(self) -> float | None:
        return None if self.is_teacher else self.state["fraqat"]["weight_bits"][0]


def checkpoints_in(path: Path) -> tuple[list[Path], Path | None]:
    """Checkpoint files named by `path`, and the sweep folder when it is one."""
    if path.is_file():
        return [path], None
    if (path / "checkpoints" / LAST).is_file():
        return [path / "checkpoints" / LAST], None
    jobs = sorted(path.glob(f"*/checkpoints/{LAST}"))
    if jobs:
        return jobs, path
    raise FileNotFoundError(
        f"ckpt={str(path)!r} holds no checkpoint; allowed: a .ckpt file, a run folder (with checkpoints/{LAST}), "
        f"a multirun folder of such runs, or 'teacher'"
    )


def checkpoint_target(path: Path, model_name: str | None, sweep_dir: Path | None) -> EvalTarget:
    state = load_checkpoint(path)
    if "fraqat" not in state or "config" not in state.get("fraqat", {}):
        raise ValueError(f"{str(path)!r} is not a fraqat-train checkpoint (it has no 'fraqat' record)")
    config = OmegaConf.create(state["fraqat"]["config"])
    if model_name and config.model.name != model_name:
        raise ValueError(
            f"checkpoint {str(path)!r} is a student of model {config.model.name!r}, not of model={model_name!r}; "
            f"drop model= or pick a checkpoint of that model"
        )
    label = path.parent.parent.name if path.name == LAST else path.stem
    return EvalTarget(label=label, config=config, checkpoint=path, state=state, sweep_dir=sweep_dir)


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
        files, sweep_dir = checkpoints_in(Path(str(entry)).expanduser())
        name = model_cfg.name if model_cfg is not None else None
        targets.extend(checkpoint_target(f, name, sweep_dir) for f in files)
    return targets
