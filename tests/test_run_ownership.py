"""One run per folder, through the real `fraqat-train`: a held folder is refused naming its holder, a dead
holder's lock is taken over, a folder of another config's run is refused, a finished run is reported and left
as it was, and the leftovers of killed writes are removed."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from train_support import FAST, cli_env, fraqat_train, train_command

from fraqat_cli.student.checkpoint import LAST, load_checkpoint

JOB_LOG = "command.log"  # Hydra's job log: appended to by every process started on the folder


def errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("fraqat-train: error: ")]


def warnings_of(result) -> list[str]:
    """The run's warnings, less the one every few-step test run gives about its schedule's stages (checked in
    test_short_run.py)."""
    return [line for line in result.stderr.splitlines()
            if line.startswith("warning: ") and "too few for schedule" not in line]


def contents(run: Path) -> dict[str, str]:
    """Every file of the run folder (Hydra's job log aside) by digest."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and p.name != JOB_LOG}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache_dir) -> Path:
    work = tmp_path_factory.mktemp("finished")
    result = fraqat_train([*FAST, f"hydra.run.dir={work}/run"], cwd=work, cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "run"


@pytest.mark.slow
def test_a_held_folder_is_refused_naming_its_holder_and_a_dead_holders_lock_is_taken_over(tmp_path, cache_dir):
    run = tmp_path / "run"
    long = [*FAST, "trainer.max_steps=100000", f"hydra.run.dir={run}"]
    holder = subprocess.Popen([*train_command(), *long], cwd=tmp_path, env=cli_env(cache_dir),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while holder.poll() is None and time.time() < deadline:
            if (run / "checkpoints" / LAST).is_file():
                break
            time.sleep(0.1)
        assert holder.poll() is None, "the first run must still be training"
        before = contents(run / ".hydra")

        second = fraqat_train([*long, "optim.lr=1e-3"], cwd=tmp_path, cache_dir=cache_dir)

        assert second.returncode == 2
        (line,) = errors(second)
        assert line.startswith(f"fraqat-train: error: run folder {str(run)!r} is in use by fraqat-train pid "
                               f"{holder.pid} on host {socket.gethostname()!r} (since ")
        assert line.endswith("); wait for it to finish, or train into another folder with hydra.run.dir=...")
        assert contents(run / ".hydra") == before  # the holder's config.yaml still says what it runs
        assert not list(run.glob(".hydra-*"))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()

    # the holder died holding it: the next run takes the lock over, then finds another config's checkpoint
    third = fraqat_train([*FAST, f"hydra.run.dir={run}"], cwd=tmp_path, cache_dir=cache_dir)
    assert third.returncode == 2
    assert warnings_of(third)[0].startswith(f"warning: run folder {str(run)!r}: taking over the lock of "
                                            f"fraqat-train pid {holder.pid} on host {socket.gethostname()!r}")
    assert warnings_of(third)[0].endswith("), which is no longer running")
    (line,) = errors(third)
    assert "was trained with another config (trainer.max_steps 100000 -> 4);" in line
    assert not (run / ".fraqat.lock").exists()


@pytest.mark.slow
def test_a_finished_run_is_reported_and_left_as_it_was_and_leftovers_go(finished_run, tmp_path, cache_dir):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    killed_write = run / "checkpoints" / ".last.ckpt.k3j4l5m6.tmp"  # what a kill during torch.save leaves
    killed_write.write_bytes(b"\0" * 2**20)
    (run / ".metrics.json.x_9ab2cd.tmp").write_text("{")
    (run / "checkpoints" / "notes.tmp").write_text("mine")  # not a temporary file of fraqat's: kept
    kept = contents(run)
    del kept[str(killed_write.relative_to(run))], kept[".metrics.json.x_9ab2cd.tmp"]

    again = fraqat_train([*FAST, f"hydra.run.dir={run}", "print_json=true"], cwd=tmp_path, cache_dir=cache_dir)

    assert again.returncode == 0, again.stderr[-3000:]
    assert f"already finished at step 4; its result ({run / 'metrics.json'}):" in again.stdout
    assert "fraqat-train: done" in again.stdout  # the summary table, then the JSON print_json asks for
    assert "student:" not in again.stdout  # no model was built
    printed = json.loads(again.stdout[again.stdout.index("{"):])
    assert printed == {k: v for k, v in json.loads((run / "metrics.json").read_text()).items() if k != "overrides"}
    assert f"removed 1 temporary file(s) of earlier interrupted writes from {str(run / 'checkpoints')!r}: " \
           f"1.0 MiB freed" in again.stdout
    assert contents(run) == kept  # nothing rewritten, .hydra/config.yaml included; only the leftovers gone

    other = fraqat_train([*FAST, "optim.lr=1e-3", "seed=7", f"hydra.run.dir={run}"], cwd=tmp_path,
                         cache_dir=cache_dir)
    assert other.returncode == 2
    assert errors(other) == [
        f"fraqat-train: error: checkpoint {str(run / 'checkpoints' / LAST)!r} was trained with another config "
        f"(optim.lr 0.0001 -> 0.001, seed 1234 -> 7); to train this config start a new folder with "
        f"hydra.run.dir=..., or continue that run with it anyway with resume=force"]
    assert contents(run) == kept

    forced = fraqat_train([*FAST, "trainer.max_steps=6", "resume=force", f"hydra.run.dir={run}"], cwd=tmp_path,
                          cache_dir=cache_dir)
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert warnings_of(forced) == [f"warning: resume=force: resuming {str(run / 'checkpoints' / LAST)!r}, trained "
                                   f"with another config (trainer.max_steps 4 -> 6)"]
    assert load_checkpoint(run / "checkpoints" / LAST)["global_step"] == 6
    assert "resume=force" in (run / ".hydra" / "overrides.yaml").read_text()  # the run that trained wrote them
    assert not list(run.glob(".hydra-*"))


# --- the pieces, in-process ---------------------------------------------------------------------------------

def test_a_held_lock_refuses_a_second_holder_and_a_dead_runs_record_is_taken_over(tmp_path, capsys):
    from fraqat_cli.train.run_folder import LOCK_FILE, RunFolderBusy, RunLock

    with RunLock(tmp_path):
        with pytest.raises(RunFolderBusy, match=rf"is in use by fraqat-train pid {os.getpid()} on host "
                                                rf"{re.escape(repr(socket.gethostname()))} \(since "):
            RunLock(tmp_path).__enter__()  # flocks are per open file: a second open conflicts even here
    assert not (tmp_path / LOCK_FILE).exists()

    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 2**22 + 1, "host": socket.gethostname(), "since": 0}))
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert capsys.readouterr().err.startswith(f"warning: run folder {str(tmp_path)!r}: taking over the lock of "
                                              f"fraqat-train pid {2**22 + 1} on host ")

    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 7, "host": "elsewhere", "since": 0}))
    with pytest.raises(RunFolderBusy, match="which this host cannot check; if that run has ended, remove "):
        RunLock(tmp_path).__enter__()


