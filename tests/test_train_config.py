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
    assert len(list((tmp_path / "cache").glob("image-latents-*.safetensors"))) == 1
    assert (tmp_path / "samples" / "step_000001.png").is_file()
