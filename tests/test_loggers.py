"""One logger run per job: a sweep's jobs each get their own run, named after their overrides, through the
real `fraqat-train` console script; TensorBoard and MLflow write local files (offline by default)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from train_support import train_sweep

from fraqat_cli.loggers import job_run_name

TOY = ["model=toy", "trainer.max_steps=2", "data.num_prompts=8", "data.batch_size=4",
       "trainer.enable_progress_bar=false"]


def wandb_records(path: Path):
    """The protobuf records of a wandb offline run file (`run-<id>.wandb`): a LevelDB-style log of 32 KiB
    blocks, each record split into chunks with a 7-byte header (crc32, length, kind), after wandb's 7-byte
    file header."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B", f"{path} is not a wandb run file"
    data, pos, chunks, block = raw[7:], 0, [], 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            yield record
            chunks = []
        elif kind == 0:
            chunks = []


def wandb_run_names(job: Path) -> list[str]:
    """The display name of every wandb run written in a job's folder."""
    names = []
    for path in sorted(job.glob("wandb/offline-run-*/run-*.wandb")):
        names += [r.run.display_name for r in wandb_records(path) if r.WhichOneof("record_type") == "run"]
    return names


def test_a_run_name_is_the_base_name_and_the_overrides():
    assert job_run_name("toy-fractional-per_tensor", []) == "toy-fractional-per_tensor"
    assert job_run_name("toy", ["optim.lr=0.1", "seed=2"]) == "toy optim.lr=0.1 seed=2"


@pytest.mark.slow
def test_a_wandb_sweep_writes_one_run_per_job_named_after_its_overrides(tmp_path, cache_dir):
    sweep = train_sweep(tmp_path, cache_dir, [*TOY, "logger=wandb", "optim.lr=0.001,0.002"])
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2
    for job, lr in zip(jobs, ("0.001", "0.002")):
        overrides = [*TOY[:4], "trainer.enable_progress_bar=False", "logger=wandb", f"optim.lr={lr}"]
        assert wandb_run_names(job) == [job_run_name("toy-fractional-per_tensor", overrides)]


@pytest.mark.slow
def test_tensorboard_and_mlflow_log_each_job_into_its_own_run_folder(tmp_path, cache_dir):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sweep = train_sweep(tmp_path, cache_dir, [*TOY, "logger=tensorboard,mlflow"])
    tensorboard_job, mlflow_job = sorted(p for p in sweep.iterdir() if p.is_dir())
    events = EventAccumulator(str(next(tensorboard_job.glob("tensorboard/version_*"))))
    events.Reload()
    assert [e.step for e in events.Scalars("train/weight_bits")] == [0, 1]
    client = MlflowClient(f"sqlite:///{mlflow_job / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("fraqat").experiment_id])
    assert run.info.run_name == "toy-fractional-per_tensor " + " ".join([*TOY[:4], "trainer.enable_progress_bar=False",
                                                                       "logger=mlflow"])
    assert run.info.status == "FINISHED" and "train/loss" in run.data.metrics
    assert not (tensorboard_job / "mlflow.db").exists() and not list(mlflow_job.glob("tensorboard"))


def test_a_logger_whose_library_is_missing_is_one_clear_failure(tmp_path):
    """Lightning's Neptune logger stands in for logger=tensorboard or mlflow on a machine without their package."""
    from omegaconf import OmegaConf

    from fraqat_cli.errors import ExpectedFailure
    from fraqat_cli.loggers import make_logger

    pytest.importorskip("lightning")
    if importlib.util.find_spec("neptune") is not None:
        pytest.skip("neptune is installed here: nothing is missing")
    cfg = OmegaConf.create({"logger": {"_target_": "lightning.pytorch.loggers.NeptuneLogger"}, "run_name": "r",
                            "logger_run_name": "r"})
    with pytest.raises(ExpectedFailure, match=r"pip install 'fraqat-cli\[loggers\]'"):
        make_logger(cfg, tmp_path)