def test_only_the_keys_that_change_training_must_match():
    from fraqat_cli.train.run_config import training_differences

    stored = {"seed": 1, "optim": {"lr": 1e-4}, "trainer": {"max_steps": 40, "enable_progress_bar": True},
              "logger": {"name": "a"}, "checkpoint": {"every_n_steps": 25}, "epochs": 2}
    asked = {"seed": 1, "optim": {"lr": 1e-3}, "trainer": {"max_steps": 1000, "enable_progress_bar": False},
             "logger": None, "checkpoint": {"every_n_steps": 5}, "epochs": 2, "feature_loss_weight": 0.5}
    # steps derived from the same epochs are not compared; a key the stored run lacks is
    assert training_differences(stored, asked) == [("feature_loss_weight", "<absent>", 0.5),
                                                   ("optim.lr", 1e-4, 1e-3)]
    assert ("trainer.max_steps", 40, 1000) in training_differences({**stored, "epochs": None}, asked)


def test_a_resumed_epoch_continues_its_order_where_it_stopped():
    from fraqat_cli.train.rng_state import TrainingOrder

    order = TrainingOrder(10, seed=3)
    order.set_epoch(2)
    whole = list(order)
    assert sorted(whole) == list(range(10)) and whole == order.permutation(2) != order.permutation(3)
    order.resume_at(2, 6)
    assert list(order) == whole[6:] and list(order) == whole  # the skip holds for the stopped epoch's rest only
    order.resume_at(1, 6)
    assert list(order) == whole  # a skip for another epoch does not apply


def test_only_temporary_files_of_atomic_writes_are_leftovers(tmp_path):
    import tempfile

    from fraqat_cli.files import TEMP_SUFFIX, remove_leftover_temporaries

    fd, killed = tempfile.mkstemp(dir=tmp_path, prefix=".last.ckpt.", suffix=TEMP_SUFFIX)  # as atomic_write names
    os.write(fd, b"\0" * 1000)
    os.close(fd)
    for name in ("last.ckpt", "notes.tmp", ".last.ckpt.tmp", ".hidden.tmp"):
        (tmp_path / name).write_text("kept")
    assert remove_leftover_temporaries(tmp_path) == (1, 1000)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden.tmp", ".last.ckpt.tmp", "last.ckpt", "notes.tmp"]
