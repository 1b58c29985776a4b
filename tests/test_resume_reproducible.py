"""A run killed (SIGKILL) or stopped with Ctrl-C (SIGINT) at random steps, and resumed each time with the same
command, ends bit-identical to the same run never stopped: every tensor of the student and of the optimizer."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from train_support import cli_env, fraqat_train, train_command

from fraqat_cli.student.checkpoint import LAST, load_checkpoint

STEPS = 40  # room after the stops: under load a signal can land several steps after the step it waited for
# 16 prompts, one held out: 15 rows in batches of 4 are 3 batches an epoch, so most stops fall mid-epoch.
BATCHES_PER_EPOCH = 3
ARGS = ["model=tiny_sana", f"trainer.max_steps={STEPS}", "data.num_prompts=16", "data.batch_size=4", "logger=csv",
        "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=1", "checkpoint.keep=0",
        "validation.every_n_steps=5"]


def checkpoint_step(path: Path) -> int:
    try:  # read whole, not memory-mapped: a mapped read opens the file twice, and it may be replaced in between
        return load_checkpoint(path)["global_step"]
    except (ValueError, FileNotFoundError, KeyError):
        return -1  # not written yet, or being replaced


def interruptible() -> None:
    """Ctrl-C's default in the child: a suite started in the background (`make test-all &`) runs with SIGINT
    ignored, which every child inherits, and Python then never turns SIGINT into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop_at(run: Path, step: int, how: signal.Signals, cache_dir: Path) -> subprocess.CompletedProcess:
    """Start the run (resuming it) and send `how` once its last.ckpt has reached `step` and this process has written
    one: the run before may have gone past `step` before its kill landed, and a signal during start-up is no stop."""
    step = max(step, checkpoint_step(run / "checkpoints" / LAST) + 1)
    process = subprocess.Popen([*train_command(), *ARGS, f"hydra.run.dir={run}"], cwd=run.parent,
                               env=cli_env(cache_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=interruptible)
    deadline, seen = time.time() + 600, -1
    while process.poll() is None and (seen := checkpoint_step(run / "checkpoints" / LAST)) < step \
            and time.time() < deadline:
        time.sleep(0.02)
    ended_before = process.poll()
    process.send_signal(how)
    stdout, stderr = process.communicate(timeout=120)
    assert ended_before is None, (f"the run ended (exit {ended_before}) before its stop at step {step}; last.ckpt "
                                  f"was last read at step {seen}: {stderr[-2000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def assert_bit_identical(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, equal_nan=True, msg=f"{what} {key}")


@pytest.mark.slow
def test_a_run_stopped_three_times_ends_bit_identical_to_the_run_never_stopped(tmp_path, cache_dir):
    whole = subprocess.Popen([*train_command(), *ARGS, f"hydra.run.dir={tmp_path}/whole"], cwd=tmp_path,
                             env=cli_env(cache_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "stopped"
    # the first stop on an epoch's last batch (Lightning goes on into the next epoch without its start hook)
    first = BATCHES_PER_EPOCH * random.randint(1, 4)
    stops = [first, *sorted(random.sample(range(first + 1, STEPS // 2), 2))]
    stopped_at = []
    for step, how in zip(stops, (signal.SIGKILL, signal.SIGINT, signal.SIGKILL)):
        result = stop_at(run, step, how, cache_dir)
        stopped_at.append(checkpoint_step(run / "checkpoints" / LAST))
        if how == signal.SIGINT:  # Ctrl-C: one line, exit 2, and a last.ckpt the same command resumes
            assert result.returncode == 2, result.stderr[-3000:]
            (line,) = [s for s in result.stderr.splitlines() if s.startswith("fraqat-train: error: ")]
            assert line.startswith("fraqat-train: error: interrupted at step ")
            assert "; resume with the same command (it continues from step " in line
        else:
            assert result.returncode == -signal.SIGKILL
    assert stopped_at == sorted(set(stopped_at)) and stopped_at[-1] < STEPS, f"stops {stops}: {stopped_at}"

    resumed = fraqat_train([*ARGS, f"hydra.run.dir={run}"], cwd=tmp_path, cache_dir=cache_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert whole.wait(timeout=300) == 0, whole.stderr.read()[-3000:]
    assert f"resuming from {run / 'checkpoints' / LAST}" in resumed.stdout

    expected, got = (load_checkpoint(p / "checkpoints" / LAST) for p in (tmp_path / "whole", run))
    assert got["global_step"] == expected["global_step"] == STEPS
    assert_bit_identical(expected["state_dict"], got["state_dict"], f"stopped at {stopped_at}: student")
    for a, b in zip(expected["optimizer_states"][0]["state"].values(), got["optimizer_states"][0]["state"].values()):
        assert_bit_identical(a, b, f"stopped at {stopped_at}: optimizer state")
