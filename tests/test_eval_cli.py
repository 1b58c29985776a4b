"""`fraqat-eval` end to end on tiny students, and its answers to bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from PIL import Image
from train_support import FAST, cli_env, console, fraqat_train, train_sweep

from fraqat_cli.data.conditioning import prompt_conditioning
from fraqat_cli.evaluate.command import CSV_COLUMNS, evaluate, update_csv
from fraqat_cli.evaluate.comparison import comparison_table
from fraqat_cli.models.generation import generate
from fraqat_cli.models.loading import load_model

EVAL_FAST = ["prompts.count=6", "logger=csv", "batch_size=6", "clip.model=null"]


def pair_grid_size(pairs: int) -> tuple[int, int]:
    from test_console import grid_size

    return grid_size(pairs)


def fraqat_eval(args, cwd, cache_dir):
    command = [os.path.join(os.path.dirname(sys.executable), "fraqat-eval"), *args]
    return subprocess.run(command, cwd=cwd, env=cli_env(cache_dir), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache_dir):
    """A 2-job sweep (fractional and standard QAT) of tiny Sana students."""
    return train_sweep(tmp_path_factory.mktemp("sweep"), cache_dir, ["schedule=fractional,standard", *FAST])


@pytest.fixture(scope="module")
def evaluated(sweep, cache_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("eval")
    result = fraqat_eval([f"ckpt={sweep}", *EVAL_FAST, f"results_csv={work}/results.csv",
                          f"hydra.run.dir={work}/out"], cwd=work, cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return work, result


def job_results(sweep):
    return {p.parent.parent.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/eval/*/results.json")}


@pytest.mark.slow
def test_sweep_eval_writes_images_grid_and_results_per_job(sweep, evaluated):
    results = job_results(sweep)
    assert len(results) == 2
    for r in results.values():
        images = sorted(os.listdir(r["images_dir"]))
        assert [name for name in images if name.endswith(".png")] == [f"{i:05d}.png" for i in range(6)]
        assert Image.open(r["grid"]).size == pair_grid_size(6), "6 teacher | student pairs, 4 a row"
        assert r["fid"] >= 0 and r["num_images"] == 6 and r["weight_bits"] == 4.0
        assert r["reference"] == "teacher" and "inception" in r["fid_feature_extractor"]
        assert r["versions"]["torch"]
    assert {r["schedule"] for r in results.values()} == {"fractional", "standard"}


@pytest.mark.slow
def test_sweep_eval_writes_a_comparison_and_a_csv_row_per_model(sweep, evaluated):
    work, result = evaluated
    table = (sweep / "comparison.md").read_text()
    assert "| fractional | per_tensor |" in table and "| standard | per_tensor |" in table
    assert "| FID val | attributes |" in table, "the default prompt set has ground truth"
    fid = {r["schedule"]: r["fid"] for r in job_results(sweep).values()}
    assert f"{(fid['fractional'] - fid['standard']) / fid['standard']:+.1%}" in table
    assert Image.open(sweep / "comparison.png").size[0] > 100
    with open(work / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert "FID from 6 images is unstable: below 2048 images" in table and "FID from 6 images" in result.stdout


@pytest.mark.slow
def test_interrupted_eval_reuses_the_images_already_generated(sweep, evaluated, cache_dir):
    work, _ = evaluated
    before = job_results(sweep)
    images_dir = next(iter(before.values()))["images_dir"]
    kept = {name: os.stat(os.path.join(images_dir, name)).st_mtime_ns for name in ("00000.png", "00001.png")}
    pixels = np.asarray(Image.open(os.path.join(images_dir, "00003.png")))
    for name in ("00003.png", "00004.png"):
        os.remove(os.path.join(images_dir, name))
    for stale in os.listdir(images_dir):
        if stale.endswith(".npy"):
            os.remove(os.path.join(images_dir, stale))
    result = fraqat_eval([f"ckpt={sweep}", *EVAL_FAST, f"results_csv={work}/results.csv",
                          f"hydra.run.dir={work}/out2"], cwd=work, cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {n: os.stat(os.path.join(images_dir, n)).st_mtime_ns for n in kept} == kept
    assert np.array_equal(np.asarray(Image.open(os.path.join(images_dir, "00003.png"))), pixels)
    after = job_results(sweep)
    assert {k: v["fid"] for k, v in after.items()} == {k: v["fid"] for k, v in before.items()}


@pytest.mark.slow
def test_toy_student_and_its_teacher_report_fid_val_and_attribute_accuracy(tmp_path, cache_dir):
    """`make train`'s eval in miniature: on the validation scenes (the default prompts) each model also gets
    FID against the rendered scenes and attribute accuracy; the trained teacher's is the student's baseline."""
    run = tmp_path / "run"
    trained = fraqat_train(["model=toy", *FAST[1:], f"hydra.run.dir={run}"], cwd=tmp_path, cache_dir=cache_dir)
    assert trained.returncode == 0, trained.stderr[-3000:]
    result = fraqat_eval([f"ckpt=[{run},teacher]", "model=toy", *EVAL_FAST, f"results_csv={tmp_path}/results.csv",
                          f"hydra.run.dir={tmp_path}/out"], cwd=tmp_path, cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    student = json.loads(next(run.glob("eval/*/results.json")).read_text())
    teacher = json.loads((tmp_path / "out" / "toy-teacher" / "results.json").read_text())
    for r in (student, teacher):
        assert r["fid_val"] > 0 and r["prompt_set"]["_target_"].endswith("shapes_val_prompts")
        per_attribute = [r[f"{a}_accuracy"] for a in ("colour", "shape", "place", "size")]
        assert r["attribute_accuracy"] == pytest.approx(np.mean(per_attribute))
    assert teacher["attribute_accuracy"] >= 0.75, "the trained teacher draws what its captions say"
    assert "| FID val | attributes |" in result.stdout and "| toy-teacher | teacher |" in result.stdout
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["label"] for r in rows} == {"run", "toy-teacher"} and all(r["fid_val"] for r in rows)


def test_prompts_without_ground_truth_keep_the_table_as_it_was():
    plain = {"label": "a", "schedule": "standard", "granularity": "per_tensor", "weight_bits": 4.0, "fid": 2.0}
    assert "FID val" not in comparison_table([plain])
    row = comparison_table([{**plain, "fid_val": 30.0, "attribute_accuracy": 0.75}]).splitlines()[2]
    assert row == "| a | standard | per_tensor | 4.00 | 2.000 | - | - | 30.000 | 0.750 | - |"


def test_the_gap_of_a_w3_schedule_is_to_plain_qat_at_3_bits():
    row = lambda label, schedule, bits, fid: {"label": label, "schedule": schedule,  # noqa: E731
                                             "granularity": "per_channel", "weight_bits": bits, "fid": fid}
    table = comparison_table([row("s4", "standard", 4.0, 2.0), row("f4", "fractional", 4.0, 1.8),
                              row("s3", "standard_w3", 3.0, 10.0), row("f3", "fractional_w3", 3.0, 9.0)])
    gaps = {line.split(" | ")[0].strip("| "): line.rsplit(" | ", 1)[1].strip(" |") for line in table.splitlines()[2:6]}
    assert gaps == {"s4": "-", "f4": "-10.0%", "s3": "-", "f3": "-10.0%"}  # not 9 / 2 - 1


def test_a_csv_from_before_the_new_columns_gets_them_and_keeps_its_rows(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("label,model,fid\r\nold,toy,3.5\r\n")
    update_csv(path, [{"label": "new", "model": "toy", "fid": 2.0, "fid_val": 30.0}])
    with open(path) as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == CSV_COLUMNS
    assert [(r["label"], r["fid"], r["fid_val"]) for r in rows] == [("old", "3.5", ""), ("new", "2.0", "30.0")]


def test_same_seed_same_images_and_different_seeds_different_images(tmp_path):
    model_cfg = OmegaConf.load("conf/model/tiny_sana.yaml")
    prompts = ["a small red circle at the top left on a blue background"] * 2
    conditioning = prompt_conditioning(model_cfg, prompts, str(tmp_path))
    model = load_model(model_cfg)
    first = generate(model, conditioning, [5, 6])
    again = generate(model, conditioning, [5, 6])
    assert np.array_equal(np.asarray(first[0]), np.asarray(again[0]))
    assert np.array_equal(np.asarray(first[1]), np.asarray(again[1]))
    assert not np.array_equal(np.asarray(first[0]), np.asarray(first[1])), "same prompt, different seeds"


def compose_eval(*overrides):
    with initialize_config_module(config_module="fraqat_cli.conf", version_base="1.3"):
        return compose(config_name="eval", overrides=list(overrides))


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (["ckpt=/nowhere/last.ckpt"], FileNotFoundError, "holds no checkpoint"),
        (["ckpt=teacher"], ValueError, "also give model=NAME"),
        (["ckpt=teacher", "model=tiny_sana", "prompts=coco", "prompts.captions_file=/nowhere/captions_val2017.json"],
         FileNotFoundError, "captions_val2017.json.*does not exist.*cocodataset.org"),
        (["ckpt=teacher", "model=tiny_sana", "reference=coco", "reference_dir=/nowhere"], FileNotFoundError,
         "reference_dir='/nowhere' is not a folder"),
        (["ckpt=teacher", "model=tiny_sana", "reference=imagenet"], ValueError, "allowed: teacher, coco"),
    ],
    ids=["missing-ckpt", "teacher-without-model", "missing-captions", "missing-reference-dir", "unknown-reference"],
)
def test_bad_input_is_refused_before_anything_is_written(tmp_path, overrides, error, message):
    cfg = compose_eval(*overrides, f"out_dir={tmp_path}/out", f"results_csv={tmp_path}/results.csv",
                       f"cache_dir={tmp_path}/cache", "clip.model=null", "logger=none")
    with pytest.raises(error, match=message):
        evaluate(cfg)
    assert not (tmp_path / "results.csv").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("logger", ["csv", "none", "wandb", "tensorboard", "mlflow"])
def test_every_logger_option_resolves_in_the_eval_config(logger):
    """`fraqat-eval` instantiates the logger last, after every image and metric: a bad key there fails the run."""
    cfg = compose_eval("ckpt=teacher", "model=toy", f"logger={logger}")
    if cfg.logger is not None:
        OmegaConf.to_container(cfg.logger, resolve=True)  # raises on a key the eval config lacks


def test_the_wandb_logger_passes_wandb_no_deprecated_setting(tmp_path):
    """Lightning passes `anonymous=None` to `wandb.init`, which warns at every run that it has no effect."""
    from lightning.pytorch.loggers import WandbLogger

    from fraqat_cli.cli import instantiate_or_raise

    cfg = compose_eval("ckpt=teacher", "model=toy", "logger=wandb")
    logger = instantiate_or_raise(cfg.logger, save_dir=str(tmp_path))
    assert isinstance(logger, WandbLogger) and logger._wandb_init["name"] == cfg.run_name
    assert "anonymous" not in logger._wandb_init and logger._wandb_init["project"] == "fraqat"


def test_corrupt_checkpoint_exits_non_zero_with_a_clear_message(tmp_path):
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint at all")
    result = fraqat_eval([f"ckpt={tmp_path}/bad.ckpt", *EVAL_FAST, f"results_csv={tmp_path}/results.csv"],
                         cwd=tmp_path, cache_dir=tmp_path / "cache")
    assert result.returncode == 2
    assert "cannot be read as a fraqat checkpoint" in result.stderr
    assert not (tmp_path / "results.csv").exists()


@pytest.mark.slow
def test_checkpoint_of_another_model_is_refused(sweep, tmp_path):
    checkpoint = next(sweep.glob("*/checkpoints/last.ckpt"))
    cfg = compose_eval(f"ckpt={checkpoint}", "model=tiny_pixart", f"out_dir={tmp_path}/out",
                       f"results_csv={tmp_path}/results.csv", "clip.model=null", "logger=none")
    with pytest.raises(ValueError, match="student of model 'tiny_sana', not of model='tiny_pixart'"):
        evaluate(cfg)


@pytest.mark.slow
def test_clip_weights_add_clip_score_and_clip_fid_against_the_teachers_images(sweep, evaluated, cache_dir, tmp_path):
    from test_metrics import tiny_clip

    job = sorted(p for p in sweep.iterdir() if (p / "checkpoints").is_dir())[0]
    result = fraqat_eval([f"ckpt=[{job},teacher]", "model=tiny_sana", *EVAL_FAST, f"clip.model={tiny_clip(tmp_path)}",
                          "logger=none", "print_json=true",
                          f"results_csv={tmp_path}/results.csv", f"hydra.run.dir={tmp_path}/out"],
                         cwd=tmp_path, cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    by_label = {r["label"]: r for r in json.loads(result.stdout.strip().splitlines()[-1])}
    assert by_label["tiny_sana-teacher"]["clip_fid"] == 0.0, "the teacher against its own images"
    student = by_label[job.name]
    assert student["clip_fid"] > 0 and 0 <= student["clip_score"] <= 100
    assert "| CLIP-FID |" in result.stdout


def export_folder(tmp_path):
    """A run's export/ folder as fraqat-export leaves it (empty files: only names are read here)."""
    folder = tmp_path / "run" / "export"
    folder.mkdir(parents=True)
    for name in ("student.safetensors", "student.nbits.onnx", "student.gguf"):
        (folder / name).write_bytes(b"")
    return folder


