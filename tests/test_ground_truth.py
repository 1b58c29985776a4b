"""Ground-truth metrics of the validation scenes: the scenes' own images score high, other images low."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from fraqat_cli.data.prompt_sets import shapes_val_prompts
from fraqat_cli.data.shapes import render, sample_scenes, split_of
from fraqat_cli.evaluate.evaluator import Evaluator
from fraqat_cli.evaluate.fid_features import fid_feature_extractor
from fraqat_cli.evaluate.ground_truth import attribute_scores, scene_image_files

SHAPES_VAL = Path(__file__).resolve().parents[1] / "conf" / "prompts" / "shapes_val.yaml"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def scenes():
    return sample_scenes("val", 32, seed=7)


def images_of(scenes) -> list[Image.Image]:
    return [Image.fromarray(render(scene)) for scene in scenes]


def test_shapes_val_prompts_are_the_same_validation_captions_every_time():
    prompts, again = instantiate(OmegaConf.load(SHAPES_VAL)), instantiate(OmegaConf.load(SHAPES_VAL))
    assert len(prompts) == 64 and list(prompts) == list(again)
    assert {split_of(prompt) for prompt in prompts} == {"val"}
    assert [scene.caption for scene in prompts.scenes] == list(prompts)
    assert list(shapes_val_prompts(64, seed=8)) != list(prompts)


def test_the_scenes_own_renders_score_near_full_attribute_accuracy(scenes):
    scores = attribute_scores(images_of(scenes), scenes)
    # The check's own ceiling: one small circle here lies nearer a centred square than a centred circle.
    assert scores["attribute_accuracy"] >= 0.98
    assert scores["colour_accuracy"] == scores["place_accuracy"] == scores["size_accuracy"] == 1.0


def test_images_of_other_scenes_score_near_chance(scenes):
    shuffled = images_of(scenes[1:] + scenes[:1])  # every image now belongs to its neighbour's caption
    assert attribute_scores(shuffled, scenes)["attribute_accuracy"] < 0.5


def test_larger_images_are_scored_at_the_scenes_resolution(scenes):
    large = [image.resize((128, 128), Image.NEAREST) for image in images_of(scenes[:8])]
    assert attribute_scores(large, scenes[:8]) == attribute_scores(images_of(scenes[:8]), scenes[:8])


def test_scene_images_are_drawn_once_and_equal_the_renders(scenes, tmp_path):
    files = scene_image_files(scenes[:4], tmp_path)
    stamps = [f.stat().st_mtime_ns for f in files]
    again = scene_image_files(scenes[:4], tmp_path)
    assert again == files and [f.stat().st_mtime_ns for f in again] == stamps
    assert all(np.array_equal(np.asarray(Image.open(f)), render(s)) for f, s in zip(files, scenes))
    assert scene_image_files(scenes[:3], tmp_path)[0].parent != files[0].parent, "other scenes, other folder"


def test_fid_val_of_the_scenes_own_images_is_zero(scenes, tmp_path):
    """Through the evaluator's own path: rendered scenes written once, features cached per folder, clean-fid FID.
    (One FID only: its 2048 x 2048 matrix square root takes about 15 s on one thread.)"""
    extractor, name = fid_feature_extractor(CPU, "shipped")
    cfg = OmegaConf.create({"seed": 0, "cache_dir": str(tmp_path / "cache"), "fid": {"batch_size": 32}})
    truth, generated = scenes[:12], tmp_path / "generated"
    evaluator = Evaluator(cfg, [s.caption for s in truth], CPU, extractor, name, scenes=truth)
    generated.mkdir()
    for i, image in enumerate(images_of(truth)):
        image.save(generated / f"{i:05d}.png")
    files = sorted(generated.glob("*.png"))
    metrics = evaluator.ground_truth_metrics(evaluator.features(generated, files), images_of(truth))
    assert metrics["fid_val"] == pytest.approx(0.0, abs=1e-3)
    assert metrics["attribute_accuracy"] >= 0.95
    assert len(list((tmp_path / "cache" / "scene-images").glob("*/features-*.npy"))) == 1, "reference features cached"


def test_scenes_must_match_the_prompts_one_to_one(scenes):
    with pytest.raises(ValueError, match="3 ground-truth scenes for 2 prompts"):
        Evaluator(OmegaConf.create({"seed": 0}), ["a", "b"], CPU, None, "none", scenes=scenes[:3])
