"""One logger run per job: named after the job's overrides, and finished when the job ends.

A `--multirun` sweep runs its jobs one after another in one process. wandb keeps its run open in the process
until `wandb.finish()`, and Lightning's `WandbLogger` reuses an open run, so without `finish_run` every job
after the first would log into the first job's run. The logger configs live in `conf/logger/`; each names
its run `${logger_run_name}`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from fraqat_cli.errors import ExpectedFailure

NAME_KEY = "logger_run_name"


class LoggerNotInstalled(ExpectedFailure):
    """The configured logger's library is missing: one line naming it and how to install it, exit 2."""


def job_run_name(base: str, overrides: list[str]) -> str:
    """`base` followed by the job's command-line overrides (what tells a sweep's jobs apart), e.g.
    `toy-fractional-per_tensor optim.lr=0.001 schedule=linear`; `base` alone for a job without overrides."""
    return " ".join([base, *overrides])


def make_logger(cfg: DictConfig, save_dir: Path):
    """The configured Lightning logger writing under `save_dir`, its run named after the job's overrides unless
    the user named it (`logger_run_name=...`); False for `logger=none`."""
    if not cfg.logger:
        return False

    overrides = _job_overrides()
    if not any(o.lstrip("+~").startswith(NAME_KEY + "=") for o in overrides):
        with open_dict(cfg):
            cfg[NAME_KEY] = job_run_name(str(cfg[NAME_KEY]), overrides)
    try:
        return instantiate(cfg.logger, save_dir=str(save_dir))
    except InstantiationException as error:  # logger=tensorboard or mlflow without its package
        if isinstance(error.__cause__, ImportError):
            raise LoggerNotInstalled(f"logger {cfg.logger._target_} needs a package that is not installed "
                                     f"({error.__cause__}); pip install 'fraqat-cli[loggers]', or choose "
                                     f"logger=csv, wandb or none") from None
        raise


def _job_overrides() -> list[str]:
    """The job's command-line overrides (none outside a Hydra run)."""

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def wandb_logger(**kwargs):
    """Lightning's `WandbLogger` (`conf/logger/wandb.yaml`), without the `anonymous=None` it always passes to
    `wandb.init`: current wandb warns at every run that the setting has no effect."""
    from lightning.pytorch.loggers import WandbLogger  # only when a wandb logger is configured (never in export)

    logger = WandbLogger(**kwargs)
    if logger._wandb_init.get("anonymous") is None:  # Lightning's own init arguments: the one place to drop it
        logger._wandb_init.pop("anonymous", None)
    return logger


def mlflow_logger(save_dir: str, tracking_uri: str | None = None, **kwargs):
    """Lightning's `MLFlowLogger` (`conf/logger/mlflow.yaml`); with no `tracking_uri`, a SQLite store in the run
    folder (`<save_dir>/mlflow.db`): MLflow 3 refuses the plain-folder store Lightning would otherwise pick."""

    # only when a logger is configured: eval and export never need Lightning
    from lightning.pytorch.loggers import MLFlowLogger

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Creating initial MLflow database tables..."
    logging.getLogger("alembic").setLevel(logging.WARNING)  # the store's schema migrations, at every new store
    uri = tracking_uri or f"sqlite:///{(Path(save_dir) / 'mlflow.db').resolve()}"
    return MLFlowLogger(tracking_uri=uri, save_dir=None, **kwargs)


def finish_run() -> None:
    """End the open wandb run, if any, so the next job of a sweep starts its own. Lightning finalizes the
    other loggers (TensorBoard's writer, MLflow's run status, CSV) itself at the end of fit."""
    wandb = sys.modules.get("wandb")  # never imported here: a run without wandb has nothing to finish
    if wandb is not None and wandb.run is not None:
        wandb.finish()
