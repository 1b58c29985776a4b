"""Tables over training seeds (`scripts/paired_seeds.py`): the paired interval against scipy's, and the
tables on known numbers."""

from __future__ import annotations

import pytest
from paired_seeds import fid_gap_p_values, holm, paired_interval, paired_p_value, summarize


def test_paired_interval_is_scipys_paired_t_interval():
    from scipy import stats

    fractional, standard = [32.1, 30.9, 35.0, 31.2, 29.8], [33.0, 33.9, 34.1, 32.5, 33.6]
    mean, sd, low, high = paired_interval([f - s for f, s in zip(fractional, standard)])
    want = stats.ttest_rel(fractional, standard).confidence_interval(0.95)
    assert (low, high) == pytest.approx((want.low, want.high), rel=1e-12)
    assert mean == pytest.approx(sum(fractional) / 5 - sum(standard) / 5)
    assert sd > 0


def rows(rounding, schedule, fids):
    return [{"model": "toy", "selection": "transformer_blocks", "rounding": rounding, "schedule": schedule,
             "granularity": "per_tensor", "seed": seed, "fid": fid, "held_out_loss": 0.01}
            for seed, fid in enumerate(fids)]


def test_tables_say_which_gaps_and_ratios_are_distinguishable():
    table = summarize(
        rows("floor", "standard", [30.0, 32.0, 34.0, 36.0]) + rows("floor", "fractional", [27.0, 28.8, 30.6, 32.4])
        + rows("nearest", "standard", [15.0, 16.0, 16.0, 18.0])
        + rows("nearest", "fractional", [14.0, 17.0, 13.0, 16.0])
    )
    lines = table.splitlines()
    gap = {line.split(" | ")[0].strip("| "): line for line in lines
           if "| fractional | per_tensor | FID vs teacher | 4 |" in line}
    assert "-10.0%" in gap["floor"] and "**yes**" in gap["floor"]  # every seed 10% below its standard run
    assert "no (interval holds 0)" in gap["nearest"]  # -6.7%, +6.2%, -18.8%, -11.1%
    ratio = next(line for line in lines if "| standard | per_tensor | floor / nearest | 4 |" in line)
    assert "| 2.031 |" in ratio and "**yes**" in ratio  # 30/15, 32/16, 34/16, 36/18


def test_a_rounding_equal_at_integer_bits_borrows_the_standard_runs():
    table = summarize(rows("nearest", "standard", [15.0, 16.0]) + rows("nearest", "fractional", [14.0, 15.0])
                             + rows("nearest_int_range", "fractional", [13.5, 14.4]))
    assert "| nearest_int_range (standard: nearest's runs) | fractional | per_tensor | FID vs teacher | 2 | -10.0% |" \
        in table


def test_held_out_loss_gaps_are_paired_too():
    table = summarize(rows("floor", "standard", [30.0, 31.0]) + [
        {**row, "held_out_loss": loss} for row, loss in zip(rows("floor", "fractional", [29.0, 30.0]), [0.008, 0.009])])
    assert "| floor | fractional | per_tensor | held-out loss | 2 | -15.0% |" in table  # 0.008 / 0.01, 0.009 / 0.01


def test_one_rounding_has_no_ratio_table_and_one_seed_no_interval():
    table = summarize(rows("floor", "standard", [30.0]) + rows("floor", "fractional", [27.0]))
    assert "ratio" not in table and "one seed: no interval" in table


def family_rows(model, selection, schedule, granularity, fids, share):
    return [{"model": model, "selection": selection, "rounding": "nearest_int_range", "schedule": schedule,
             "granularity": granularity, "seed": seed, "fid": fid, "held_out_loss": 0.004, "quantized_share": share}
            for seed, fid in enumerate(fids)]


def test_family_table_has_the_teacher_and_each_gap_to_standard_qat():
    rows = (family_rows("toy", "transformer_blocks", "standard", "per_tensor", [15.0, 16.0, 17.0], 0.409)
            + family_rows("toy", "transformer_blocks", "fractional", "per_tensor", [13.5, 14.4, 15.3], 0.409)
            + family_rows("toy", "transformer_blocks", "standard", "per_channel", [8.0, 9.0, 7.0], 0.409)
            + family_rows("toy", "transformer_blocks", "fractional", "per_channel", [8.4, 8.1, 7.7], 0.409))
    lines = summarize(rows, [{"model": "toy", "fid": 0.0}]).splitlines()
    assert "| toy | - | teacher (full precision) | - | 0 (reference) |" in lines[4]
    fraqat = next(line for line in lines if line.startswith("| toy | per_tensor | FraQAT | 3 | 14.40 ± 0.90 |"))
    assert "| -10.0% | [-10.0%, -10.0%] | **yes** |" in fraqat and fraqat.endswith("| 40.9% |")
    channel = next(line for line in lines if line.startswith("| toy | per_channel | FraQAT | 3 |"))
    assert "| no |" in channel  # +5.0%, -10.0%, +10.0%


