"""What a user reads and looks at: labelled progress in a redirected log, the closing tables and paths, and the
pictures (training.png, the side-by-side grid, comparison.md/png)."""

from __future__ import annotations

import io
import json
import re
import time

import pytest
from PIL import Image
from train_support import FAST, console, fraqat_train

from fraqat_cli.evaluate.comparison import bar_chart, comparison_table
from fraqat_cli.evaluate.pair_grid import CAPTION_LINES, GAP, INNER, LABEL_HEIGHT, LINE_HEIGHT, TILE, pair_grid
from fraqat_cli.progress import Progress
from fraqat_cli.train.curve import draw_training_curve
from fraqat_cli.train.run_summary import summary_table

CELL_HEIGHT = LABEL_HEIGHT + TILE + CAPTION_LINES * LINE_HEIGHT + 4


def grid_size(pairs: int, columns: int = 2) -> tuple[int, int]:
    per_row, rows = min(4, pairs), -(-pairs // 4)
    cell = columns * TILE + (columns - 1) * INNER
    return per_row * cell + (per_row - 1) * GAP, rows * CELL_HEIGHT + (rows - 1) * GAP


def test_a_redirected_stage_writes_a_few_whole_labelled_lines():
    stream = io.StringIO()  # not a terminal: whole lines, never carriage-return bars
    with Progress("teacher latents", 1000, unit="rows", stream=stream, min_gap_s=0, hold_start_s=0) as progress:
        for _ in range(1000):
            progress.update(1, loss=0.5)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert all(line.startswith("[teacher latents] ") for line in lines)
    assert lines[0] == "[teacher latents] 0/1000 rows"
    assert [line.split()[2] for line in lines[1:-1]] == ["250/1000", "500/1000", "750/1000"]
    assert "ETA" in lines[1] and "loss 0.5" in lines[1]
    assert re.fullmatch(r"\[teacher latents\] 1000/1000 rows in 0:0\d, loss 0.5", lines[-1])


def test_a_short_stage_is_its_last_line_and_a_longer_one_says_when_it_started():
    stream = io.StringIO()
    with Progress("features", 64, unit="images", stream=stream) as progress:
        for _ in range(8):
            progress.update(8)
    assert [line.split()[1] for line in stream.getvalue().splitlines()] == ["64/64"]
    longer = io.StringIO()
    with Progress("features", 64, unit="images", stream=longer, hold_start_s=0.05) as progress:
        time.sleep(0.5)  # no update: the start line comes from the hold's timer
        progress.update(64)
    assert [line.split()[1] for line in longer.getvalue().splitlines()] == ["0/64", "64/64"]


def test_a_stage_an_error_stops_says_where_it_stopped():
    stream = io.StringIO()
    with pytest.raises(KeyboardInterrupt), Progress("teacher latents", 64, unit="rows", stream=stream) as progress:
        progress.update(16)
        raise KeyboardInterrupt
    assert stream.getvalue().splitlines()[-1].startswith("[teacher latents] stopped at 16/64 rows in 0:0")


def test_a_resumed_stage_starts_from_what_is_done_and_a_disabled_one_is_silent():
    stream = io.StringIO()
    with Progress("encoding prompts", 8, unit="rows", initial=6, stream=stream, hold_start_s=0) as progress:
        progress.update(2)
    assert stream.getvalue().splitlines()[0] == "[encoding prompts] 6/8 rows (resumed)"
    short = io.StringIO()
    with Progress("encoding prompts", 8, unit="rows", initial=6, stream=short) as progress:
        progress.update(2)
    assert re.fullmatch(r"\[encoding prompts\] 8/8 rows in 0:00, resumed at 6\n", short.getvalue())
    silent = io.StringIO()
    with Progress("features", 8, stream=silent, enabled=False) as progress:
        progress.update(8)
    assert silent.getvalue() == ""


def test_the_grid_puts_teacher_and_student_side_by_side_enlarged_without_blur():
    teacher = [Image.new("RGB", (32, 32), (200, 0, 0)) for _ in range(6)]
    student = [Image.new("RGB", (32, 32), (0, 0, 200)) for _ in range(6)]
    student[0].putpixel((0, 0), (0, 255, 0))
    grid = pair_grid([("teacher", teacher), ("student", student)], [f"prompt {i}" for i in range(6)])
    assert grid.size == grid_size(6)
    left, top = 0, LABEL_HEIGHT
    assert grid.getpixel((left + 5, top + 5)) == (200, 0, 0)  # teacher on the left
    assert grid.getpixel((left + TILE + INNER + TILE // 2, top + TILE // 2)) == (0, 0, 200)  # its student beside
    block = TILE // 32  # one source pixel: a block of nearest-neighbour copies, not a blur
    assert {grid.getpixel((TILE + INNER + x, top + y)) for x in range(block) for y in range(block)} == {(0, 255, 0)}
    caption = grid.crop((0, top + TILE + 1, TILE, top + TILE + LINE_HEIGHT))
    assert min(caption.convert("L").getdata()) < 128, "the prompt is written under the pair"


def test_the_grid_refuses_a_column_with_too_few_images():
    with pytest.raises(ValueError, match="every column needs 2 images; got teacher 2, student 1"):
        pair_grid([("teacher", [Image.new("RGB", (8, 8))] * 2), ("student", [Image.new("RGB", (8, 8))])], ["a", "b"])


def result(label, schedule, fid, train_seed=None, n=64):
    return {"label": label, "model": "toy", "schedule": schedule, "granularity": schedule and "per_tensor",
            "weight_bits": schedule and 4.0, "fid": fid, "kid": 0.0, "num_images": n, "seed": 1234,
            "reference": "teacher", "train_seed": train_seed}


def test_the_comparison_has_the_teacher_row_n_seeds_and_the_instability_note():
    table = comparison_table([result("toy-teacher", None, 0.0), result("run", "fractional", 25.5)])
    assert "| toy-teacher | teacher | - | fp | 0.000 |" in table
    assert "n = 64 images per model" in table and "seed 1234 + i" in table
    assert "FID from 64 images is unstable: below 2048 images" in table
    assert "unstable" not in comparison_table([result("run", "fractional", 25.5, n=2048)])


def test_the_chart_of_several_training_seeds_draws_an_interval(tmp_path):
    runs = [result(f"s{seed}", "fractional", fid, seed) for seed, fid in ((1, 20.0), (2, 24.0), (3, 22.0))]
    table = comparison_table([result("toy-teacher", None, 0.0), *runs])
    assert "Training seeds: fractional per_tensor: 3" in table
    bar_chart([result("toy-teacher", None, 0.0), *runs], tmp_path / "chart.png")
    width, height = Image.open(tmp_path / "chart.png").size
    assert (width, height) == (480, 456)  # 4 x 3.8 in at 120 dpi: two bars (teacher, the seeds' mean)


def test_the_training_curve_is_drawn_from_its_points(tmp_path):
    points = [(s, 1.0 / s, 8.0 if s < 5 else 4.0) for s in range(1, 11)]
    draw_training_curve(points, [[5, 0.2], [10, 0.1]], tmp_path / "training.png")
    assert Image.open(tmp_path / "training.png").size == (700, 450)


def test_the_summary_names_the_numbers_and_where_files_went(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    table = summary_table({"steps": 50, "final_loss": 0.005, "validation_loss": 0.0044, "validation_rows": 2,
                           "final_bits": 4.0, "seconds": 25.0, "seconds_per_batch": 0.075,
                           "checkpoint": "run/checkpoints/last.ckpt"}, tmp_path)
    lines = table.splitlines()
    assert lines[0] == "fraqat-train: done"
    assert re.search(r"steps +50$", table, re.M) and re.search(r"weight bits +4\.00$", table, re.M)
    assert "validation loss  0.0044 (2 held-out rows)" in table and "25.0 s (0.075 s a batch)" in table
    assert f"metrics          {tmp_path / 'metrics.json'}" in table and "training curve" not in table


@pytest.mark.slow
def test_a_redirected_train_and_eval_log_each_stage_and_end_with_tables_and_paths(tmp_path):
    """`make train` as a SLURM job would run it: output to files, an empty cache (every stage runs)."""
    cache, run = tmp_path / "cache", tmp_path / "run"
    args = [a for a in FAST if a != "trainer.enable_progress_bar=false"]
    trained = fraqat_train([*args, "data.num_prompts=12", f"hydra.run.dir={run}"], cwd=tmp_path, cache_dir=cache)
    assert trained.returncode == 0, trained.stderr[-3000:]
    for stage in ("[encoding prompts (tiny_sana, cpu)] 12/12 rows in", "[teacher latents] 12/12 rows in",
                  "[training] 4/4 steps in"):
        assert stage in trained.stderr, trained.stderr[-2000:]
    assert re.search(r"\[training\] 4/4 steps in \d+:\d\d, loss [0-9.e-]+, bits 4", trained.stderr)
    assert "\r" not in trained.stderr
    assert "fraqat-train: done" in trained.stdout and str(run / "checkpoints" / "last.ckpt") in trained.stdout
    assert str(run / "training.png") in trained.stdout and "{" not in trained.stdout  # no JSON without print_json
    assert Image.open(run / "training.png").size == (700, 450)
    assert json.loads((run / "metrics.json").read_text())["steps"] == 4

    out = tmp_path / "eval"
    evaluated = console("fraqat-eval", [f"ckpt=[{run},teacher]", "model=tiny_sana", "prompts.count=6",
                                        "batch_size=3", "clip.model=null", "logger=none",
                                        f"results_csv={tmp_path}/results.csv", f"hydra.run.dir={out}"],
                        cwd=tmp_path, cache_dir=cache)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    for stage in ("[generating teacher images] 6/6 images in", "[generating run images] 6/6 images in",
                  "[Inception features of run images] 6/6 images", "[Inception features of ground-truth scenes]"):
        assert stage in evaluated.stderr, evaluated.stderr[-2000:]
    assert "%|" not in evaluated.stderr, "no unlabelled bars"
    student = json.loads(next(run.glob("eval/*/results.json")).read_text())
    assert student["results_json"] in evaluated.stdout and student["grid"] in evaluated.stdout
    assert f"comparison: {out / 'comparison.md'}" in evaluated.stdout
    assert Image.open(student["grid"]).size == grid_size(6)
    comparison = (out / "comparison.md").read_text()
    assert "| tiny_sana-teacher | teacher |" in comparison and "| run | fractional |" in comparison
    assert "n = 6 images per model" in comparison and "FID from 6 images is unstable" in comparison
    assert Image.open(out / "comparison.png").size[0] >= 480
