"""Helpers for the training tests: run the real `fraqat-train` entry point, compose the real config."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

FAST = [
    "model=tiny_sana",  # first: the family sweep replaces it
    "trainer.max_steps=4",
    "data.num_prompts=8",
    "data.batch_size=4",
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "checkpoint.every_n_steps=2",
]


def cli_env(cache_dir: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", FRAQAT_CACHE=str(cache_dir))
    env.pop("LOCAL_RANK", None)
    return env


def train_command() -> list[str]:
    """The installed console script, beside this interpreter (DDP workers re-launch it)."""
    return [str(Path(sys.executable).parent / "fraqat-train")]


def fraqat_train(args: list[str], cwd: Path, cache_dir: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `fraqat-train ARGS` as a user would (the installed console script's module)."""
    return subprocess.run(
        [*train_command(), *args], cwd=cwd, env=cli_env(cache_dir), capture_output=True, text=True, timeout=timeout
    )


def logged_rows(run_dir: Path) -> list[dict]:
    """Rows of every CSV log version of a run, in order."""
    rows = []
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with path.open() as f:
            rows.extend(csv.DictReader(f))
    return rows


def bits_by_step(run_dir: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["train/weight_bits"]) for r in logged_rows(run_dir) if r.get("train/weight_bits")}


def train_sweep(work: Path, cache_dir: Path, args: list[str]) -> Path:
    """Run `fraqat-train --multirun ARGS` into `work/sweep` and return that folder."""
    result = fraqat_train(["--multirun", *args, f"hydra.sweep.dir={work}/sweep"], cwd=work, cache_dir=cache_dir,
                          timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "sweep"


def console(script: str, args: list[str], cwd: Path, cache_dir: Path) -> subprocess.CompletedProcess:
    """Run an installed console script (fraqat-eval, fraqat-export, ...) as a user would."""
    command = [str(Path(sys.executable).parent / script), *args]
    return subprocess.run(command, cwd=cwd, env=cli_env(cache_dir), capture_output=True, text=True, timeout=600)


def declared_script(script: str) -> list[str]:
    """The command line of `script` as pyproject.toml declares it ([project.scripts] `module:function`), run
    the way pip's generated script runs it: the entry as it is in this checkout, even where the installed
    script was generated from an older declaration."""
    import tomllib

    declared = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    module, function = declared["project"]["scripts"][script].split(":")
    code = f"import sys; from {module} import {function} as main; sys.argv[0] = {script!r}; sys.exit(main())"
    return [sys.executable, "-c", code]


QUANTIZER_DIR = Path(__file__).resolve().parents[1] / "conf" / "quantizer"
QUANTIZER_PRESET_NAMES = sorted(p.stem for p in QUANTIZER_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def quantizer_preset(name: str = "per_channel", *overrides: str):
    """`conf/quantizer/<name>.yaml` composed as fraqat-train composes it (its shared `_base.yaml` included)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="fraqat_cli.conf", version_base="1.3"):
        return compose(config_name="train", overrides=[f"quantizer={name}", *overrides]).quantizer
