"""Where this Hydra job writes and what it was asked: read by `fraqat-train` and `fraqat-plan` alike."""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig


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


def run_dir_given() -> bool:
    """Whether the command line names the run folder (else the same command makes a new, timestamped one)."""
    try:
        return any(o.startswith("hydra.run.dir=") for o in HydraConfig.get().overrides.hydra)
    except ValueError:
        return True
