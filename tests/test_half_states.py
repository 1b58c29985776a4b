"""Half-states and bad input through the real console scripts: an export killed as its file lands never leaves
a report of another file beside it, and a folder that loops, a prompt set too small to hold rows out, and an
image passed as a checkpoint are each one line with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from train_support import FAST, cli_env, console, fraqat_train, train_command

KILLED_AS_IT_LANDS = """
import os, signal, sys
target, replace = os.environ["KILL_AFTER_LANDING"], os.replace
def landing(source, destination, *args, **kwargs):
    replace(source, destination, *args, **kwargs)
    if os.path.abspath(destination) == target:
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = landing
from fraqat_cli.export.command import main
sys.argv[0] = "fraqat-export"
main()
"""


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("fraqat-") and ": error: " in line]


@pytest.mark.slow
def test_an_export_killed_as_its_file_lands_leaves_no_report_of_another_file(tmp_path, cache_dir):
    trained = fraqat_train([*FAST, f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path, cache_dir=cache_dir)
    assert trained.returncode == 0, trained.stderr[-3000:]
    checkpoints, out = tmp_path / "run" / "checkpoints", tmp_path / "export" / "student.safetensors"
    report = out.with_name(out.name + ".json")
    last = checkpoints / "last.ckpt"
    first = console("fraqat-export", [f"ckpt={last}", f"out={out}", "dtype=float16"], tmp_path, cache_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads(report.read_text())["plain_dtype"] == "float16"

    env = dict(cli_env(cache_dir), KILL_AFTER_LANDING=str(out))
    killed = subprocess.run([sys.executable, "-c", KILLED_AS_IT_LANDS, f"ckpt={last}", f"out={out}", "dtype=bfloat16"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert out.is_file() and not report.exists(), "the float16 file's report must not stand beside the bf16 file"

    again = console("fraqat-export", [f"ckpt={last}", f"out={out}", "dtype=bfloat16"], tmp_path, cache_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(report.read_text())["plain_dtype"] == "bfloat16"
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name, report.name]  # no .partial folder left


@pytest.mark.slow
def test_looping_folders_too_few_prompts_and_an_image_as_checkpoint_are_one_line_each(tmp_path, cache_dir):
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(run / "checkpoints", run / "checkpoints")
    image = tmp_path / "student.png"
    Image.new("RGB", (8, 8)).save(image)
    looping = f"{str(loop)!r} is a symbolic link that loops back on itself"
    image_refused = (f": error: checkpoint {str(image)!r} cannot be read as a fraqat checkpoint: it is not a torch "
                     f"checkpoint file (a PNG image); give a .ckpt written by fraqat-train")
    cases = {  # command -> the one line it must print
        (*train_command(), *FAST, f"hydra.run.dir={loop}"):
            f"fraqat-train: error: cannot write in folder {str(loop)!r}: {looping}; choose another hydra.run.dir",
        (*train_command(), *FAST, f"hydra.run.dir={run}"):
            f"fraqat-train: error: cannot write in folder {str(run / 'checkpoints')!r}: "
            f"{str(run / 'checkpoints')!r} is a symbolic link that loops back on itself; nothing was trained: make "
            f"it writable or choose another hydra.run.dir",
        (*train_command(), *FAST, f"cache_dir={loop}", f"hydra.run.dir={tmp_path}/other"):
            f"fraqat-train: error: cache_dir={str(loop)!r} cannot be a folder: {looping}; choose another cache_dir",
        (*train_command(), *FAST, "data.num_prompts=1", f"hydra.run.dir={tmp_path}/one"):
            "fraqat-train: error: data gives 1 prompt(s): too few to hold out validation.share=0.025 of them for "
            "the validation loss; allowed: 2 prompts or more (data.num_prompts), or validation.share=0",
        (str(Path(sys.executable).parent / "fraqat-export"), f"ckpt={image}"): "fraqat-export" + image_refused,
        (str(Path(sys.executable).parent / "fraqat-eval"), f"ckpt={image}", "prompts=offline", "prompts.count=2",
         "batch_size=2", "clip.model=null", "logger=none", f"out_dir={tmp_path}/eval",
         f"results_csv={tmp_path}/results.csv"): "fraqat-eval" + image_refused,
    }
    running = {command: subprocess.Popen(command, cwd=tmp_path, env=cli_env(cache_dir), text=True,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE) for command in cases}
    for command, process in running.items():
        stdout, stderr = process.communicate(timeout=600)
        result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
        assert (result.returncode, error_lines(result)) == (2, [cases[command]]), stderr[-3000:]
        assert "Traceback" not in stderr
    assert not (tmp_path / "results.csv").exists() and not (tmp_path / "one" / "checkpoints" / "last.ckpt").exists()
