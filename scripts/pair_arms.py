"""One saved arm against another, seed by seed: for two `per_seed.json` files of `scripts/compare_schedules.py`
whose runs differ in one setting the rows do not name (an activation schedule, an override), the FID and held-out
loss gap of the second arm's students to the first's, per model and granularity, paired over their common seeds.

    python scripts/pair_arms.py docs/results/w4a4_per_token_per_seed.json \\
        docs/results/w4a4_activation_schedule_per_seed.json --schedule fractional \\
        --labels "constant 4-bit activations" "activations 8 -> 4 (activation_schedule=fractional)"
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from paired_seeds import paired_interval, paired_p_value


def _by_arm(rows: list[dict], schedule: str | None) -> dict[tuple, dict[int, dict]]:
    arms: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        if schedule is None or r["schedule"] == schedule:
            arms.setdefault((r["model"], r["granularity"], r["schedule"]), {})[r["seed"]] = r
    return arms


def _gap(base: dict[int, dict], other: dict[int, dict], seeds: list[int], measure: str) -> str:
    gaps = [other[s][measure] / base[s][measure] - 1 for s in seeds]
    if len(gaps) < 2:
        return f"{gaps[0]:+.1%} (one seed: no interval)"
    mean, _, low, high = paired_interval(gaps)
    return f"{mean:+.1%} [{low:+.1%}, {high:+.1%}], p {paired_p_value(gaps):.3f}"


def _spread(arm: dict[int, dict], seeds: list[int]) -> str:
    fids = [arm[s]["fid"] for s in seeds]
    return f"{statistics.fmean(fids):.2f} ± {statistics.stdev(fids) if len(fids) > 1 else 0:.2f}"


def pair_table(base_rows: list[dict], rows: list[dict], labels: tuple[str, str], schedule: str | None) -> str:
    """Markdown: per (model, granularity, schedule) in both files, each arm's FID, and the second's paired gaps."""
    base_arms, arms = _by_arm(base_rows, schedule), _by_arm(rows, schedule)
    lines = [f"| model | granularity | schedule | seeds | FID, {labels[0]} | FID, {labels[1]} | FID gap [95% "
             "interval], p | seeds closer | held-out loss gap [95% interval], p |", "|" + "---|" * 9]
    for key in sorted(base_arms.keys() & arms.keys()):
        base, other = base_arms[key], arms[key]
        seeds = sorted(base.keys() & other.keys())
        if not seeds:
            continue
        closer = sum(other[s]["fid"] < base[s]["fid"] for s in seeds)
        lines.append(f"| {' | '.join(key)} | {len(seeds)} | {_spread(base, seeds)} | {_spread(other, seeds)} | "
                     f"{_gap(base, other, seeds, 'fid')} | {closer}/{len(seeds)} | "
                     f"{_gap(base, other, seeds, 'held_out_loss')} |")
    if len(lines) == 2:
        raise SystemExit("pair_arms.py: the two files share no (model, granularity, schedule) with common seeds")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path, help="per_seed.json of the arm the gaps are measured against")
    parser.add_argument("other", type=Path, help="per_seed.json of the arm whose gaps are shown")
    parser.add_argument("--labels", nargs=2, default=("base", "other"), metavar=("BASE", "OTHER"))
    parser.add_argument("--schedule", default=None, help="only the runs of this weight schedule")
    args = parser.parse_args()
    base, other = (json.loads(p.read_text())["runs"] for p in (args.base, args.other))
    print(pair_table(base, other, tuple(args.labels), args.schedule))


if __name__ == "__main__":
    main()
