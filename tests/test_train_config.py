"""The training config: every option of every group composes, and bad values fail before a model is built."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from fraqat_cli.models.loading import ModelLoadError
from fraqat_cli.train.command import train

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    """The group's choices; a leading underscore marks what the choices share (`quantizer/_base.yaml`,
    `experiment/_paper.yaml`), not a choice by itself."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


def compose_train(*overrides: str):
    with initialize_config_module(config_module="fraqat_cli.conf", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.mark.parametrize("group", ["model", "schedule", "activation_schedule", "quantizer", "trainable", "optim",
                                   "data", "trainer", "logger", "experiment"])
def test_every_option_of_every_group_composes(group):
    for option in options(group):
        cfg = compose_train(f"{group}={option}")
        assert cfg.run_name
        if group == "schedule":
            assert instantiate(cfg.schedule)(0, 10) >= instantiate(cfg.schedule).end_bits


# The paper's Table 3: FraQAT and plain-QAT (vQAT) learning rates, and global batch sizes.
PAPER_RECIPES = {
    "sana_w4a8": (1e-7, 128), "sana_w4a8_qat": (1e-6, 128),
    "pixart_sigma_w4a8": (1e-6, 128), "pixart_sigma_w4a8_qat": (1e-6, 128),
    "sd35_medium_w4a8": (1e-6, 256), "sd35_medium_w4a8_qat": (1e-5, 256),
}


@pytest.mark.parametrize("recipe", sorted(PAPER_RECIPES))
def test_paper_recipes_carry_the_paper_rates_batches_budget_and_layers(recipe):
    cfg = compose_train(f"experiment={recipe}")
    assert (cfg.optim.lr, cfg.global_batch_size) == PAPER_RECIPES[recipe]
    assert cfg.schedule.name == ("standard" if recipe.endswith("_qat") else "fractional")
    assert cfg.epochs == 25 and cfg.optim.weight_decay == 0
    assert cfg.selection.name == "all_linear" and cfg.quantizer.granularity == "per_tensor"


@pytest.mark.parametrize(("devices", "per_device"), [(1, 16), (2, 16), (8, 16), (16, 8)])
def test_recipes_reach_the_global_batch_on_any_device_count(devices, per_device):
    from fraqat_cli.train.run_length import run_length

    cfg = compose_train("experiment=sana_w4a8", f"data.batch_size={per_device}")
    length = run_length(cfg, devices, samples=10_000)
    assert length.global_batch == 128 and length.devices * length.accumulation * per_device == 128
    assert length.steps == 1954  # 25 epochs x 10,000 samples / 128, rounded up
    assert "global batch 128" in str(length) and "1,954 steps" in str(length)


def test_a_global_batch_the_devices_cannot_reach_is_refused():
    from fraqat_cli.train.run_length import run_length

    with pytest.raises(ValueError, match=r"global_batch_size=128 is not a multiple of devices x data.batch_size = "
                                         r"3 x 16 = 48"):
        run_length(compose_train("experiment=sana_w4a8"), 3, samples=100)


def test_without_epochs_the_configured_steps_and_accumulation_stand():
    from fraqat_cli.train.run_length import run_length

    length = run_length(compose_train("trainer.max_steps=7", "trainer.accumulate_grad_batches=3"), 2, samples=64)
    assert (length.steps, length.accumulation, length.global_batch) == (7, 3, 2 * 3 * 8)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["trainer.max_steps=-5"], "trainer.max_steps must be a positive integer; got -5"),
        (["optim.lr=0"], "optim.lr must be a positive number"),
        (["schedule.stages.0.bits=20"], "bits=20 is out of range"),
        (["schedule=cosine", "schedule.end_bits=1"], "bits=1 is out of range"),
        (["epochs=0"], "epochs must be a positive number or null; got 0"),
        (["global_batch_size=2.5"], "global_batch_size must be a positive integer or null; got 2.5"),
        (["quantizer.static_activations=true", "quantizer.calibration_batches=0"],
         "quantizer.calibration_batches must be a positive integer; got 0"),
    ],
    ids=["negative-steps", "zero-lr", "stage-bits-out-of-range", "end-bits-out-of-range", "zero-epochs",
         "fractional-global-batch", "zero-calibration-batches"],
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


def fake_coco(root: Path, count: int = 4) -> tuple[Path, Path]:
    """A COCO-shaped captions file (two captions per image) and its images, of odd sizes."""
    import json

    import numpy as np
    from PIL import Image

    images_dir = root / "train2017"
    images_dir.mkdir(parents=True)
    images, notes = [], []
    for i in range(count):
        name = f"{i:012d}.jpg"
        pixels = (np.random.default_rng(i).random((40 + i, 56, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(images_dir / name)
        images.append({"id": 100 + i, "file_name": name})
        notes += [{"image_id": 100 + i, "caption": f"a small red circle number {i}"},
                  {"image_id": 100 + i, "caption": "a second caption"}]
    captions = root / "captions_train2017.json"
    captions.write_text(json.dumps({"images": images, "annotations": notes}))
    return captions, images_dir


def test_coco_data_trains_from_captions_and_vae_latents(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    captions, images_dir = fake_coco(tmp_path)
    cfg = compose_train("model=tiny_sana", "data=coco", f"data.captions_file={captions}",
                        f"data.images_dir={images_dir}",
                        "data.batch_size=2", "trainer.max_steps=2", "logger=none", "trainer.enable_progress_bar=false",
                        "gradient_checkpointing=true", "sample_every_n_steps=1", "num_sample_images=2",
                        f"cache_dir={tmp_path}/cache")
    metrics = train(cfg)
    assert metrics["steps"] == 2
    assert len(list((tmp_path / "cache").glob("image-latents-*/index.json"))) == 1  # one complete sharded entry
    assert (tmp_path / "samples" / "step_000001.png").is_file()


@pytest.mark.parametrize("model", ["sana", "pixart_sigma", "sd35_medium", "flux_schnell"])
def test_harsher_recipes_keep_the_w4a8_rate_and_batch_and_reach_their_targets(model):
    base = compose_train(f"experiment={model}_w4a8")
    for target, weight_bits, activation_bits in [("w3a8", 3.0, 8.0), ("w4a4", 4.0, 4.0)]:
        cfg = compose_train(f"experiment={model}_{target}")
        assert (cfg.optim.lr, cfg.global_batch_size, cfg.model.name) == (base.optim.lr, base.global_batch_size,
                                                                           base.model.name)
        assert (cfg.quantizer.granularity, cfg.quantizer.scale) == ("per_channel", "mse")  # quality-levers.md
        assert instantiate(cfg.schedule).end_bits == weight_bits
        assert instantiate(cfg.activation_schedule)(99, 100) == activation_bits
        if target == "w3a8":  # plain QAT at 3 bits: fractional_w3 was closer in no toy family (quality-levers.md)
            assert cfg.schedule.name == "standard_w3" and instantiate(cfg.schedule)(0, 100) == 3.0
        if target == "w4a4":
            assert cfg.quantizer.activation_granularity == "per_channel"  # per token
            assert instantiate(cfg.activation_schedule)(0, 100) == 4.0  # constant A4: no schedule gain on the toy
