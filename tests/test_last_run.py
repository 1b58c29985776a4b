"""Run folders a user can tell apart (`runs/<run_name>_<date>_<time>/`), and `runs/last`, the newest, that
fraqat-eval and fraqat-export take as `ckpt=runs/last`."""

from __future__ import annotations

import pytest
from train_support import console, fraqat_train

from fraqat_cli.train.last_run import point_last_run

TOY = ["model=toy", "trainer.max_steps=2", "data.num_prompts=8", "data.batch_size=4", "logger=none",
       "trainer.enable_progress_bar=false"]


def test_the_link_follows_the_newest_run_and_is_relative(tmp_path):
    first, second = tmp_path / "runs" / "a_1", tmp_path / "runs" / "a_2"
    first.mkdir(parents=True), second.mkdir()
    link = tmp_path / "runs" / "last"
    point_last_run(link, first)
    point_last_run(link, second)
    assert link.resolve() == second.resolve() and not str(link.readlink()).startswith("/")
    assert [p.name for p in (tmp_path / "runs").iterdir() if p.name.startswith(".")] == []  # no staged link left
    point_last_run(link, link)  # hydra.run.dir=runs/last: resuming the last run keeps the link
    assert link.resolve() == second.resolve()


def test_a_real_folder_where_the_link_goes_is_left_alone(tmp_path, capsys):
    (tmp_path / "last").mkdir()
    point_last_run(tmp_path / "last", tmp_path / "run")
    assert (tmp_path / "last").is_dir() and not (tmp_path / "last").is_symlink()
    assert "last_run_link=" in capsys.readouterr().err


@pytest.mark.slow
def test_two_runs_get_two_folders_and_runs_last_names_the_newest(tmp_path, cache_dir):
    for _ in range(2):
        result = fraqat_train(TOY, cwd=tmp_path, cache_dir=cache_dir)
        assert result.returncode == 0, result.stderr[-3000:]
    folders = sorted(p for p in (tmp_path / "runs").iterdir() if not p.is_symlink())
    assert len(folders) == 2 and all(p.name.startswith("toy-fractional-per_tensor_") for p in folders), folders
    assert (tmp_path / "runs" / "last").resolve() == folders[-1].resolve()
    exported = console("fraqat-export", ["ckpt=runs/last"], cwd=tmp_path, cache_dir=cache_dir)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert (folders[-1] / "export" / "student.safetensors").is_file()