def test_selections_group_the_tables_and_get_their_own_ratio():
    rows = (family_rows("toy", "transformer_blocks", "standard", "per_tensor", [15.0, 16.0], 0.409)
            + family_rows("toy", "all_linear", "standard", "per_tensor", [30.0, 32.0], 0.5)
            + family_rows("toy", "all_linear", "fractional", "per_tensor", [27.0, 28.8], 0.5))
    table = summarize(rows)
    assert "| toy | all_linear | per_tensor | FraQAT | 2 | 27.90 ± 1.27 | -10.0% |" in table
    assert "Details, model `toy`, selection `all_linear`:" in table
    ratio = next(line for line in table.splitlines() if "transformer_blocks / all_linear" in line)
    assert ratio.startswith("| standard | per_tensor | transformer_blocks / all_linear | 2 | 0.500 |")


def test_holm_scales_the_smallest_p_by_the_count_and_never_lets_a_larger_p_come_out_smaller():
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert adjusted == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})  # 3 x 0.01; 2 x 0.03; max(1 x 0.04, 0.06)
    assert holm({"a": 0.6, "b": 0.7}) == {"a": 1.0, "b": 1.0}


def test_paired_p_value_is_scipys_paired_t_test():
    from scipy import stats

    fractional, standard = [32.1, 30.9, 35.0, 31.2, 29.8], [33.0, 33.9, 34.1, 32.5, 33.6]
    gaps = [f / s - 1 for f, s in zip(fractional, standard)]
    assert paired_p_value(gaps) == pytest.approx(stats.ttest_1samp(gaps, 0).pvalue, rel=1e-9)
    assert paired_p_value([-0.1, -0.1]) == 0.0 and paired_p_value([0.0, 0.0]) == 1.0  # no spread


def test_family_table_counts_the_seeds_closer_than_standard_and_adjusts_p_within_each_schedule():
    rows = (family_rows("toy", "transformer_blocks", "standard", "per_tensor", [15.0, 16.0, 17.0, 18.0], 0.4)
            + family_rows("toy", "transformer_blocks", "fractional", "per_tensor", [14.0, 15.0, 17.5, 16.0], 0.4)
            + family_rows("toy_flux", "transformer_blocks", "standard", "per_tensor", [7.0, 7.2, 7.4, 7.1], 0.86)
            + family_rows("toy_flux", "transformer_blocks", "fractional", "per_tensor", [6.5, 6.6, 7.0, 6.7], 0.86))
    table = summarize(rows)
    toy = next(line for line in table.splitlines() if line.startswith("| toy | per_tensor | FraQAT |"))
    flux = next(line for line in table.splitlines() if line.startswith("| toy_flux | per_tensor | FraQAT |"))
    p = {key[0]: value for key, value in fid_gap_p_values(rows).items()}
    adjusted = holm(p)
    assert "| 3/4 |" in toy and f"| {adjusted['toy']:.3f} (2) |" in toy  # one family: fractional's two gaps
    assert "| 4/4 |" in flux and f"| {adjusted['toy_flux']:.3f} (2) |" in flux
    assert min(adjusted.values()) == pytest.approx(2 * min(p.values()))
    renamed = rows[:12] + [{**r, "schedule": "integer"} for r in rows[12:]]  # flux's fractional rows as integer
    lines = summarize(renamed).splitlines()
    integer = next(line for line in lines if line.startswith("| toy_flux | per_tensor | integer |"))
    assert f"| {holm({'x': p['toy_flux']})['x']:.3f} (1) |" in integer  # a schedule of one gap: unadjusted


def test_a_w3_schedule_is_paired_with_plain_qat_at_3_bits_not_4():
    rows = (family_rows("toy", "transformer_blocks", "standard", "per_channel", [8.0, 9.0], 0.409)
            + family_rows("toy", "transformer_blocks", "standard_w3", "per_channel", [20.0, 30.0], 0.409)
            + family_rows("toy", "transformer_blocks", "fractional_w3", "per_channel", [18.0, 24.0], 0.409))
    lines = summarize(rows, [{"model": "toy", "fid": 0.0}]).splitlines()
    fraqat_w3 = next(line for line in lines if line.startswith("| toy | per_channel | FraQAT (W3) | 2 |"))
    assert "| -15.0% |" in fraqat_w3  # 18/20 and 24/30: -10%, -20%; against standard's 8 and 9 it would be +...
    plain_w3 = next(line for line in lines if line.startswith("| toy | per_channel | standard QAT (W3) | 2 |"))
    assert "| - | - | - | - | - |" in plain_w3  # a baseline has no gap of its own
