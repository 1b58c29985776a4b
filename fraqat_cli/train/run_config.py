"""Is the run stored in a folder the run asked for? `resume=auto` continues it only when it is.

A checkpoint records the resolved config it was trained with (`checkpointing.RECORD`). Resuming a run whose
learning rate, seed, steps, data or model differ from the ones asked for would train neither (or nothing, and
print the old result as the new one), so the keys that change what is trained must match; the ones that only
say where files go, how often they are written or shown, or how progress is reported need not.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fraqat_cli.cli import warn
from fraqat_cli.student.checkpoint import stored_run
from fraqat_cli.train.sweep import METRICS_FILE

# Keys (and key prefixes) that do not change the trained student: where things go, how often they are saved or
# drawn, how progress is reported, what stops a diverging run, and memory-for-compute and compile-for-speed trades.
NOT_TRAINING = (
    "logger", "logger_run_name", "last_run_link", "callbacks", "resume", "cache_dir", "run_name", "checkpoint",
    "sample_every_n_steps", "num_sample_images", "gradient_checkpointing", "compile",
    "divergence", "validation.every_n_steps", "data.num_workers", "trainer.enable_progress_bar",
    "trainer.log_every_n_steps", "trainer.enable_checkpointing", "trainer.enable_model_summary", "print_json",
)
ABSENT = "<absent>"
SHOWN = 8  # differences named in full; the rest are counted


def training_differences(stored: dict, requested: dict) -> list[tuple[str, object, object]]:
    """(key, stored value, requested value) for every key that changes training and differs, sorted by key.

    Steps and accumulation that `epochs` and `global_batch_size` derive are compared through those settings:
    the stored config holds the derived values, a requested one holds the presets'."""
    ignored = list(NOT_TRAINING)
    if stored.get("epochs") is not None and requested.get("epochs") is not None:
        ignored.append("trainer.max_steps")
    if stored.get("global_batch_size") is not None and requested.get("global_batch_size") is not None:
        ignored.append("trainer.accumulate_grad_batches")
    old, new = flatten(stored), flatten(requested)
    keys = sorted(k for k in old.keys() | new.keys() if not any(k == i or k.startswith(i + ".") for i in ignored))
    return [(k, old.get(k, ABSENT), new.get(k, ABSENT)) for k in keys if old.get(k, ABSENT) != new.get(k, ABSENT)]


def flatten(config, prefix: str = "") -> dict[str, object]:
    """Dotted keys to leaf values; lists are leaves."""
    if not isinstance(config, dict) or not config:
        return {prefix: config} if prefix else {}
    flat = {}
    for key, value in config.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def requested_config(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def check_same_run(cfg: DictConfig, stored: dict, checkpoint: str) -> list[tuple[str, object, object]]:
    """Refuse (ValueError) to resume `checkpoint` when its config differs from `cfg` in a key that changes
    training; with `resume=force`, warn and return the differences (none: the same run)."""
    differences = training_differences(stored, requested_config(cfg))
    if not differences:
        return differences
    listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in differences[:SHOWN])
    if len(differences) > SHOWN:
        listed += f" and {len(differences) - SHOWN} more"
    if cfg.resume == "force":
        warn(f"resume=force: resuming {checkpoint!r}, trained with another config ({listed})")
        return differences
    raise ValueError(f"checkpoint {checkpoint!r} was trained with another config ({listed}); to train this config "
                     f"start a new folder with hydra.run.dir=..., or continue that run with it anyway with "
                     f"resume=force")


def previous_result(cfg: DictConfig, ckpt_path: str, run_dir: Path) -> dict | None:
    """The stored result when the folder's run is the one asked for and has run all its steps; None to train.

    A folder whose run was trained with another config is refused (`check_same_run`)."""

    if cfg.resume not in ("auto", "force"):  # an explicit checkpoint: the user chose what to continue from
        return None
    step, stored = stored_run(ckpt_path)
    steps = (stored.get("trainer") or {}).get("max_steps")
    if check_same_run(cfg, stored, ckpt_path) or not isinstance(steps, int) or step < steps:
        return None
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():  # killed between its last checkpoint and its report: report it now
        return None
    print(f"already finished at step {step}; its result ({metrics}):")
    return json.loads(metrics.read_text())
