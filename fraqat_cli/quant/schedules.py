"""Bit schedules: pure functions of (step, total_steps) that return the weight bit-width.

A schedule is the only thing that decides a bit-width; `BitScheduleCallback`
applies it to the student every step. Presets live in `conf/schedule/` as data.
Every schedule reaches its end bit-width before the last step and never goes below it.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate
from typing import Literal

from fraqat_cli.quant.spec import validate_bits


def _check_position(step: int, total_steps: int) -> None:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive integer; got {total_steps!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative integer; got {step!r}")


@dataclass(frozen=True)
class Stage:
    """Hold `bits` for `share` of the budget (shares are relative: the paper's epochs work as they are)."""

    bits: float
    share: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", validate_bits(self.bits))
        if isinstance(self.share, bool) or not isinstance(self.share, (int, float)) or not self.share > 0:
            raise ValueError(f"a stage's share must be a positive number; got {self.share!r} (bits={self.bits:g})")


class StagedSchedule:
    """Piecewise-constant bit-widths: each stage holds its bits for its share of the steps.

    Stage i covers the steps whose position step/total_steps lies in
    [cum_share_(i-1), cum_share_i), with shares normalised to sum to 1. The last
    step always gets the last stage's bits, even when a budget is too short to
    give every stage a step.
    """

    def __init__(self, stages, name: str = "staged") -> None:
        stages = [s if isinstance(s, Stage) else Stage(**s) for s in stages]
        if not stages:
            raise ValueError("a staged schedule needs at least one stage")
        end = stages[-1].bits
        below = [s.bits for s in stages if s.bits < end]
        if below:
            raise ValueError(
                f"stages {below} go below the end bit-width {end:g}; allowed: every stage >= the last stage's bits"
            )
        self.name = name
        self.stages = tuple(stages)
        total = sum(s.share for s in stages)
        self._bounds = [c / total for c in accumulate(s.share for s in stages)][:-1]

    @property
    def end_bits(self) -> float:
        return self.stages[-1].bits

    def __call__(self, step: int, total_steps: int) -> float:
        _check_position(step, total_steps)
        if step >= total_steps - 1:
            return self.end_bits
        return self.stages[bisect_right(self._bounds, step / total_steps)].bits

    def skipped_stages(self, total_steps: int) -> list[Stage]:
        """The stages no step of a `total_steps` budget holds: a budget too short for the stage list skips them
        (the last step always holds the last stage)."""
        held = set(bits_trace(self, total_steps))
        return [s for s in self.stages if s.bits not in held]

    def steps_for_every_stage(self) -> int:
        """The shortest budget in which every stage holds at least one step."""
        steps = len(self.stages)
        while any(self._stage_is_empty(i, steps) for i in range(len(self.stages) - 1)):
            steps += 1
        return steps

    def _stage_is_empty(self, index: int, total_steps: int) -> bool:
        """No step k <= total_steps - 2 with k / total_steps in the stage's [lower, upper) bounds."""
        lower = self._bounds[index - 1] if index else 0.0
        first = math.ceil(lower * total_steps)
        return not (first < self._bounds[index] * total_steps and first <= total_steps - 2)

    def __repr__(self) -> str:
        stages = ", ".join(f"{s.bits:g}x{s.share:g}" for s in self.stages)
        return f"StagedSchedule({self.name}: {stages})"


class SmoothSchedule:
    """A continuous decay from `start_bits` to `end_bits`, then `hold_share` of the budget at `end_bits`.

    The paper names its hand-picked levels as a limitation; this is the simplest
    alternative: `linear` or `cosine` in the training position.
    """

    def __init__(
        self,
        start_bits: float = 8,
        end_bits: float = 4,
        hold_share: float = 0.56,
        shape: Literal["linear", "cosine"] = "cosine",
        name: str = "smooth",
    ) -> None:
        self.start_bits, self.end_bits = validate_bits(start_bits), validate_bits(end_bits)
        if self.start_bits > 16 or self.end_bits > 16:
            raise ValueError(f"a smooth decay runs between bit-widths in [2, 16]; got {start_bits} -> {end_bits}")
        if self.start_bits < self.end_bits:
            raise ValueError(f"start_bits={start_bits} is below end_bits={end_bits}; a schedule only lowers precision")
        if not 0 <= hold_share < 1:
            raise ValueError(f"hold_share must lie in [0, 1); got {hold_share!r}")
        if shape not in ("linear", "cosine"):
            raise ValueError(f"unknown shape {shape!r}; allowed: linear, cosine")
        self.hold_share, self.shape, self.name = float(hold_share), shape, name

    def __call__(self, step: int, total_steps: int) -> float:
        _check_position(step, total_steps)
        decay_steps = (1 - self.hold_share) * (total_steps - 1)
        if step >= decay_steps:
            return self.end_bits
        t = step / decay_steps  # in [0, 1)
        weight = 1 - t if self.shape == "linear" else 0.5 * (1 + math.cos(math.pi * t))
        return max(self.end_bits, self.end_bits + (self.start_bits - self.end_bits) * weight)

    def __repr__(self) -> str:
        decay = f"{self.shape} {self.start_bits:g} -> {self.end_bits:g}"
        return f"SmoothSchedule({self.name}: {decay}, hold {self.hold_share:g})"


def bits_trace(schedule, total_steps: int) -> list[float]:
    """The bit-width at every step of a budget, for plots and checks."""
    return [schedule(step, total_steps) for step in range(total_steps)]
