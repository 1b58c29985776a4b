"""Seconds each command's `--help` takes, as a user starts it, against a bare `python -c pass`.

Each command runs the entry pyproject.toml declares ([project.scripts], as pip's generated script runs it)
in a fresh process; rounds are interleaved (bare python, then each command) so machine noise hits all alike,
and the median and the spread (min-max) over the rounds are printed. `--installed` also times the console
scripts installed beside this interpreter once each (an install from before the light entry imports torch).

    python benchmarks/help_time.py [--rounds N] [--installed]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("fraqat-train", "fraqat-eval", "fraqat-export", "fraqat-plan")


def declared(script: str) -> list[str]:
    module, function = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"][script].split(":")
    return [sys.executable, "-c", f"import sys; from {module} import {function} as m; sys.argv[0] = {script!r}; "
                                  f"sys.exit(m())", "--help"]


def seconds(command: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} failed: {result.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--installed", action="store_true", help="also time the installed console scripts once")
    args = parser.parse_args()
    commands = {"python -c pass": [sys.executable, "-c", "pass"]} | {s: declared(s) for s in SCRIPTS}
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.rounds):
        for name, command in commands.items():
            times[name].append(seconds(command))
    bare = statistics.median(times["python -c pass"])
    print(f"{'command':<28} {'median s':>9} {'min-max s':>13} {'x bare python':>14}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name + ' --help' * (name != 'python -c pass'):<28} {median:9.2f} "
              f"{min(values):6.2f}-{max(values):<6.2f} {median / bare:14.1f}")
    if args.installed:
        for script in SCRIPTS:
            installed = Path(sys.executable).parent / script
            print(f"{'installed ' + script:<28} {seconds([str(installed), '--help']):9.2f} (one run)")


if __name__ == "__main__":
    main()
