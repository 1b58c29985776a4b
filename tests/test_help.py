"""`--help` says what each command does, how it is run and what it needs, lists only the config groups that
command reads, and a missing required key is one line (exit 2): through the entry pyproject.toml declares,
before torch is imported."""

from __future__ import annotations

import subprocess

import pytest
from train_support import cli_env, declared_script

from fraqat_cli.entry import COMMANDS, config_groups

TRAINING_ONLY = ("data", "trainer", "schedule", "quantizer", "optim", "experiment")


def run_script(script: str, args: list[str], tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([*declared_script(script), *args], cwd=tmp_path, env=cli_env(tmp_path / "cache"),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script", sorted(COMMANDS))
def test_help_starts_with_what_the_command_does_and_how_it_is_run(script, tmp_path):
    result = run_script(script, ["--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{script}: ") and "powered by Hydra" not in result.stdout
    examples = [line for line in lines if line.strip().startswith(f"{script} ") or line.strip() == script]
    assert len(examples) >= 3, result.stdout
    assert "Required keys" in result.stdout
    assert "_base" not in result.stdout and "_paper" not in result.stdout  # what the presets share, not options


@pytest.mark.parametrize("script", ["fraqat-eval", "fraqat-export"])
def test_eval_and_export_help_lists_no_training_groups(script, tmp_path):
    result = run_script(script, ["--help"], tmp_path)
    listed = {line.split(":")[0].strip() for line in result.stdout.split("Config groups it reads")[1].splitlines()
              if line.startswith("  ") and ":" in line}
    assert "model" in listed and not listed & set(TRAINING_ONLY), listed
    assert "ckpt" in result.stdout.split("Required keys")[1].splitlines()[1]


def test_train_help_lists_the_training_groups_with_their_defaults(tmp_path):
    groups = dict(config_groups("train"))
    assert {"model", "schedule", "quantizer", "data", "trainer", "logger", "experiment"} <= set(groups)
    assert "toy*" in groups["model"] and "_base" not in groups["quantizer"]
    assert dict(config_groups("plan")) == groups  # fraqat-plan takes fraqat-train's overrides
    assert set(dict(config_groups("eval"))) == {"prompts", "model", "logger"}


@pytest.mark.parametrize("script", ["fraqat-eval", "fraqat-export"])
def test_a_missing_ckpt_is_one_line_and_exit_2_before_torch_is_imported(script, tmp_path):
    result = run_script(script, [], tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"{script}: error: ckpt is required"), line
    assert not (tmp_path / "evals").exists() and not (tmp_path / "outputs").exists()


def test_the_help_path_imports_no_torch(tmp_path):
    code = ("import sys; from fraqat_cli.entry import COMMANDS, run; run(COMMANDS['fraqat-plan'], ['--help']); "
            "print(sorted(m for m in ('torch', 'lightning', 'diffusers', 'hydra') if m in sys.modules))")
    result = subprocess.run([*declared_script("fraqat-plan")[:2], code], capture_output=True, text=True,
                            cwd=tmp_path, env=cli_env(tmp_path / "cache"), timeout=120)
    assert result.stdout.splitlines()[-1] == "[]", result.stdout[-500:] + result.stderr[-2000:]
