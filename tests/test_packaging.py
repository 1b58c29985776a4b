"""A non-editable install carries its Hydra configs (conf/ ships inside the wheel as fraqat_cli.conf)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_installed_wheel_finds_its_configs_outside_the_repository(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(ROOT),
                    "-w", str(tmp_path / "wheel")], check=True, capture_output=True)
    wheel = next((tmp_path / "wheel").glob("fraqat_cli-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True)
    probe = (
        "import sys, fraqat_cli; assert fraqat_cli.__file__.startswith(sys.argv[1]), fraqat_cli.__file__;"
        "from fraqat_cli.train.command import main;"
        "sys.argv = ['fraqat-train', '--cfg', 'job', 'schedule=integer']; main()"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "site")], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "name: integer" in out.stdout and "granularity: per_tensor" in out.stdout
    helped = subprocess.run([sys.executable, "-c", "import sys; from fraqat_cli.entry import evaluate; "
                             "sys.argv = ['fraqat-eval', '--help']; evaluate()"], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert helped.returncode == 0 and "Required keys" in helped.stdout, helped.stderr[-2000:]
    assert "  logger: csv, mlflow, none, tensorboard, wandb*" in helped.stdout  # the groups, from the wheel's conf
