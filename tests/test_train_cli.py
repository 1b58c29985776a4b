"""End-to-end runs of the real `fraqat-train` entry point on the tiny model families, offline."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import time

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from train_support import FAST, bits_by_step, cli_env, console, fraqat_train, train_command, train_sweep

from fraqat_cli.student.checkpoint import StudentCheckpoint, load_checkpoint

FAMILIES = ["tiny_sana", "tiny_pixart", "tiny_sd3", "tiny_flux"]


@pytest.fixture(scope="module")
def family_sweep(tmp_path_factory, cache_dir):
    """One multirun over every tiny family, as real models run: bf16 teacher, text encoders and cached
    conditioning, float32 master weights under 32-true, a sample grid at every step (what crashed at the
    first grid before). Each job trains 4 steps and checkpoints."""
    return train_sweep(tmp_path_factory.mktemp("sweep"), cache_dir,
                       [f"model={','.join(FAMILIES)}", "schedule=fractional", "model.dtype=bfloat16",
                        "sample_every_n_steps=1", *FAST[1:]])


@pytest.mark.slow
def test_every_tiny_family_trains_and_writes_a_loadable_checkpoint(family_sweep):
    jobs = sorted(p for p in family_sweep.iterdir() if (p / "metrics.json").is_file())
    assert len(jobs) == len(FAMILIES)
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        checkpoint = load_checkpoint(metrics["checkpoint"])  # weights_only: no arbitrary unpickling
        assert checkpoint["global_step"] == 4
        assert StudentCheckpoint.read(metrics["checkpoint"]).bits == (4.0,)  # from the quantizer buffers
        assert checkpoint["fraqat"]["config"]["model"]["name"] in FAMILIES
        assert any(k.endswith("weight_quantizer.bits") for k in checkpoint["state_dict"])
        assert not any(k.startswith("teacher") or "._teacher" in k for k in checkpoint["state_dict"])


@pytest.mark.slow
def test_multirun_leaves_a_summary_row_per_job(family_sweep):
    with (family_sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["overrides"].split()[0] for r in rows) == sorted(f"model={m}" for m in FAMILIES)
    assert all(float(r["final_bits"]) == 4.0 and r["checkpoint"].endswith("last.ckpt") for r in rows)
    assert all(float(r["validation_loss"]) > 0 for r in rows), "each job's held-out loss"


@pytest.mark.slow
def test_logged_bit_width_follows_the_schedule(family_sweep):
    schedule = instantiate(OmegaConf.load("conf/schedule/fractional.yaml"))
    for job in family_sweep.iterdir():
        if not (job / "metrics.json").is_file():
            continue
        logged = bits_by_step(job)
        assert sorted(logged) == [0, 1, 2, 3]
        assert logged == {step: schedule(step, 4) for step in range(4)}


@pytest.mark.slow
def test_killed_run_resumes_at_the_same_step_and_bits(tmp_path, cache_dir):
    args = ["model=tiny_sana", "schedule=fractional", "trainer.max_steps=40", "data.num_prompts=8",
            "data.batch_size=4", "logger=csv",
            "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=5", f"hydra.run.dir={tmp_path}/run"]
    command = [*train_command(), *args]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    process = subprocess.Popen(command, cwd=tmp_path, env=cli_env(cache_dir),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and process.poll() is None:
            if last.is_file() and load_checkpoint(last)["global_step"] >= 10:
                break
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    interrupted_at = load_checkpoint(last)["global_step"]
    assert 10 <= interrupted_at < 40, "the run must be killed part-way"

    result = fraqat_train(args, cwd=tmp_path, cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {last}" in result.stdout
    schedule = instantiate(OmegaConf.load("conf/schedule/fractional.yaml"))
    resumed = bits_by_step(tmp_path / "run")
    assert min(s for s in resumed if s >= interrupted_at) == interrupted_at
    assert resumed[interrupted_at] == schedule(interrupted_at, 40)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 40
    assert load_checkpoint(last)["global_step"] == 40


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(tmp_path, cache_dir):
    result = fraqat_train(
        ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true", *FAST,
         f"hydra.run.dir={tmp_path}/run"],
        cwd=tmp_path, cache_dir=cache_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 4
    assert checkpoint["fraqat"]["config"]["trainer"]["strategy"] == "ddp"


def test_unknown_schedule_lists_the_choices(tmp_path, cache_dir):
    result = fraqat_train(["schedule=halfway"], cwd=tmp_path, cache_dir=cache_dir)
    assert result.returncode != 0
    for choice in ("fractional", "integer", "simple", "standard", "fp", "linear", "cosine"):
        assert choice in result.stderr


def test_zero_batch_size_fails_before_anything_is_written(tmp_path, cache_dir):
    result = fraqat_train(["data.batch_size=0", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path, cache_dir=cache_dir)
    assert result.returncode == 2
    assert "data.batch_size must be a positive integer; got 0" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not any(cache_dir.glob("*.tmp"))


def jobs(sweep):
    return sorted(p for p in sweep.iterdir() if (p / "metrics.json").is_file())


@pytest.mark.slow
def test_every_family_trains_in_bf16_with_sample_grids(family_sweep):
    assert len(jobs(family_sweep)) == len(FAMILIES)
    for job in jobs(family_sweep):
        assert sorted(p.name for p in (job / "samples").iterdir()) == [f"step_{s:06d}.png" for s in (1, 2, 3, 4)]
        last = load_checkpoint(job / "checkpoints" / "last.ckpt")
        assert last["global_step"] == 4 and last["fraqat"]["config"]["model"]["dtype"] == "bfloat16"
        student = {k: v for k, v in last["state_dict"].items() if k.endswith(".weight")}
        assert all(v.dtype == torch.float32 for v in student.values())  # master weights stay float32
        assert all(torch.isfinite(v).all() for v in student.values())


@pytest.mark.slow
def test_bf16_students_evaluate_beside_their_bf16_teachers(family_sweep, cache_dir, tmp_path):
    result = console("fraqat-eval", [f"ckpt={family_sweep}", "prompts=offline", "prompts.count=4", "batch_size=4",
                                     "logger=none", "clip.model=null", "print_json=true",
                                     f"results_csv={tmp_path}/results.csv", f"hydra.run.dir={tmp_path}/out"],
                     tmp_path, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(r["label"].split("-", 1)[1] for r in results) == sorted(
        f"{m}-fractional-per_tensor" for m in FAMILIES)
    assert all(r["fid"] == r["fid"] and r["fid"] >= 0 for r in results)  # finite, not NaN


@pytest.mark.slow
def test_bf16_students_export_and_match_their_files(family_sweep, cache_dir):
    for job in jobs(family_sweep):
        result = console("fraqat-export", [f"ckpt={job}", "format=safetensors"], job, cache_dir)
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads((job / "export" / "student.safetensors.json").read_text())
        assert report["check"]["relative_difference"] <= report["check"]["tolerance"]
