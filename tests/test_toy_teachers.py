"""The PixArt- and FLUX-class toy teachers load offline and draw what they are told, through the real pipelines."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from train_support import FAST, fraqat_train

from fraqat_cli.data.shapes import dominant_colour, sample_scenes
from fraqat_cli.models.loading import load_pipeline
from fraqat_cli.models.toy import asset_dir, minilm_tokenizer

MODELS = Path(__file__).resolve().parents[1] / "conf" / "model"
TWINS = {"toy_pixart": "tiny_pixart", "toy_flux": "tiny_flux"}  # each toy teacher and the tiny twin of its family
TEACHERS = sorted(TWINS)
HELD_OUT = 16  # validation captions: attribute combinations no teacher saw in training
COLOUR_BAR = 13  # >= 0.8 of them


def config(name: str):
    return OmegaConf.load(MODELS / f"{name}.yaml")


def short_sha(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()[:8]


@pytest.mark.parametrize("name", TEACHERS)
def test_config_has_the_same_keys_as_the_toy_and_its_familys_tiny_twin(name):
    cfg, toy, twin = config(name), config("toy"), config(TWINS[name])
    assert list(cfg) == list(toy) == list(twin)
    assert list(cfg.components) == list(twin.components) and list(cfg.sampler) == list(toy.sampler)
    assert cfg.family == twin.family and cfg.pipeline == twin.pipeline and cfg.noise == twin.noise


@pytest.mark.parametrize("name", TEACHERS)
def test_shipped_weights_are_small_float16_safetensors_named_by_the_revision(name):
    folder = asset_dir(name)
    files = [f for f in folder.rglob("*") if f.is_file()]
    names = {str(f.relative_to(folder)) for f in files}
    weights = {part: folder / part / "diffusion_pytorch_model.safetensors" for part in ("transformer", "vae")}
    assert {"README.md", "transformer/config.json", "vae/config.json"} <= names
    assert all(file.is_file() for file in weights.values())
    assert sum(f.stat().st_size for f in files) <= 10 * 2**20
    assert config(name).revision == f"t{short_sha(weights['transformer'])}-v{short_sha(weights['vae'])}"


def test_pixart_and_flux_teachers_share_one_vae():
    files = [asset_dir(name) / "vae" / "diffusion_pytorch_model.safetensors" for name in TEACHERS]
    assert files[0].read_bytes() == files[1].read_bytes()


@pytest.fixture(scope="module", params=TEACHERS)
def teacher(request):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest sets it: nothing may come from the hub
    cfg = config(request.param)
    return cfg, load_pipeline(cfg)


def generate(pipe, cfg, captions: list[str], steps: int | None = None) -> list[np.ndarray]:
    images = pipe(
        captions, height=cfg.resolution, width=cfg.resolution,
        num_inference_steps=steps or cfg.sampler.num_inference_steps, guidance_scale=cfg.sampler.guidance_scale,
        max_sequence_length=cfg.max_sequence_length,
        generator=[torch.Generator().manual_seed(i) for i in range(len(captions))], **cfg.sampler.extra,
    ).images
    return [np.asarray(image) for image in images]


def test_teacher_loads_offline_and_generates_images_of_its_resolution(teacher):
    cfg, pipe = teacher
    images = generate(pipe, cfg, ["a large red circle in the centre on a blue background"] * 2, steps=2)
    assert [image.shape for image in images] == [(32, 32, 3)] * 2
    assert pipe.transformer.dtype == torch.float32 and not pipe.transformer.training
    caption_widths = {k: v for k, v in pipe.transformer.config.items()
                      if k in ("caption_channels", "joint_attention_dim", "pooled_projection_dim")}
    assert set(caption_widths.values()) == {pipe.text_encoder.config.hidden_size} == {384}, caption_widths


def test_flux_pads_its_pooled_text_role_to_the_configs_sequence_length_not_bert_s_512():
    cfg = config("toy_flux")
    assert instantiate(cfg.components.tokenizer).model_max_length == cfg.max_sequence_length == 16
    with pytest.raises(ValueError, match="model_max_length must be a positive number of tokens; got 0"):
        minilm_tokenizer(model_max_length=0)


def colour_matches(pipe, cfg, scenes) -> int:
    """How many images' dominant non-background colour is their caption's shape colour."""
    images = generate(pipe, cfg, [s.caption for s in scenes])
    return sum(dominant_colour(image, s.background) == s.objects[0].colour for image, s in zip(images, scenes))


def test_teacher_draws_the_captions_colour_and_a_random_twin_does_not(teacher):
    cfg, pipe = teacher
    scenes = sample_scenes("val", HELD_OUT, seed=7)
    trained = colour_matches(pipe, cfg, scenes)
    shipped = pipe.transformer
    try:
        torch.manual_seed(0)
        pipe.transformer = type(shipped).from_config(shipped.config).eval()  # same architecture, random weights
        untrained = colour_matches(pipe, cfg, scenes)
    finally:
        pipe.transformer = shipped
    assert trained >= COLOUR_BAR, f"{cfg.name}: {trained}/{HELD_OUT} colours right"
    assert untrained < COLOUR_BAR, f"random {cfg.name}: {untrained}/{HELD_OUT} right; the check does not discriminate"


@pytest.mark.slow
def test_fraqat_train_distils_each_toy_teacher(tmp_path, cache_dir):
    """The real CLI end to end: a few W4A8 steps against each teacher, ending in a finite validation loss."""
    for name in TEACHERS:
        args = [f"model={name}", *FAST[1:], f"run_name={name}"]
        result = fraqat_train(args, cwd=tmp_path, cache_dir=cache_dir)
        assert result.returncode == 0, result.stderr[-3000:]
        metrics = OmegaConf.load(tmp_path / "runs" / "last" / "metrics.json")  # the run just made
        assert np.isfinite(metrics.validation_loss) and metrics.steps == 4 and metrics.final_bits == 4.0, metrics
