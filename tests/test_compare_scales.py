"""scripts/compare_scales.py's table: every arm paired seed by seed with the baseline arm."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_scales.py"


def test_the_table_pairs_each_arm_with_the_baseline_seed_by_seed(tmp_path):
    runs = [{"scale": s, "granularity": g, "seed": seed, "fid": fid}
            for s, g, fids in [("max", "per_tensor", [10.0, 20.0, 30.0]), ("learned", "per_tensor", [9.0, 18.0, 27.0]),
                               ("max", "per_channel", [5.0, 10.0, 15.0])]
            for seed, fid in enumerate(fids)]
    (tmp_path / "per_seed.json").write_text(json.dumps({"runs": runs}))
    result = subprocess.run([sys.executable, str(SCRIPT), "--table-from", str(tmp_path / "per_seed.json")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = {line.split("|")[1].strip() + line.split("|")[2].strip(): line for line in result.stdout.splitlines()
             if line.startswith("| `")}
    assert "-10.0% [-10.0%, -10.0%] (3/3 seeds closer)" in lines["`learned`per_tensor"]
    assert "-50.0%" in lines["`max`per_channel"] and "| 20.00 (10.00-30.00) | - |" in lines["`max`per_tensor"]
