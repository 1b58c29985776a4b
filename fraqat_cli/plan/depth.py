"""A real model's step traced on shallow twins of it and extrapolated to its depth by arithmetic.

A diffusion transformer is a stack of identical blocks (FLUX: two kinds), and what a training step holds grows
by the same amount with each block: its weights, gradients and optimizer state, the activations it saves (or,
under gradient checkpointing, its input), its FLOPs. So the step of N blocks is the step of two blocks plus
(N - 2) times what one more block adds, each kind apart: two or three shallow traces instead of one of the
whole depth (seconds instead of minutes on fake tensors). Two blocks, not one: with one block the peak falls
elsewhere in the step (the optimizer update, before any gradient of a second block exists). SD3.5's blocks
with a second attention (`dual_attention_layers`, its first 13) are a kind of their own, and its last block
(which keeps no context stream) stays in every twin as the last. Models whose blocks differ by index otherwise,
or that are small anyway, are traced whole.
"""

from __future__ import annotations

import copy
import dataclasses

from omegaconf import DictConfig, OmegaConf, open_dict

from fraqat_cli.models.architecture import LAYER_KEYS
from fraqat_cli.plan.trace import StepTrace, trace_step

BASE_DEPTH = 2  # blocks of each kind in the shallowest twin traced
DUAL = "dual_attention_layers"  # SD3.5: the indices of the blocks with a second attention
KEPT = ("largest_block_bytes", "outside_blocks_bytes", "cond_row_bytes", "latent_row_bytes")  # not per block


def block_counts(model_cfg: DictConfig) -> dict[str, int] | None:
    """Blocks of each kind (`num_layers`, `num_single_layers`; SD3.5: `dual_attention_layers` for its dual
    blocks, `num_layers` for the others) of a model whose step can be extrapolated by depth; None when it is
    traced whole (no `architecture` of plain numbers, blocks that differ by index, or no deeper than the twins)."""
    arch = model_cfg.get("architecture")
    if arch is None or "_target_" in arch or any(OmegaConf.is_list(v) for k, v in arch.items() if k != DUAL):
        return None
    counts = {key: int(arch[key]) for key in LAYER_KEYS if key in arch}
    dual = list(arch.get(DUAL) or [])
    if dual:
        if dual != list(range(len(dual))) or "num_layers" not in counts:
            return None  # dual blocks scattered among the others: their order matters, traced whole
        counts = {DUAL: len(dual), "num_layers": counts["num_layers"] - len(dual)}
    if not counts or min(counts.values()) < BASE_DEPTH or max(counts.values()) <= BASE_DEPTH + 1:
        return None
    return counts


def with_depth(cfg: DictConfig, counts: dict[str, int]) -> DictConfig:
    """`cfg` with its model's block counts set to `counts` (as `block_counts` gives them), the width untouched."""
    shallow = copy.deepcopy(cfg)
    entries = dict(counts)
    if DUAL in counts:  # the dual blocks first, then the others: num_layers counts them all
        entries = {"num_layers": counts[DUAL] + counts["num_layers"], DUAL: list(range(counts[DUAL]))}
    with open_dict(shallow):
        shallow.model.architecture.update(entries)
    return shallow


def _numbers(trace: StepTrace) -> dict:
    return {f.name: getattr(trace, f.name) for f in dataclasses.fields(trace)}


def _add(total: dict, deeper: StepTrace, base: StepTrace, times: int) -> dict:
    """`total` plus `times` what `deeper` (one block more) holds beyond `base`, field by field."""
    out = dict(total)
    for name, value in _numbers(deeper).items():
        if name in KEPT:
            continue
        if name == "peak_breakdown":
            out[name] = {k: out[name].get(k, 0) + times * (value.get(k, 0) - base.peak_breakdown.get(k, 0))
                         for k in {*out[name], *value}}
        else:
            out[name] = out[name] + times * (value - getattr(base, name))
    out["largest_block_bytes"] = max(out["largest_block_bytes"], deeper.largest_block_bytes)
    return out


def trace_by_depth(cfg: DictConfig, batch_size: int, accumulating: bool, row: dict | None = None) -> StepTrace:
    """`trace_step` of `cfg`'s whole model, from shallow twins where `block_counts` allows it, else whole."""
    counts = block_counts(cfg.model)
    if counts is None:
        return trace_step(cfg, batch_size, accumulating, row)
    base_counts = {key: BASE_DEPTH for key in counts}
    base = trace_step(with_depth(cfg, base_counts), batch_size, accumulating, row)
    total = _numbers(base)
    for key, blocks in counts.items():
        if blocks > BASE_DEPTH:
            deeper = trace_step(with_depth(cfg, {**base_counts, key: BASE_DEPTH + 1}), batch_size, accumulating, row)
            total = _add(total, deeper, base, blocks - BASE_DEPTH)
    return StepTrace(**total)
