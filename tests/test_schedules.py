"""Bit schedules: every preset in conf/schedule, the paper's table, and bad inputs."""

from functools import cache
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fraqat_cli.quant import PASS_THROUGH_BITS, fake_quantize
from fraqat_cli.quant.schedules import SmoothSchedule, Stage, StagedSchedule, bits_trace

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

SCHEDULE_PRESETS = sorted((Path(__file__).resolve().parents[1] / "conf" / "schedule").glob("*.yaml"))
PRESET_NAMES = [p.stem for p in SCHEDULE_PRESETS]
TOTAL_STEPS = [1, 2, 7, 25, 1000]


@cache
def _preset(name):
    return instantiate(OmegaConf.load(SCHEDULE_PRESETS[PRESET_NAMES.index(name)]))


def test_the_presets_are_all_there():
    assert set(PRESET_NAMES) >= {"fractional", "integer", "simple", "standard", "fp", "linear", "cosine"}


@pytest.mark.parametrize("total_steps", TOTAL_STEPS, ids=lambda n: f"{n}steps")
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_bits_never_go_below_the_end_bits(name, total_steps):
    schedule = _preset(name)
    assert min(bits_trace(schedule, total_steps)) >= schedule.end_bits


@pytest.mark.parametrize("total_steps", TOTAL_STEPS, ids=lambda n: f"{n}steps")
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_end_bits_are_reached_by_the_last_step(name, total_steps):
    schedule = _preset(name)
    assert bits_trace(schedule, total_steps)[-1] == schedule.end_bits


@pytest.mark.parametrize("total_steps", TOTAL_STEPS, ids=lambda n: f"{n}steps")
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_bits_never_rise(name, total_steps):
    trace = bits_trace(_preset(name), total_steps)
    assert all(later <= earlier for earlier, later in pairwise(trace))


@pytest.mark.parametrize("total_steps", TOTAL_STEPS, ids=lambda n: f"{n}steps")
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_bit_width_is_one_fake_quantize_accepts(name, total_steps):
    x = torch.randn(2, 8)
    for bits in set(bits_trace(_preset(name), total_steps)):
        assert fake_quantize(x, bits).shape == x.shape


def test_fractional_preset_reproduces_the_papers_table_at_25_steps():
    # FraQAT's schedule in epochs: 8, 7, 6, 5.5, 5 one each; 4.75, 4.5, 4.25 two each; 4 for fourteen.
    assert bits_trace(_preset("fractional"), 25) == [8, 7, 6, 5.5, 5, 4.75, 4.75, 4.5, 4.5, 4.25, 4.25] + [4] * 14


def test_fractional_preset_scales_the_table_to_the_budget():
    trace = bits_trace(_preset("fractional"), 2500)
    assert [trace.count(b) for b in (8, 7, 6, 5.5, 5, 4.75, 4.5, 4.25, 4)] == [100] * 5 + [200] * 3 + [1400]


@pytest.mark.parametrize("total_steps", TOTAL_STEPS, ids=lambda n: f"{n}steps")
def test_standard_preset_is_four_bits_from_step_zero(total_steps):
    assert bits_trace(_preset("standard"), total_steps) == [4.0] * total_steps


@pytest.mark.parametrize("total_steps", TOTAL_STEPS, ids=lambda n: f"{n}steps")
def test_fp_preset_passes_weights_through_at_every_step(total_steps):
    assert bits_trace(_preset("fp"), total_steps) == [PASS_THROUGH_BITS] * total_steps
    x = torch.randn(3, 5)
    assert fake_quantize(x, _preset("fp")(0, total_steps)) is x


@pytest.mark.parametrize("total_steps", [2, 7, 25, 1000], ids=lambda n: f"{n}steps")
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_smooth_presets_start_at_start_bits(name, total_steps):
    schedule = _preset(name)
    assert schedule(0, total_steps) == schedule.start_bits == 8.0


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_smooth_presets_hold_end_bits_for_their_hold_share(name):
    schedule = _preset(name)
    trace = bits_trace(schedule, 1000)
    held = sum(b == schedule.end_bits for b in trace)
    assert held == pytest.approx(schedule.hold_share * 1000, abs=2)
    assert len(set(trace[: 1000 - held])) == 1000 - held  # strictly falling before the hold


