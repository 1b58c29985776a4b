"""The training config: every option of every group composes, and bad values fail before a model is built."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from fraqat_cli.models import ModelLoadError
from fraqat_cli.train import train

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_train(*overrides: str):
    with initialize_config_module(config_module="fraqat_cli.conf", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.mark.parametrize("group", ["model", "schedule", "quantizer", "trainable", "data", "trainer", "logger",
                                   "experiment"])
def test_every_option_of_every_group_composes(group):
    for option in options(group):
        cfg = compose_train(f"{group}={option}")
        assert cfg.run_name
        if group == "schedule":
            assert instantiate(cfg.schedule)(0, 10) >= instantiate(cfg.schedule).end_bits


def test_paper_recipes_carry_the_paper_learning_rates():
    assert compose_train("experiment=sana_w4a8").optim.lr == 1e-7
    assert compose_train("experiment=sd35_medium_w4a8").optim.lr == 1e-6
    assert compose_train("experiment=pixart_sigma_w4a8_qat").schedule.name == "standard"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["trainer.max_steps=-5"], "trainer.max_steps must be a positive integer; got -5"),
        (["optim.lr=0"], "optim.lr must be a positive number"),
        (["schedule.stages.0.bits=20"], "bits=20 is out of range"),
        (["schedule=cosine", "schedule.end_bits=1"], "bits=1 is out of range"),
    ],
    ids=["negative-steps", "zero-lr", "stage-bits-out-of-range", "end-bits-out-of-range"],
)
def test_nonsense_numbers_fail_before_any_model_is_built(override, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_train(*override, f"cache_dir={tmp_path}/cache")
    with pytest.raises(Exception, match=message):
        train(cfg)
    assert not (tmp_path / "cache").exists(), "no model may have been built"


def test_missing_coco_file_names_the_path_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_train("data=coco", f"data.captions_file={tmp_path}/captions_train2017.json",
                        f"data.images_dir={tmp_path}", f"cache_dir={tmp_path}/cache")
    with pytest.raises(Exception, match="captions_train2017.json.*does not exist.*cocodataset.org"):
        train(cfg)


def test_real_model_without_network_says_how_to_use_local_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    cfg = compose_train("model=sana", "logger=none", f"cache_dir={tmp_path}/cache")
    with pytest.raises(ModelLoadError, match="model.path=DIR"):
        train(cfg)
