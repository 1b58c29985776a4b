"""Results belong to what was evaluated, and a cache touches only itself, each through the real console scripts:
a student retrained in place, a rerun eval, two evals finishing together, a damaged feature file, and a cache
index that names files outside its entry."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_support import console, fraqat_train

from fraqat_cli.cache import sharded_tensors, store_problems
from fraqat_cli.evaluate.command import update_csv

# The toy default, made short (as tests/test_faults.py runs it), and an eval of four images against the teacher's.
TOY = ["trainer.max_steps=4", "data.num_prompts=8", "data.batch_size=4", "logger=csv",
       "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=2"]
EVAL = ["prompts=offline", "prompts.count=4", "batch_size=4", "clip.model=null", "logger=none"]


def warnings_of(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("warning: ")]


def fraqat_eval(ckpt: Path, work: Path, cache: Path, name: str) -> dict:
    """`fraqat-eval ckpt=CKPT` into `work/<name>`, with `work/results.csv`; its one result (results.json)."""
    result = console("fraqat-eval", [f"ckpt={ckpt}", *EVAL, f"results_csv={work}/results.csv",
                                     f"hydra.run.dir={work}/{name}"], work, cache)
    assert result.returncode == 0, result.stderr[-3000:]
    newest = max(ckpt.glob("eval/*/results.json"), key=lambda p: p.stat().st_mtime_ns)  # written by this eval
    return {**json.loads(newest.read_text()), "warnings": warnings_of(result)}


def csv_rows(work: Path) -> list[dict]:
    with open(work / "results.csv") as f:
        return list(csv.DictReader(f))


def pixels(folder: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(Path(folder).glob("*.png"))]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> tuple[Path, Path]:
    """A finished toy run (4 steps) and the cache it filled, which evals share (the teacher's images are drawn
    once); `work/training-cache` keeps the cache as training left it: its two stores only."""
    work = tmp_path_factory.mktemp("trained")
    result = fraqat_train([*TOY, f"hydra.run.dir={work}/run"], cwd=work, cache_dir=work / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    shutil.copytree(work / "cache", work / "training-cache")
    return work / "run", work / "cache"


@pytest.fixture
def run_copy(toy, tmp_path) -> tuple[Path, Path]:
    """A copy of the toy run, and the shared cache (the teacher's images are drawn once for every test)."""
    run, cache = toy
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run", cache


@pytest.mark.slow
def test_a_student_retrained_in_place_is_evaluated_anew(run_copy, tmp_path):
    run, cache = run_copy
    old = fraqat_eval(run, tmp_path, cache, "first")

    retrained = fraqat_train([*TOY, "resume=null", "optim.lr=3e-3", f"hydra.run.dir={run}"], cwd=tmp_path,
                             cache_dir=cache)  # same folder, same step, another student
    assert retrained.returncode == 0, retrained.stderr[-3000:]
    new = fraqat_eval(run, tmp_path, cache, "second")

    assert new["images_dir"] != old["images_dir"]
    assert not any(np.array_equal(a, b) for a, b in zip(pixels(new["images_dir"]), pixels(old["images_dir"])))
    assert new["fid"] != old["fid"] and new["digest"] != old["digest"]
    # what a never-evaluated copy of the retrained run gets: the same student, so the same images and FID
    shutil.copytree(run / "checkpoints", tmp_path / "fresh" / "checkpoints")
    fresh = fraqat_eval(tmp_path / "fresh", tmp_path, cache, "third")
    assert fresh["digest"] == new["digest"] and fresh["fid"] == new["fid"]
    assert all(np.array_equal(a, b) for a, b in zip(pixels(fresh["images_dir"]), pixels(new["images_dir"])))
    # one row per student and file: the retrained student did not replace the old one's row
    assert sorted((r["checkpoint"], r["digest"]) for r in csv_rows(tmp_path)) == sorted(
        [(old["checkpoint"], old["digest"]), (new["checkpoint"], new["digest"]),
         (fresh["checkpoint"], fresh["digest"])])


@pytest.mark.slow
def test_rerunning_an_eval_replaces_its_row_and_a_damaged_feature_file_is_recomputed(run_copy, tmp_path):
    run, cache = run_copy
    first = fraqat_eval(run, tmp_path, cache, "first")
    (features,) = Path(first["images_dir"]).glob("features-*.npy")
    features.write_bytes(features.read_bytes()[:60])  # what a full disk or a partial copy leaves: a cut header

    again = fraqat_eval(run, tmp_path, cache, "again")

    (warning,) = [w for w in again["warnings"] if "cache entry" in w]
    assert warning.startswith(f"warning: cache entry {str(features)!r}: it cannot be read (EOF: reading array header")
    assert warning.endswith("; recomputing it")
    assert again["fid"] == first["fid"] and np.load(features, allow_pickle=False).shape[0] == 4
    (row,) = csv_rows(tmp_path)  # replaced, not appended
    assert float(row["fid"]) == again["fid"] and row["images_dir"] == first["images_dir"]
    assert (row["digest"], row["protocol"]) == (first["digest"], first["protocol"]) != ("", "")


def test_a_result_replaces_the_row_of_the_same_model_measured_the_same_way(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("label,checkpoint,fid\r\nrun,runs/run/checkpoints/last.ckpt,9.0\r\n")  # from before the key
    student = {"label": "run", "checkpoint": "runs/run/checkpoints/last.ckpt", "digest": "d1", "protocol": "p1"}
    update_csv(path, [{**student, "fid": 1.0}])
    update_csv(path, [{**student, "fid": 2.0}])  # the same eval again
    update_csv(path, [{**student, "protocol": "p2", "fid": 3.0}])  # other prompts or seed
    update_csv(path, [{**student, "digest": "d2", "fid": 4.0}])  # retrained in place
    update_csv(path, [{"label": "toy-teacher", "checkpoint": None, "digest": "t", "protocol": "p1", "fid": 0.0}] * 2)
    rows = [(r["digest"], r["protocol"], r["fid"]) for r in csv.DictReader(path.open())]
    assert rows == [("", "", "9.0"), ("d1", "p1", "2.0"), ("d1", "p2", "3.0"), ("d2", "p1", "4.0"), ("t", "p1", "0.0")]


UPDATE = """
import sys
from pathlib import Path
from fraqat_cli.evaluate.command import update_csv

for i in range(int(sys.argv[3])):
    update_csv(Path(sys.argv[1]), [{"label": f"{sys.argv[2]}-{i}", "digest": sys.argv[2], "protocol": "p", "fid": i}])
"""


def test_evals_finishing_together_keep_every_row(tmp_path):
    path, writers, rows = tmp_path / "evals" / "results.csv", 6, 15
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", UPDATE, str(path), f"w{w}", str(rows)], env=env, text=True,
                              stderr=subprocess.PIPE) for w in range(writers)]
    assert [p.communicate(timeout=300)[1] for p in procs] == [""] * writers
    labels = [r["label"] for r in csv.DictReader(path.open())]
    assert sorted(labels) == sorted(f"w{w}-{i}" for w in range(writers) for i in range(rows))
    assert not list(path.parent.glob(".*.tmp"))