def test_linear_preset_falls_by_equal_steps():
    trace = bits_trace(_preset("linear"), 101)
    decay = [b for b in trace if b > 4.0]
    steps = [a - b for a, b in pairwise(decay)]
    assert max(steps) - min(steps) < 1e-9


# ---------------------------------------------------------------------------------------------------------
# Bad inputs raise ValueError naming the value


@pytest.mark.parametrize("name", ["fractional", "cosine"])
def test_negative_step_raises(name):
    with pytest.raises(ValueError, match="-1"):
        _preset(name)(-1, 10)


@pytest.mark.parametrize("total_steps", [0, -5, 2.5], ids=["zero", "negative", "float"])
@pytest.mark.parametrize("name", ["fractional", "cosine"])
def test_total_steps_that_is_not_a_positive_integer_raises(name, total_steps):
    with pytest.raises(ValueError, match=f"total_steps must be a positive integer; got {total_steps}"):
        _preset(name)(0, total_steps)


def test_stage_below_the_end_bits_raises_naming_it():
    with pytest.raises(ValueError, match=r"\[3\.5\]"):
        StagedSchedule([{"bits": 8, "share": 1}, {"bits": 3.5, "share": 1}, {"bits": 4, "share": 1}])


@pytest.mark.parametrize("share", [0, -1, float("nan")], ids=["zero", "negative", "nan"])
def test_stage_share_that_is_not_positive_raises_naming_it(share):
    with pytest.raises(ValueError, match=f"got {share}"):
        Stage(bits=4, share=share)


def test_stage_bits_out_of_range_raise():
    with pytest.raises(ValueError, match="bits=1"):
        Stage(bits=1, share=1)


def test_empty_staged_schedule_raises():
    with pytest.raises(ValueError, match="at least one stage"):
        StagedSchedule([])


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"start_bits": 4, "end_bits": 8}, "start_bits=4"),
        ({"hold_share": 1.0}, "1.0"),
        ({"hold_share": -0.1}, "-0.1"),
        ({"shape": "exponential"}, "'exponential'"),
        ({"start_bits": 32}, "32"),
    ],
    ids=["start_below_end", "hold_all", "negative_hold", "unknown_shape", "full_precision_start"],
)
def test_bad_smooth_schedule_raises_naming_the_value(kwargs, named):
    with pytest.raises(ValueError, match=named):
        SmoothSchedule(**kwargs)


def test_a_budget_too_short_for_the_stages_names_the_bits_it_skips():
    """20 steps of the paper's nine stages never hold 5 bits (its stage spans 0.8 of a step)."""
    fractional = _preset("fractional")
    assert [s.bits for s in fractional.skipped_stages(20)] == [5]
    enough = fractional.steps_for_every_stage()
    assert fractional.skipped_stages(enough) == [] and fractional.skipped_stages(enough - 1) != []
    assert set(bits_trace(fractional, enough)) == {s.bits for s in fractional.stages}


def test_each_end_width_has_its_plain_qat_preset():
    """Every `<shape>_w<bits>` schedule preset has `standard_w<bits>`, constant at the width it ends at: the
    baseline its students are paired with (fraqat_cli.evaluate.comparison.plain_qat)."""
    from fraqat_cli.evaluate.comparison import plain_qat

    presets = {p.stem: instantiate(OmegaConf.load(p)) for p in SCHEDULE_PRESETS if p.stem != "fp"}  # no QAT
    assert plain_qat("fractional") == plain_qat("standard") == "standard"
    assert plain_qat("fractional_w3") == "standard_w3" and plain_qat(None) == "standard"
    for name, schedule in presets.items():
        base = presets[plain_qat(name)]
        assert base(0, 100) == base(99, 100) == schedule(99, 100), name
