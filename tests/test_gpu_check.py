"""`scripts/gpu_check.sh` can only run whole on a GPU (and as a CPU rehearsal of minutes), so this checks, in
seconds, that what it names exists: its files, console scripts, benchmark options, config keys and stages."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
TEXT = SCRIPT.read_text()


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_every_python_file_and_console_script_it_names_exists():
    for path in set(re.findall(r"\b(?:benchmarks|scripts)/[\w/]+\.py", TEXT)):
        assert (ROOT / path).is_file(), path
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(re.findall(r"\$BIN/(fraqat-\w+)", TEXT)) <= set(scripts)


def test_every_model_it_trains_is_a_preset():
    for name in set(re.findall(r"\bmodel=(\w+)", TEXT)) | set(re.findall(r"--model (\w+)", TEXT)):
        assert (ROOT / "conf" / "model" / f"{name}.yaml").is_file(), name


@pytest.mark.parametrize("overrides", [
    ["attention_backends=null", "model=flux_schnell", "model.max_sequence_length=64", "data=offline",
     "checkpoint.every_n_steps=1000", "trainer=gpu"],
    ["compile.enabled=true", "compile.backend=inductor", "compile.mode=null", "model=pixart_sigma",
     "gradient_checkpointing=true", "sample_every_n_steps=10", "trainer=cpu", "trainer.precision=32-true"],
], ids=["flux-nan", "compile"])
def test_the_training_overrides_it_passes_are_config_keys(overrides):
    with initialize_config_module(config_module="fraqat_cli.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    assert cfg.model.name in ("flux_schnell", "pixart_sigma")


def test_the_eval_stand_in_it_asks_for_is_an_eval_option():
    assert "fid.inception=plumbing" in TEXT
    with initialize_config_module(config_module="fraqat_cli.conf", version_base="1.3"):
        cfg = compose(config_name="eval", overrides=["ckpt=x", "prompts=offline", "fid.inception=plumbing"])
    assert cfg.fid.inception == "plumbing"


def test_the_benchmark_options_it_passes_exist():
    help_text = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "deploy_runtime.py"), "--help"],
                               capture_output=True, text=True, check=True).stdout
    deploy = TEXT[TEXT.index("if wanted deploy"):TEXT.index("if wanted real")]
    assert set(re.findall(r"(--[a-z-]+)", deploy)) <= set(re.findall(r"--[a-z-]+", help_text))


def test_every_stage_it_can_skip_is_described_in_its_header():
    stages = re.findall(r"\bwanted ([\w-]+)", TEXT)
    assert stages == ["tiny", "flux-nan", "flux-plan", "compile", "deploy", "real"]
    header = TEXT[:TEXT.index("set -euo pipefail")]
    for number, name in enumerate(stages, start=1):
        assert re.search(rf"#\s+{number}\. {re.escape(name)}\s", header), name
