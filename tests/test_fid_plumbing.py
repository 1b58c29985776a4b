"""`fid.inception=plumbing`: a seeded stand-in for Inception that runs the FID path on a machine without the
Inception's package, whose figures never appear, are cached or are kept as an FID."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from fraqat_cli.evaluate.command import check_settings, update_csv
from fraqat_cli.evaluate.comparison import comparison_table
from fraqat_cli.evaluate.evaluator import Evaluator
from fraqat_cli.evaluate.fid_features import PLUMBING, PlumbingFeatures, fid_feature_extractor

CPU = torch.device("cpu")


def write_images(folder, count: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    files = [folder / f"{i:05d}.png" for i in range(count)]
    for f in files:
        Image.fromarray(rng.uniform(0, 255, (32, 32, 3)).astype(np.uint8)).save(f)
    return files


def evaluator(source: str) -> Evaluator:
    cfg = OmegaConf.create({"seed": 0, "reference": "teacher", "fid": {"batch_size": 4, "inception": source},
                            "clip": {"model": None}})
    return Evaluator(cfg, ["a prompt"] * 5, CPU, *fid_feature_extractor(CPU, source))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return root, write_images(root / "student", 5, seed=0), write_images(root / "teacher", 5, seed=1)


def test_plumbing_features_are_fixed_by_their_seed():
    images = torch.rand(3, 3, 299, 299) * 255
    first, second = PlumbingFeatures(CPU)(images), PlumbingFeatures(CPU)(images)
    assert first.shape == (3, 256) and torch.equal(first, second) and torch.isfinite(first).all()


def test_plumbing_metrics_are_named_plumbing_and_the_real_ones_are_not(images):
    root, student, teacher = images
    plumbing = evaluator("plumbing").metrics(student, root / "teacher", teacher, [])
    assert not {"fid", "kid"} & plumbing.keys(), "a stand-in's distance is never called fid or kid"
    assert plumbing["plumbing_fid"] > 0 and "plumbing_kid" in plumbing
    assert plumbing["plumbing_check"] == PLUMBING == plumbing["fid_feature_extractor"]
    real = evaluator("shipped").metrics(student, root / "teacher", teacher, [])
    assert real["fid"] > 0 and "kid" in real and not any(k.startswith("plumbing") for k in real)
    assert "PLUMBING" not in real["fid_feature_extractor"]


def test_plumbing_features_are_cached_apart_from_inception_features(images):
    root, student, _ = images
    evaluator("plumbing").features(root / "student", student)
    evaluator("shipped").features(root / "student", student)
    cached = sorted(np.load(f).shape for f in (root / "student").glob("features-*.npy"))
    assert cached == [(5, 256), (5, 2048)]


def test_a_plumbing_result_is_marked_in_the_table_and_csv_and_never_fills_fid(tmp_path):
    result = {"label": "student", "model": "tiny_sana", "schedule": "fractional", "granularity": "per_tensor",
              "weight_bits": 4.0, "plumbing_fid": 12.5, "plumbing_kid": 0.1, "plumbing_check": PLUMBING,
              "num_images": 8, "seed": 0, "reference": "teacher", "digest": "d", "protocol": "p"}
    table = comparison_table([result])
    assert "| student | fractional | per_tensor | 4.00 | - |" in table
    assert f"{PLUMBING}: FID and KID are left empty; plumbing_fid (student 12.500)" in table
    update_csv(tmp_path / "results.csv", [result])
    (row,) = csv.DictReader(open(tmp_path / "results.csv"))
    assert row["fid"] == "" and row["plumbing_fid"] == "12.5" and row["plumbing_check"] == PLUMBING


def test_plumbing_refuses_stored_inception_statistics():
    cfg = OmegaConf.create({"reference": "coco", "reference_stats": "coco.npz", "reference_dir": None,
                            "batch_size": 4, "grid_size": 4, "fid": {"inception": "plumbing"}})
    with pytest.raises(ValueError, match="plumbing cannot use reference_stats"):
        check_settings(cfg)


def test_an_unknown_inception_names_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed: auto, clean-fid, shipped, plumbing"):
        fid_feature_extractor(CPU, "inception-v4")
