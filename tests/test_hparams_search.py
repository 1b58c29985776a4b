"""`hparams_search=schedule`: an Optuna sweep of a smooth schedule that minimises what `fraqat-train`'s main
returns, the held-out validation loss."""

from __future__ import annotations

import subprocess

import pytest
import yaml
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict
from train_support import FAST, cli_env, train_command

TINY = [o for o in FAST if not o.startswith("logger=")] + ["logger=none", "validation.share=0.25"]


def compose_search(*overrides: str):
    with initialize_config_module(config_module="fraqat_cli.conf", version_base="1.3"):
        return compose("train", overrides=["hparams_search=schedule", *overrides], return_hydra_config=True)


def test_search_config_composes_an_optuna_tpe_sweep_that_minimises():
    cfg = compose_search()
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and isinstance(sweeper.sampler.seed, int)
    assert sweeper.direction == "minimize" and sweeper.n_trials >= 10 and sweeper.n_jobs == 1
    assert cfg.validation.share > 0 and cfg.resume is None  # an objective to return; no trial resumes another


def test_every_point_of_the_search_space_is_a_valid_schedule():
    """Each searched key exists in the schedule config, and the schedule builds at every corner of the space."""
    cfg = compose_search()
    parser = OverridesParser.create()
    space = {}
    for key, text in cfg.hydra.sweeper.params.items():
        assert OmegaConf.select(cfg, key) is not None, f"{key} is not a key of the composed config"
        sweep = parser.parse_override(f"{key}={text}").value()
        assert isinstance(sweep, (IntervalSweep, ChoiceSweep)), f"{key}: {text}"
        space[key] = [sweep.start, sweep.end] if isinstance(sweep, IntervalSweep) else list(sweep.list)
    assert all(k.startswith("schedule.") for k in space)
    corners = [{}]
    for key, values in space.items():
        corners = [{**c, key.removeprefix("schedule."): v} for c in corners for v in values]
    for corner in corners:
        schedule = instantiate(OmegaConf.merge(cfg.schedule, corner))
        bits = [schedule(step, 250) for step in range(250)]
        assert bits[-1] == cfg.schedule.end_bits and min(bits) >= cfg.schedule.end_bits, corner


def test_main_returns_the_validation_loss_it_writes(tmp_path, monkeypatch, cache_dir):
    from fraqat_cli.train.command import main

    with initialize_config_module(config_module="fraqat_cli.conf", version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, "resume=null"])
    with open_dict(cfg):
        cfg.cache_dir = str(cache_dir)
    monkeypatch.chdir(tmp_path)
    loss = main.__wrapped__(cfg)  # the task function a sweeper calls, without Hydra's command-line wrapper
    metrics = yaml.safe_load((tmp_path / "metrics.json").read_text())  # JSON is YAML
    assert isinstance(loss, float) and loss == metrics["validation_loss"] > 0


@pytest.mark.slow
def test_two_trial_search_runs_and_reports_the_best_trial(tmp_path, cache_dir):
    sweep = tmp_path / "search"
    result = subprocess.run(
        [*train_command(), "--multirun", "hparams_search=schedule", "hydra.sweeper.n_trials=2", *TINY,
         f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=cli_env(cache_dir), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    losses = [yaml.safe_load(p.read_text())["validation_loss"] for p in sorted(sweep.glob("*/metrics.json"))]
    assert len(losses) == 2 and best["best_value"] == min(losses)
    assert set(best["best_params"]) == {"schedule.start_bits", "schedule.hold_share", "schedule.shape"}
