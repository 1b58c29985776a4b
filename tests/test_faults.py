"""Faults a long run meets, each through the real console script: a damaged cache file, a damaged last.ckpt,
divergence, a full disk, a read-only folder, a prompt file that is not UTF-8.

The full disk and the read-only folder are real file systems where the kernel lets an unprivileged user make
them: a tmpfs of a few MiB (or a read-only one) mounted over the run's folder in a user and mount namespace of
the run's own (`unshare`). Where that is not allowed, `faulty_disk_run` runs the same console script's `main`
with the writer wrapped to fail as such a disk would (torch.save's "unexpected pos" on a full disk, OSError
EROFS from a read-only one; `FAKE_DISK`), and prints that it did.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from train_support import cli_env, console, fraqat_train, train_command

from fraqat_cli.cache import KEY_FIELD, store_problems
from fraqat_cli.student.checkpoint import LAST, load_checkpoint
from fraqat_cli.train.checkpointing import AtomicCheckpointIO
from fraqat_cli.train.divergence import TrainingDiverged

# The toy default as a new user runs it, made short: step checkpoints at 2 and 4, last.ckpt at 4.
TOY = ["trainer.max_steps=4", "data.num_prompts=8", "data.batch_size=4", "logger=csv",
       "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=2"]


def errors(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("fraqat-") and ": error: " in line]


def warnings_of(result: subprocess.CompletedProcess) -> list[str]:
    """The run's warnings, less the one every few-step test run gives about its schedule's stages (checked in
    test_short_run.py)."""
    return [line for line in result.stderr.splitlines()
            if line.startswith("warning: ") and "too few for schedule" not in line]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory) -> Path:
    """The toy's cache alone (text conditioning and latents of `TOY`), filled by `good_run`."""
    return tmp_path_factory.mktemp("toy-cache")


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, toy_cache) -> Path:
    """A finished toy run (4 steps) whose folder each test copies."""
    work = tmp_path_factory.mktemp("good")
    result = fraqat_train([*TOY, f"hydra.run.dir={work}/run"], cwd=work, cache_dir=toy_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "run"


def copy_run(good_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    return run


def test_a_truncated_cache_file_is_named_and_recomputed_in_place(good_run, toy_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(toy_cache, cache)
    (shard,) = cache.glob("teacher-latents-*/shard-*.safetensors")
    before = {name: t.clone() for name, t in load_file(shard).items()}  # load_file maps the file
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # what a full disk or a partial copy leaves

    result = fraqat_train([*TOY, "trainer.max_steps=2", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path, cache_dir=cache)

    assert result.returncode == 0, result.stderr[-3000:]
    assert warnings_of(result) == [f"warning: cache entry {str(shard)!r}: it cannot be read (Error while deserializing "
                                   f"header: incomplete metadata, file not fully covered); recomputing it"]
    after = load_file(shard)  # whole again, in place, and holding what it held before
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    key = shard.parent.name.rsplit("-", 1)[1]
    with safe_open(shard, framework="pt") as f:
        assert f.metadata()[KEY_FIELD] == key
    assert not list(shard.parent.glob(".*.tmp")) and store_problems(shard.parent, key) == []  # the next run: silent


def test_a_file_of_another_entry_or_with_other_rows_is_recomputed_and_named(tmp_path, capsys):
    from fraqat_cli.cache import cached_tensors, sharded_tensors

    def rows(offset):
        return lambda a, b: {"x": torch.arange(a, b, dtype=torch.float32)[:, None] + offset}

    first = sharded_tensors(tmp_path, "rows", {"n": 1}, 4, 2, rows(0))
    other = sharded_tensors(tmp_path, "rows", {"n": 2}, 4, 2, rows(100))
    shutil.copy(other.folder / other.files[1], first.folder / first.files[1])  # a copy from the wrong entry
    key, other_key = first.folder.name.rsplit("-", 1)[1], other.folder.name.rsplit("-", 1)[1]
    save_file({"x": torch.zeros(1, 1)}, first.folder / first.files[0], metadata={KEY_FIELD: key})  # one row short
    capsys.readouterr()

    again = sharded_tensors(tmp_path, "rows", {"n": 1}, 4, 2, rows(0))
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")] == [
        f"warning: cache entry {str(first.folder / first.files[0])!r}: its tensors should have 2 rows; got "
        f"{{'x': (1, 1)}}; recomputing it",
        f"warning: cache entry {str(first.folder / first.files[1])!r}: it belongs to cache entry {other_key}, "
        f"not {key}; recomputing it"]
    assert torch.equal(again.load()["x"], rows(0)(0, 4)["x"])

    single = lambda: {"y": torch.ones(3)}
    cached_tensors(tmp_path, "one", {"n": 1}, single)
    (path,) = tmp_path.glob("one-*.safetensors")
    path.write_bytes(path.read_bytes()[:-4])
    assert torch.equal(cached_tensors(tmp_path, "one", {"n": 1}, single)["y"], torch.ones(3))
    assert capsys.readouterr().err.startswith(f"warning: cache entry {str(path)!r}: it cannot be read (")
    assert load_file(path)["y"].tolist() == [1.0, 1.0, 1.0]


REPAIR = """
import sys, time, torch
from fraqat_cli.cache import sharded_tensors

def rows(start, stop):
    with open(sys.argv[2], "a") as calls:
        calls.write(f"{start}:{stop}\\n")
    time.sleep(2)  # long enough for the other process to find the damage too and wait for the lock
    return {"x": torch.arange(start, stop, dtype=torch.float32)[:, None].expand(-1, 3).contiguous()}

sharded_tensors(sys.argv[1], "rows", {"rows": 4}, 4, 2, rows)
"""


def test_two_processes_repairing_one_entry_recompute_it_once(tmp_path):
    from fraqat_cli.cache import sharded_tensors

    build = lambda a, b: {"x": torch.arange(a, b, dtype=torch.float32)[:, None].expand(-1, 3).contiguous()}
    store = sharded_tensors(tmp_path, "rows", {"rows": 4}, 4, 2, build)
    shard = store.folder / store.files[0]
    shard.write_bytes(shard.read_bytes()[:-8])
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    both = [subprocess.Popen([sys.executable, "-c", REPAIR, str(tmp_path), str(calls)], env=env, text=True,
                             stderr=subprocess.PIPE) for _ in range(2)]
    stderr = [p.communicate(timeout=120)[1] for p in both]
    assert [p.returncode for p in both] == [0, 0], stderr
    assert calls.read_text() == "0:2\n"  # one recomputation of the damaged shard, by whichever locked first
    assert sum(e.count(f"warning: cache entry {str(shard)!r}") for e in stderr) == 1
    assert store_problems(store.folder, store.folder.name.rsplit("-", 1)[1]) == []
    assert torch.equal(store.load()["x"], build(0, 4)["x"])


def test_a_truncated_last_checkpoint_resumes_from_the_newest_readable_one(good_run, toy_cache, tmp_path):
    run = copy_run(good_run, tmp_path)
    last = run / "checkpoints" / LAST
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])

    # 2 steps more than the run was trained for: another run's config, continued on purpose (resume=force)
    result = fraqat_train([*TOY, "trainer.max_steps=6", "resume=force", f"hydra.run.dir={run}"], cwd=tmp_path,
                          cache_dir=toy_cache)

    assert result.returncode == 0, result.stderr[-3000:]
    step4 = run / "checkpoints" / "step-000004.ckpt"
    assert warnings_of(result) == [
        f"warning: skipping checkpoint {str(last)!r}: it cannot be read (PytorchStreamReader failed reading zip "
        f"archive: failed finding central directory)",
        f"warning: resuming from {str(step4)!r} (step 4), the newest checkpoint that can be read: it holds the "
        f"student alone, so its weights, step and bit-width continue and AdamW's moments start from zero",
        f"warning: resume=force: resuming {str(step4)!r}, trained with another config (trainer.max_steps 4 -> 6)",
    ]
    newest_log = sorted(run.glob("csv/version_*/metrics.csv"))[-1]
    assert [int(r["step"]) for r in csv.DictReader(newest_log.open()) if r["train/loss"]] == [4, 5]  # not from 0
    assert load_checkpoint(last)["global_step"] == 6  # replaced by the resumed run's, not set aside as last-v1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        LAST, "step-000002.ckpt", "step-000004.ckpt", "step-000006.ckpt"]


def test_when_no_checkpoint_can_be_read_resuming_is_one_error(good_run, tmp_path, capsys):
    from fraqat_cli.train.checkpointing import resume_path

    run = copy_run(good_run, tmp_path)
    for path in (run / "checkpoints").iterdir():
        path.write_bytes(b"")
    with pytest.raises(ValueError) as refused:
        resume_path("auto", run / "checkpoints")
    assert str(refused.value) == (f"no checkpoint in {str(run / 'checkpoints')!r} can be read (last.ckpt, step-000004"
                                  f".ckpt, step-000002.ckpt); move them away, or start afresh with resume=null")
    assert capsys.readouterr().err.count("warning: skipping checkpoint") == 3


@pytest.mark.slow
def test_a_diverging_run_stops_keeps_its_good_checkpoints_and_nan_students_are_refused(good_run, toy_cache, tmp_path):
    run = copy_run(good_run, tmp_path)
    kept = {p.name: digest(p) for p in [*(run / "checkpoints").iterdir(), run / "metrics.json"]}

    result = fraqat_train([*TOY, "resume=null", "optim.lr=1e6", f"hydra.run.dir={run}"], cwd=tmp_path,
                          cache_dir=toy_cache)

    assert result.returncode == 2
    (line,) = errors(result)
    assert line.startswith("fraqat-train: error: training diverged at step 1: the loss is nan (last finite loss ")
    assert line.endswith(f"at step 0); the last good checkpoint is {str(run / 'checkpoints' / LAST)!r} (step 4); "
                         f"try a lower optim.lr (now 1e+06)")
    assert {p.name: digest(p) for p in [*(run / "checkpoints").iterdir(), run / "metrics.json"]} == kept
    assert "NaN" not in (run / "metrics.json").read_text()

    # without the guard, the checkpoint writer Lightning calls (training's `AtomicCheckpointIO`) still refuses a
    # NaN state, and the good checkpoint it would replace stays
    checkpoint = load_checkpoint(run / "checkpoints" / "step-000004.ckpt")
    name = next(k for k in checkpoint["state_dict"] if k.endswith("to_q.weight"))
    checkpoint["state_dict"][name][0, 0] = float("nan")
    target = run / "checkpoints" / "step-000004.ckpt"
    with pytest.raises(TrainingDiverged, match=rf"^refusing to write {re.escape(repr(str(target)))}: the student's "
                                               rf"weights are not finite \({re.escape(repr(name))}"):
        AtomicCheckpointIO().save_checkpoint(checkpoint, target)
    assert {p.name: digest(p) for p in [*(run / "checkpoints").iterdir(), run / "metrics.json"]} == kept

    # a checkpoint with a NaN weight (as an unguarded run wrote them) is refused by both readers
    poisoned = tmp_path / "nan.ckpt"
    torch.save(checkpoint, poisoned)
    refusal = (f"error: checkpoint {str(poisoned)!r} holds non-finite weights ({name.removeprefix('student.')!r} has "
               f"NaN or inf): the run that wrote it diverged; use an earlier checkpoint of that run")
    exported = console("fraqat-export", [f"ckpt={poisoned}"], tmp_path, toy_cache)
    assert exported.returncode == 2 and errors(exported) == [f"fraqat-export: {refusal}"]
    assert not (tmp_path / "export").exists()
    evaluated = console("fraqat-eval", [f"ckpt={poisoned}", "prompts=offline", "prompts.count=2", "batch_size=2",
                                        "clip.model=null", "logger=none", f"out_dir={tmp_path}/eval",
                                        f"results_csv={tmp_path}/results.csv"], tmp_path, toy_cache)
    assert evaluated.returncode == 2 and errors(evaluated) == [f"fraqat-eval: {refusal}"]
    assert not (tmp_path / "results.csv").exists()


# --- a full disk and a read-only folder ---------------------------------------------------------------------

def mounted(options: str, folder: Path, keep: Path) -> list[str] | None:
    """A command prefix that runs a command with a fresh tmpfs (`options`: `size=16m`, `ro`) on `folder`, in a
    user and mount namespace of its own, then copies what it left there to `keep` (the mount goes with the
    namespace); None where the kernel refuses unprivileged namespaces or mounts."""
    if shutil.which("unshare") is None:
        return None
    namespace = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c"]
    probe = subprocess.run([*namespace, f'mount -t tmpfs -o {options} tmpfs "$0"', str(keep)], capture_output=True)
    if probe.returncode != 0:
        return None
    script = f'keep="$1"; shift; mount -t tmpfs -o {options} tmpfs "$0" || exit 99; "$@"; rc=$?; cp -a "$0/." "$keep/"'
    return [*namespace, script + "; exit $rc", str(folder), str(keep)]


FAKE_DISK = """
import errno, os, shutil, sys, tempfile, torch
folder, limit = os.environ["FAKE_DISK_FOLDER"], int(os.environ["FAKE_DISK_BYTES"])
used = lambda: sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)
if limit < 0:  # read-only: no file can be made there
    make = tempfile.mkstemp
    def mkstemp(*a, dir=None, **k):
        if str(dir).startswith(folder):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return make(*a, dir=dir, **k)
    tempfile.mkstemp = mkstemp
else:  # full: a write past `limit` bytes fails as torch.save fails on a full disk, leaving what it wrote
    save, usage = torch.save, shutil.disk_usage
    def full_save(obj, f, *a, **k):
        save(obj, f, *a, **k)
        if str(f).startswith(folder) and used() > limit:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")
    def disk_usage(path):
        real = usage(path)
        return real._replace(free=max(limit - used(), 0)) if str(path).startswith(folder) else real
    torch.save, shutil.disk_usage = full_save, disk_usage
from fraqat_cli.train.command import main
sys.argv[0] = "fraqat-train"
main()
"""


def faulty_disk_run(folder: Path, options: str, args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    """`fraqat-train ARGS` with `folder` on a small (`size=16m`) or read-only (`ro`) file system; what the run
    left there is in `folder` afterwards."""
    keep = folder.with_name(folder.name + "-left")
    folder.mkdir(parents=True)
    keep.mkdir()
    env = cli_env(cache)
    prefix = mounted(options, folder, keep)
    if prefix is not None:
        command = [*prefix, *train_command(), *args]
    else:  # no namespaces here: the same script's main, with its writer wrapped
        print("no unprivileged mount namespace: simulating the disk by wrapping the writer")
        limit = -1 if options == "ro" else int(options.removeprefix("size=").removesuffix("m")) << 20
        env.update(FAKE_DISK_FOLDER=str(folder), FAKE_DISK_BYTES=str(limit))
        command = [sys.executable, "-c", FAKE_DISK, *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if prefix is not None:
        folder.rmdir()  # the empty mount point
        keep.rename(folder)
    else:
        keep.rmdir()
    return result


def test_a_full_disk_warns_before_training_and_names_the_last_good_checkpoint(toy_cache, tmp_path):
    run = tmp_path / "run"
    result = faulty_disk_run(run / "checkpoints", "size=16m", [*TOY, f"hydra.run.dir={run}"], tmp_path, toy_cache)

    assert result.returncode == 2, result.stderr[-3000:]
    folder = run / "checkpoints"
    (warning,) = warnings_of(result)
    assert warning.startswith(f"warning: checkpoints folder {str(folder)!r} has 1")  # 15-16 MiB of 16 free
    assert warning.endswith("MiB free, but this run's checkpoints need up to 41.0 MiB more (last.ckpt 13.0 MiB "
                            "written beside the previous one, 3 step checkpoint(s) of 5.0 MiB); the run will stop "
                            "when the disk fills: free space, or lower checkpoint.keep")
    (line,) = errors(result)
    assert line.startswith(f"fraqat-train: error: cannot write {str(folder / LAST)!r}: no space left on the device "
                           f"(it needs 13.0 MiB, 1")  # about 11 MiB free once the partial file is gone
    assert line.endswith(f"MiB free); the last good checkpoint is {str(folder / 'step-000002.ckpt')!r} "
                         f"(step 2, the student alone)")
    assert sorted(p.name for p in folder.iterdir()) == ["step-000002.ckpt"]  # no partial file left behind
    assert load_checkpoint(folder / "step-000002.ckpt")["global_step"] == 2


def test_a_read_only_folder_fails_before_training_in_one_line(toy_cache, tmp_path):
    run = tmp_path / "run"
    result = faulty_disk_run(run / "checkpoints", "ro", [*TOY, f"hydra.run.dir={run}"], tmp_path, toy_cache)

    assert result.returncode == 2, result.stderr[-3000:]
    assert errors(result) == [f"fraqat-train: error: cannot write in folder {str(run / 'checkpoints')!r}: the file "
                              f"system is read-only; nothing was trained: make it writable or choose another "
                              f"hydra.run.dir"]
    assert "student:" not in result.stdout  # refused before any model was built
    assert list((run / "checkpoints").iterdir()) == []

    # the run folder itself, where Hydra writes before any of our code runs
    other = tmp_path / "other"
    result = faulty_disk_run(other, "ro", [*TOY, f"hydra.run.dir={other}"], tmp_path, toy_cache)
    assert result.returncode == 2
    assert errors(result) == [f"fraqat-train: error: cannot write in folder {str(other)!r}: the file system is "
                              f"read-only; choose another hydra.run.dir"]
    assert list(other.iterdir()) == []


# --- text files -------------------------------------------------------------------------------------------------

def test_a_prompt_file_that_is_not_utf8_is_named_with_its_line(toy_cache, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a small red circle at the top left on a blue background\n"
                        + b"a large green star in the centre on a \xffwhite background\n")
    cache = tmp_path / "cache"
    result = fraqat_train([*TOY, f"data.prompt_file={prompts}", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path,
                          cache_dir=cache)
    assert result.returncode == 2
    assert errors(result) == [f"fraqat-train: error: prompt file {str(prompts)!r}, line 2, column 39: byte 0xff is "
                              f"not UTF-8 text; save the file as UTF-8"]
    assert not cache.exists() and list((tmp_path / "run" / "checkpoints").iterdir()) == []


def test_blank_lines_are_counted_and_long_prompts_are_counted_as_truncated(tmp_path, capsys):
    from fraqat_cli.data.captions import read_prompt_file
    from fraqat_cli.data.conditioning import warn_long_prompts
    from fraqat_cli.models.toy import minilm_tokenizer

    path = tmp_path / "prompts.txt"
    long = "a large green star in the centre and " * 6 + "on a red background"
    path.write_text("\ufeffa red circle\n\n   \na blue star\n" + long + "\n", encoding="utf-8")
    assert read_prompt_file(path) == ["a red circle", "a blue star", long]
    assert read_prompt_file(path) == ["a red circle", "a blue star", long]  # said once per file as it is
    assert capsys.readouterr().err == f"warning: prompt file {str(path)!r}: 2 blank line(s) skipped, 3 prompts read\n"

    class Pipe:
        components = {"tokenizer": minilm_tokenizer(), "text_encoder": None}

    assert warn_long_prompts(Pipe, read_prompt_file(path), max_sequence_length=32) == 1
    assert capsys.readouterr().err == (
        "warning: 1 of 3 prompts are longer than the text encoder takes (tokens: 32 for tokenizer) and are "
        "truncated to it, e.g. 'a large green star in the centre and a large green star in t...'\n")


@pytest.mark.parametrize(("setting", "message"), [
    ("divergence.factor=0.5", "divergence.factor must be a number > 1 or null (off); got 0.5"),
    ("divergence.window=0", "divergence.window must be a positive integer; got 0"),
])
def test_bad_divergence_settings_are_refused_with_what_is_allowed(setting, message):
    from hydra import compose, initialize_config_module

    from fraqat_cli.train.command import check_numbers

    with initialize_config_module(config_module="fraqat_cli.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[setting])
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        check_numbers(cfg)


def test_the_loss_watch_stops_at_a_spike_over_its_running_median():
    from fraqat_cli.train.divergence import LossWatch

    watch = LossWatch(factor=10, window=3)
    assert [watch.check(step, loss) for step, loss in enumerate([1.0, 0.5, 2.0, 9.0, 0.1])] == [None] * 5
    assert watch.check(5, 21.0) == "the loss 21 is over 10 x its running median 2"  # median of 2, 9, 0.1
    assert watch.check(6, float("inf")) == "the loss is inf"
    assert watch.last_finite == (4, 0.1)
    assert LossWatch().check(0, 1e30) is None  # without a factor only non-finite losses stop a run
