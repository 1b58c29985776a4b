"""FSDP (one unit per transformer block) rehearsed on the CPU with two processes, through the real CLI."""

from __future__ import annotations

import pytest
import torch
from train_support import FAST, fraqat_train

from fraqat_cli.student.checkpoint import load_checkpoint

TWO_CPU_PROCESSES = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
                     "trainer.gradient_clip_val=null", "data.batch_size=2", "sample_every_n_steps=1"]


def run(tmp_path, cache_dir, name: str, *args: str):
    result = fraqat_train([*FAST, *TWO_CPU_PROCESSES, f"hydra.run.dir={name}", *args], tmp_path, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path / name, result


@pytest.fixture(scope="module")
def sharded_and_replicated(tmp_path_factory, cache_dir):
    """The same 3-step run with the student sharded per block (FSDP2) and replicated (DDP)."""
    work = tmp_path_factory.mktemp("sharding")
    fsdp, _ = run(work, cache_dir, "fsdp", "trainer=fsdp", "trainer.max_steps=3")
    ddp, _ = run(work, cache_dir, "ddp", "trainer=ddp", "trainer.max_steps=3")
    return work, fsdp, ddp


@pytest.mark.slow
def test_a_sharded_student_trains_exactly_like_a_replicated_one(sharded_and_replicated):
    _, fsdp, ddp = sharded_and_replicated
    sharded, replicated = (load_checkpoint(run / "checkpoints" / "last.ckpt") for run in (fsdp, ddp))
    assert sharded["global_step"] == replicated["global_step"] == 3
    assert sharded["state_dict"].keys() == replicated["state_dict"].keys()
    for name, tensor in sharded["state_dict"].items():  # gathered: whole tensors, not shards
        assert type(tensor) is torch.Tensor and tensor.shape == replicated["state_dict"][name].shape, name
        torch.testing.assert_close(tensor, replicated["state_dict"][name], atol=1e-6, rtol=0, equal_nan=True)


@pytest.mark.slow
def test_a_sharded_student_draws_sample_grids_and_writes_readable_checkpoints(sharded_and_replicated):
    _, fsdp, _ = sharded_and_replicated
    assert sorted(p.name for p in (fsdp / "samples").iterdir()) == [f"step_{s:06d}.png" for s in (1, 2, 3)]
    step = load_checkpoint(fsdp / "checkpoints" / "step-000002.ckpt")
    assert "optimizer_states" not in step and step["global_step"] == 2


@pytest.mark.slow
def test_a_sharded_run_resumes_where_it_stopped(sharded_and_replicated, cache_dir):
    work, fsdp, _ = sharded_and_replicated
    _, result = run(work, cache_dir, "fsdp", "trainer=fsdp", "trainer.max_steps=5", "resume=force")  # 2 more
    assert "resuming from" in result.stdout
    assert load_checkpoint(fsdp / "checkpoints" / "last.ckpt")["global_step"] == 5


@pytest.mark.slow
def test_flux_shards_its_double_and_single_stream_blocks(tmp_path, cache_dir):
    flux, _ = run(tmp_path, cache_dir, "flux", "model=tiny_flux", "trainer=fsdp", "trainer.max_steps=2")
    assert load_checkpoint(flux / "checkpoints" / "last.ckpt")["global_step"] == 2


def test_a_model_without_block_classes_cannot_be_sharded():
    from fraqat_cli.train.sharding import BlockShardedFSDP

    with pytest.raises(ValueError, match="model.block_classes"):
        BlockShardedFSDP(block_classes=[])
