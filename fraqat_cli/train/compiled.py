"""A compiled student (`compile.enabled=true`): torch.compile of each transformer block, fake quantizers inside.

Eagerly, every fake quantizer is a chain of small elementwise kernels on every step; compiled, inductor fuses
each chain into a few. The bit-width is a graph input (`quant/traced.py`), so a staged or smooth schedule reuses
the graphs: they are compiled again only when a quantizer crosses full precision's edge and, for `scale=mse`,
around the step after each bit change (a graph break where the clip ratio is searched eagerly).

Each block's `forward` is compiled, not its `__call__`: the hooks around it stay eager (FSDP's all-gather,
the feature loss's output hooks, added and removed every step, would otherwise be guarded and compile again),
and the module, its state dict and so its checkpoints are the ones eager training writes.
"""

from __future__ import annotations

import torch
from torch import nn


def compile_blocks(model: nn.Module, block_classes: tuple[type[nn.Module], ...], backend="inductor",
                   mode: str | None = None) -> int:
    """Compile the `forward` of every instance of `block_classes` in `model`, in place; returns how many.
    `backend`: a torch.compile backend (a name, or a callable such as dynamo's test counters)."""
    blocks = [m for m in model.modules() if isinstance(m, block_classes)]
    if not blocks:
        names = ", ".join(cls.__name__ for cls in block_classes)
        raise ValueError(f"compile.enabled=true: no block of the student is one of model.block_classes ({names}); "
                         f"name its transformer block classes")
    for block in blocks:
        if not getattr(block, "_fraqat_compiled", False):
            block.forward = torch.compile(block.forward, backend=backend, mode=mode)
            block._fraqat_compiled = True
    return len(blocks)


__all__ = ["compile_blocks"]
