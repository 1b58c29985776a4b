"""Counts and sizes from the config, checked where they enter: one wording for every such error."""

from __future__ import annotations


def positive_int(name: str, value, *, or_null: bool = False) -> int:
    """`value` if it is an int >= 1 (booleans are not counts); else ValueError naming `name` and `value`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or null' if or_null else ''}; got {value!r}")
    return value


def positive_number(name: str, value, *, or_null: bool = False) -> float:
    """`value` if it is a real number > 0; else ValueError naming `name` and `value`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number{' or null' if or_null else ''}; got {value!r}")
    return value
