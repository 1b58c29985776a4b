"""Configs stored before the package became layer folders still resolve: a checkpoint's record and an export's
metadata keep `_target_`s such as `fraqat_cli.families.SanaFamily`."""

from __future__ import annotations

import re

import torch
from hydra.utils import get_object
from omegaconf import OmegaConf
from train_support import quantizer_preset

from fraqat_cli.moved_modules import MOVED, current_name, upgrade_stored_config
from fraqat_cli.train.checkpointing import RECORD, StudentCheckpoint

OLD_NAME = {new: old for old, new in MOVED.items()}


def as_stored_before_the_move(config):
    """`config` with every fraqat_cli name spelled as the flat package spelled it."""
    if isinstance(config, dict):
        return {k: as_stored_before_the_move(v) for k, v in config.items()}
    if isinstance(config, list):
        return [as_stored_before_the_move(v) for v in config]
    if isinstance(config, str) and config.startswith("fraqat_cli."):
        for new in sorted(OLD_NAME, key=len, reverse=True):
            if re.match(rf"fraqat_cli\.{re.escape(new)}(\.|$)", config):
                return config.replace(f"fraqat_cli.{new}", f"fraqat_cli.{OLD_NAME[new]}", 1)
    return config


def targets(config) -> list[str]:
    if isinstance(config, dict):
        return [t for v in config.values() for t in targets(v)] + ([config["_target_"]] if "_target_" in config else [])
    if isinstance(config, list):
        return [t for v in config for t in targets(v)]
    return []


def test_every_target_of_the_shipped_configs_resolves_after_a_round_trip_through_the_old_names():
    stored = {"model": {}, "quantizer": OmegaConf.to_container(quantizer_preset("per_tensor"))}
    for name in ("toy", "toy_flux", "tiny_pixart", "tiny_sd3", "sana"):
        stored["model"][name] = OmegaConf.to_container(OmegaConf.load(f"conf/model/{name}.yaml"))
    for group, name in (("schedule", "fractional"), ("data", "offline"), ("optim", "adamw")):
        stored[group] = OmegaConf.to_container(OmegaConf.load(f"conf/{group}/{name}.yaml"))
    old = as_stored_before_the_move(stored)
    assert old != stored and "fraqat_cli.families.SanaFamily" in targets(old)  # the round trip changed names
    assert upgrade_stored_config(old) == stored
    for target in targets(upgrade_stored_config(old)):
        get_object(target)  # raises when a name does not resolve


def test_current_names_and_other_strings_are_left_alone():
    for name in ("fraqat_cli.data.sources.PromptOnlySource", "fraqat_cli.quant.QuantSpec", "fraqat_cli.cli.warn",
                 "diffusers.SanaPipeline", "a caption about fraqat_cli.families"):
        assert current_name(name) == name
    assert current_name("fraqat_cli.data.PromptOnlySource") == "fraqat_cli.data.sources.PromptOnlySource"


def test_a_checkpoint_written_before_the_move_reads_with_current_names(tmp_path):
    path = tmp_path / "old.ckpt"
    config = {"model": {"name": "toy", "family": {"_target_": "fraqat_cli.families.SanaFamily"}},
              "schedule": {"_target_": "fraqat_cli.schedules.StagedSchedule", "name": "fractional"}}
    torch.save({RECORD: {"config": config}, "state_dict": {"student.w": torch.zeros(1)}, "global_step": 3}, path)
    stored = StudentCheckpoint.read(path)
    assert stored.config.model.family._target_ == "fraqat_cli.models.families.SanaFamily"
    assert stored.config.schedule._target_ == "fraqat_cli.quant.schedules.StagedSchedule"
    assert stored.step == 3
