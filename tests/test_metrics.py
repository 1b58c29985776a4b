"""FID, KID and CLIP score plumbing against the libraries' own computations, offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cleanfid import fid
from PIL import Image

from fraqat_cli.evaluate.fid_features import fid_feature_extractor
from fraqat_cli.evaluate.metrics import (
    feature_stats,
    fid_from_features,
    folder_features,
    kid_from_features,
    load_reference_stats,
    save_reference_stats,
    stability_warning,
)

CPU = torch.device("cpu")


def write_images(folder, count: int, seed: int, smooth: bool) -> None:
    """`count` 32x32 PNGs: smooth colour gradients, or uniform noise (a clearly different distribution)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(count):
        if smooth:
            base = rng.uniform(0, 255, size=3)
            ramp = np.linspace(0, 60, 32)[None, :, None]
            pixels = np.clip(base[None, None, :] + ramp + rng.normal(0, 3, (32, 32, 3)), 0, 255)
        else:
            pixels = rng.uniform(0, 255, (32, 32, 3))
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:05d}.png")


@pytest.fixture(scope="module")
def extractor():
    return fid_feature_extractor(CPU, "shipped")[0]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_images(root / "a", 12, seed=0, smooth=True)
    write_images(root / "b", 12, seed=1, smooth=True)
    write_images(root / "noise", 12, seed=2, smooth=False)
    return root


@pytest.fixture(scope="module")
def features(folders, extractor):
    return {name: folder_features(folders / name, extractor, CPU) for name in ("a", "b", "noise")}


@pytest.fixture(scope="module")
def fid_a_noise(features):
    """FID(a, noise), computed once."""
    return fid_from_features(features["a"], features["noise"])


def test_shipped_inception_gives_2048_features(features):
    assert features["a"].shape == (12, 2048)


def test_fid_of_a_set_against_itself_is_zero(features):
    assert fid_from_features(features["a"], features["a"]) == pytest.approx(0.0, abs=1e-3)


def test_different_sets_are_far_apart(features, fid_a_noise):
    assert fid_a_noise > 100
    assert kid_from_features(features["a"], features["b"]) < kid_from_features(features["a"], features["noise"])


def test_our_fid_equals_clean_fid_compute_fid(folders, extractor, fid_a_noise):
    theirs = fid.compute_fid(str(folders / "a"), str(folders / "noise"), mode="clean",
                             custom_feat_extractor=extractor, device=CPU, num_workers=0, verbose=False)
    assert fid_a_noise == pytest.approx(theirs, rel=1e-5)  # exact low-rank trace vs clean-fid's sqrtm


def test_fid_from_stored_reference_stats_equals_fid_from_the_folder(tmp_path, features, fid_a_noise):
    save_reference_stats(tmp_path / "ref.npz", features["noise"], {"source": "test"})
    stats = load_reference_stats(tmp_path / "ref.npz")
    from_stats = fid_from_features(features["a"], (stats["mu"], stats["sigma"]))
    assert from_stats == pytest.approx(fid_a_noise, rel=1e-5)  # stats: clean-fid's sqrtm; features: exact
    mu, _ = feature_stats(features["noise"])
    assert np.array_equal(stats["mu"], mu)


def test_missing_reference_stats_say_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="scripts/coco_reference.py"):
        load_reference_stats(tmp_path / "missing.npz")


def test_too_few_images_get_a_warning_naming_the_advised_count():
    assert "at least 2048" in stability_warning(64, "reference set")
    assert stability_warning(5000, "reference set") is None


def tiny_clip(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from fraqat_cli.models.tiny_parts import clip_tokenizer

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=514, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=clip_tokenizer())
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    return tmp_path / "clip"


def test_clip_score_runs_through_torchmetrics_with_a_local_clip(tmp_path, folders):
    from fraqat_cli.evaluate.clip_score import clip_score, load_clip

    model, processor = load_clip(str(tiny_clip(tmp_path)))
    images = [Image.open(p) for p in sorted((folders / "a").glob("*.png"))[:4]]
    prompts = ["a small red circle at the top left on a blue background"] * 4
    score = clip_score(model, processor, images, prompts, batch_size=2)
    assert 0.0 <= score <= 100.0
    assert clip_score(model, processor, images, prompts, batch_size=4) == pytest.approx(score, rel=1e-5)


def test_clip_without_weights_is_reported_not_raised():
    from fraqat_cli.evaluate.clip_score import load_clip

    model, reason = load_clip("/nonexistent/clip-folder")
    assert model is None and "CLIP score skipped" in reason


def test_clip_fid_uses_clean_fids_folder_path_with_a_local_clip(tmp_path, folders):
    from fraqat_cli.evaluate.clip_score import CLIPImageFeatures, load_clip

    model, processor = load_clip(str(tiny_clip(tmp_path)))
    extractor = CLIPImageFeatures(model, processor)
    assert extractor.resize(np.zeros((50, 80, 3), np.uint8)).shape == (32, 32, 3), "short side, then centre crop"
    a, noise = (folder_features(folders / name, extractor, CPU) for name in ("a", "noise"))
    assert a.shape == (12, 16), "the projected image embedding: projection_dim features"
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-6)
    assert fid_from_features(a, noise) > 0
