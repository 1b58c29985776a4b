"""`scripts/pair_arms.py`: two saved arms paired seed by seed, on known numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pair_arms import pair_table


def runs(schedule, fids, losses, seeds=None):
    return [{"model": "toy_flux", "selection": "transformer_blocks", "rounding": "nearest_int_range",
             "schedule": schedule, "granularity": "per_channel", "seed": seed, "fid": fid, "held_out_loss": loss}
            for seed, fid, loss in zip(seeds or range(len(fids)), fids, losses)]


def test_gaps_are_paired_on_the_common_seeds_of_the_same_arm():
    base = runs("fractional", [10.0, 12.0, 14.0], [0.1, 0.1, 0.1]) + runs("standard", [1.0, 1.0, 1.0], [1, 1, 1])
    other = runs("fractional", [9.0, 10.8, 50.0], [0.09, 0.09, 0.2], seeds=[0, 1, 5])  # seed 5: no twin
    table = pair_table(base, other, ("constant", "scheduled"), schedule="fractional").splitlines()
    assert len(table) == 3  # header, rule, one arm: `standard` is filtered out, seed 5 has no pair
    row = table[2]
    assert row.startswith("| toy_flux | per_channel | fractional | 2 | 11.00 ± 1.41 | 9.90 ± 1.27 | -10.0% ")
    assert row.endswith("| -10.0% [-10.0%, -10.0%], p 0.000 | 2/2 | -10.0% [-10.0%, -10.0%], p 0.000 |")
    # both seeds 10% closer by FID, and 10% lower in held-out loss: no spread, so the interval is a point


def test_files_without_a_common_arm_are_refused(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"runs": runs("standard", [1.0, 2.0], [0.1, 0.1])}))
    b.write_text(json.dumps({"runs": runs("fractional", [1.0, 2.0], [0.1, 0.1])}))
    script = Path(__file__).resolve().parents[1] / "scripts" / "pair_arms.py"
    done = subprocess.run([sys.executable, str(script), str(a), str(b)], capture_output=True, text=True)
    assert done.returncode != 0 and "share no (model, granularity, schedule)" in done.stderr


def test_one_common_seed_has_no_interval():
    table = pair_table(runs("standard", [10.0], [0.1]), runs("standard", [11.0], [0.1]), ("a", "b"), None)
    assert "+10.0% (one seed: no interval)" in table


@pytest.mark.parametrize("seeds", [[0, 1, 2, 3]])
def test_the_interval_is_the_paired_t_interval(seeds):
    from paired_seeds import paired_interval

    base, other = runs("standard", [10, 11, 12, 13], [1] * 4), runs("standard", [9, 11.5, 11, 12], [1] * 4)
    _, _, low, high = paired_interval([o["fid"] / b["fid"] - 1 for o, b in zip(other, base)])
    assert f"[{low:+.1%}, {high:+.1%}]" in pair_table(base, other, ("a", "b"), None)