# --- a cache index is data: it names files of its own entry only --------------------------------------------


@pytest.mark.slow
def test_an_index_naming_files_outside_its_entry_is_recomputed_and_deletes_nothing(toy, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(toy[1].with_name("training-cache"), cache)
    victims = {"absolute": tmp_path / "victim-absolute.txt", "relative": tmp_path / "victim-relative.txt"}
    for path in victims.values():
        path.write_text("not the cache's")
    crafted = {}  # index file -> the name written into it
    for name, index_file in zip([str(victims["absolute"]), "../../victim-relative.txt"],
                                sorted(cache.glob("*-*/index.json"))):
        index = json.loads(index_file.read_text())
        index["shards"][0]["file"] = name
        index_file.write_text(json.dumps(index))
        crafted[index_file] = name
    assert len(crafted) == len(list(cache.glob("*-*/index.json"))) == 2, "training's text conditioning and latents"

    result = fraqat_train([*TOY, "trainer.max_steps=2", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path, cache_dir=cache)

    assert result.returncode == 0, result.stderr[-3000:]
    assert all(path.read_text() == "not the cache's" for path in victims.values())
    assert sorted(w for w in warnings_of(result) if w.startswith("warning: cache entry")) == sorted(
        f"warning: cache entry {str(index)!r}: it names {name!r}, which is not a file inside its folder; only the "
        f"entry's own files are read or removed; recomputing it" for index, name in crafted.items())
    for index in crafted:
        assert store_problems(index.parent, index.parent.name.rsplit("-", 1)[1]) == []  # whole again


def test_a_symlink_out_of_an_entry_is_neither_read_nor_removed(tmp_path, capsys):
    rows = lambda a, b: {"x": torch.arange(a, b, dtype=torch.float32)[:, None]}  # noqa: E731
    store = sharded_tensors(tmp_path / "cache", "rows", {"n": 4}, 4, 2, rows)
    outside = tmp_path / "outside.safetensors"
    shard = store.folder / store.files[0]
    shutil.copy(shard, outside)  # a whole file of this very entry, but not in its folder
    shard.unlink()
    shard.symlink_to(outside)
    key = store.folder.name.rsplit("-", 1)[1]
    assert store_problems(store.folder, key) == [(store.folder / "index.json", f"it names {store.files[0]!r}, "
                                                  "which is not a file inside its folder; only the entry's own "
                                                  "files are read or removed")]
    capsys.readouterr()

    again = sharded_tensors(tmp_path / "cache", "rows", {"n": 4}, 4, 2, rows)

    assert outside.is_file() and not shard.is_symlink()  # the link was replaced, its target left alone
    assert torch.equal(again.load()["x"], rows(0, 4)["x"])
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")] == [
        f"warning: cache entry {str(store.folder / 'index.json')!r}: it names {store.files[0]!r}, which is not a "
        f"file inside its folder; only the entry's own files are read or removed; recomputing it",
        f"warning: cache entry {str(shard)!r}: it leads outside its folder; recomputing it"]
