"""fraqat-plan traces the configured step once: its peak is the trace's, the other gradient-checkpointing setting
is traced only when it is offered as an option, and then its numbers are that setting's own trace."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module
from torch._subclasses.fake_tensor import FakeTensorMode

import fraqat_cli.plan.trace as trace_module
from fraqat_cli.plan.command import describe, layout_of, make_plan, per_device, trace_run, training_samples
from fraqat_cli.plan.trace import example_row, trace_step

TINY = ["model=tiny_flux", "model.resolution=128", "data.batch_size=2"]


def planned(*overrides: str) -> tuple[dict, object]:
    """make_plan of the overrides, as fraqat-plan runs it (its suggestions compose the config again)."""
    with initialize_config_module("fraqat_cli.conf", version_base="1.3"):
        cfg = compose("plan", overrides=list(overrides))
        return make_plan(cfg, list(overrides)), cfg


def traced_peak(*overrides: str) -> tuple[int, int]:
    """(peak per device, activation bytes) of the run's own trace, taken apart from make_plan."""
    with initialize_config_module("fraqat_cli.conf", version_base="1.3"):
        cfg = compose("plan", overrides=list(overrides))
    layout = layout_of(cfg)
    trace, _ = trace_run(cfg, layout, training_samples(cfg), example_row(cfg.model))
    return per_device(trace, layout)["peak"], trace.activation_bytes


def test_a_run_that_fits_is_traced_once_and_the_other_setting_is_named_not_traced(monkeypatch):
    calls = []
    monkeypatch.setattr("fraqat_cli.plan.depth.trace_step", lambda *a, **k: calls.append(a) or trace_step(*a, **k))
    plan, _ = planned(*TINY)
    assert len(calls) == 1  # a tiny model is traced whole: one trace, not one per checkpointing setting
    assert plan["fits"] and plan["suggestions"] == []
    assert (plan["peak_bytes_per_device"], plan["activation_bytes"]["without_checkpointing"]) == traced_peak(*TINY)
    assert plan["activation_bytes"]["with_checkpointing"] is None
    assert "without gradient checkpointing (the other setting is not traced" in describe(plan)


@pytest.mark.slow
def test_the_checkpointing_option_is_the_trace_of_the_run_with_checkpointing():
    """What the plan said before it traced once: the option's peak and activations from a trace of the same
    command line with gradient_checkpointing=true, the configured run's from its own trace."""
    overrides = [*TINY, "plan.gpu_memory_gb=0.001"]
    plan, _ = planned(*overrides)
    assert not plan["fits"]
    option = next(s for s in plan["suggestions"] if s["overrides"] == ["gradient_checkpointing=true"])
    with_it = traced_peak(*overrides, "gradient_checkpointing=true")
    assert (option["peak_bytes_per_device"], option["activation_bytes"]) == with_it
    assert plan["activation_bytes"]["with_checkpointing"] == with_it[1]
    assert (plan["peak_bytes_per_device"], plan["activation_bytes"]["without_checkpointing"]) == \
        traced_peak(*overrides)
    assert with_it[1] < plan["activation_bytes"]["without_checkpointing"]
    assert "not traced" not in describe(plan)


def test_asking_about_cuda_once_leaves_the_trace_as_torchs_fake_mode_gives_it(monkeypatch):
    with initialize_config_module("fraqat_cli.conf", version_base="1.3"):
        cfg = compose("plan", overrides=TINY)
    row = example_row(cfg.model)
    fast = trace_step(cfg, 2, accumulating=False, row=row)
    monkeypatch.setattr(trace_module, "StepFakeMode", FakeTensorMode)
    plain = trace_step(cfg, 2, accumulating=False, row=row)
    assert fast == plain