def test_an_export_folder_is_refused_naming_the_files_that_evaluate(tmp_path):
    from fraqat_cli.evaluate.targets import resolve_targets

    folder = export_folder(tmp_path)
    with pytest.raises(FileNotFoundError) as refused:
        resolve_targets(str(folder), None)
    message = str(refused.value)
    assert f"ckpt={folder / 'student.safetensors'}" in message and f"ckpt={folder / 'student.nbits.onnx'}" in message
    assert "student.gguf" not in message and ".safetensors, .onnx" in message  # GGUF files are not evaluated


@pytest.mark.slow
def test_an_export_folder_from_ls_is_one_line_and_exit_2_through_the_console_script(tmp_path):
    folder = export_folder(tmp_path)
    result = console("fraqat-eval", [f"ckpt={folder}", "logger=none"], cwd=tmp_path, cache_dir=tmp_path / "cache")
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = [s for s in result.stderr.splitlines() if "error" in s]
    assert line.startswith("fraqat-eval: error: ") and f"ckpt={folder / 'student.safetensors'}" in line


def test_the_results_csv_lands_in_the_evals_own_folder_unless_a_shared_one_is_asked_for(tmp_path):
    """Not `evals/results.csv` relative to wherever the user stands: the eval's folder, or the path given."""
    assert compose_eval("ckpt=teacher", f"out_dir={tmp_path}/eval").results_csv == f"{tmp_path}/eval/results.csv"
    shared = compose_eval("ckpt=teacher", f"out_dir={tmp_path}/eval", f"results_csv={tmp_path}/all.csv")
    assert shared.results_csv == f"{tmp_path}/all.csv"
