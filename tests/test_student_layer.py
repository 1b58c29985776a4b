"""The stored student is a layer of its own: `fraqat-eval` and `fraqat-export` read, rebuild, evaluate and export a
student without importing Lightning, which only training needs (and eval's logger, when one is configured: the
loggers are Lightning's)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from train_support import cli_env

from fraqat_cli.models.loading import load_pipeline
from fraqat_cli.student.build import build_student
from fraqat_cli.student.checkpoint import StudentCheckpoint

# Run a console script's `main` in this interpreter and say, as the process exits (Hydra's main exits through
# sys.exit), whether any Lightning module was ever imported.
REPORTING_MAIN = """
import atexit, sys
atexit.register(lambda: print("lightning imported:", sorted(m for m in sys.modules
                                                          if m.split(".")[0] in ("lightning", "pytorch_lightning"))))
from {module} import main
sys.argv = {argv!r}
main()
"""


@pytest.fixture(scope="module")
def student_file(tmp_path_factory) -> Path:
    """A tiny Sana student checkpoint written in-process (never trained: the layers only need its structure)."""
    with initialize_config_module(config_module="fraqat_cli.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=tiny_sana", "quantizer=per_channel"])
    teacher = load_pipeline(cfg.model, without=("tokenizer", "text_encoder")).transformer
    student, _ = build_student(teacher, cfg.quantizer, cfg.selection, start_bits=4)
    path = tmp_path_factory.mktemp("student") / "run" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    return StudentCheckpoint.of_student(student, OmegaConf.to_container(cfg, resolve=True), step=1).write(path)


def run_main(module: str, argv: list[str], cwd: Path, cache_dir: Path) -> subprocess.CompletedProcess:
    code = REPORTING_MAIN.format(module=module, argv=argv)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=cli_env(cache_dir), capture_output=True,
                          text=True, timeout=600)


def test_export_reads_and_exports_a_student_without_lightning(student_file, tmp_path, cache_dir):
    result = run_main("fraqat_cli.export.command", ["fraqat-export", f"ckpt={student_file}",
                                                    f"out={tmp_path}/student.safetensors"], tmp_path, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "student.safetensors").is_file()
    assert "lightning imported: []" in result.stdout, result.stdout[-2000:]


@pytest.mark.slow
def test_eval_rebuilds_and_evaluates_a_student_without_lightning(student_file, tmp_path, cache_dir):
    argv = ["fraqat-eval", f"ckpt={student_file}", "prompts.count=4", "batch_size=4", "clip.model=null",
            "logger=none", f"hydra.run.dir={tmp_path}/out", f"results_csv={tmp_path}/results.csv"]
    result = run_main("fraqat_cli.evaluate.command", argv, tmp_path, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lightning imported: []" in result.stdout, result.stdout[-2000:]


def test_the_check_sees_lightning_when_it_is_imported(tmp_path, cache_dir):
    """The probe itself can fail: `fraqat-train`'s module imports Lightning, and the probe reports it."""
    result = run_main("fraqat_cli.train.command", ["fraqat-train", "--help"], tmp_path, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lightning imported: ['lightning'" in result.stdout, result.stdout[-2000:]
