"""Whether a student's weights are finite: checked before a checkpoint is written and before one is read."""

from __future__ import annotations

import torch


def all_finite(tensors) -> bool:
    """Whether every floating-point tensor holds only finite values (one device sync, sharded tensors by their
    local shard: the caller agrees across ranks)."""
    flags = []
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if local.is_floating_point() and local.numel():
            flags.append(torch.isfinite(local).all())
    return bool(torch.stack([f.to(flags[0].device) for f in flags]).all()) if flags else True


QUANTIZER_STATE = "_quantizer."  # bits and static activation ranges (NaN until calibrated): state, not weights


def first_non_finite(state: dict) -> str | None:
    """The name of the first weight of a state dict holding a NaN or an infinity, else None (quantizer
    state is not a weight)."""
    return next((name for name, t in state.items() if QUANTIZER_STATE not in name and t.is_floating_point()
                 and not torch.isfinite(t).all()), None)
