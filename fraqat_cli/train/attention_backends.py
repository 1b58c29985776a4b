"""Which scaled-dot-product-attention kernels training may use (`attention_backends` in `conf/train.yaml`).

Why: on CUDA (torch 2.11, H200), cuDNN's attention backward returns NaN gradients for tiny FLUX's joint
attention under bf16 autocast in most draws, while the flash, memory-efficient and math kernels give finite
ones on the same inputs (docs/real-models.md). Training therefore leaves cuDNN out unless told.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


def attention_backends(names) -> tuple[SDPBackend, ...] | None:
    """The backends `names` lists (None or empty: torch's own choice among all); ValueError for an unknown one."""
    if not names:
        return None
    if isinstance(names, str):
        raise ValueError(f"attention_backends must be a list, e.g. [flash, efficient, math]; got {names!r}")
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ValueError(f"attention_backends={list(names)} names unknown kernel(s) {unknown}; "
                         f"allowed: {', '.join(BACKENDS)} (or null for torch's choice)")
    return tuple(BACKENDS[n] for n in names)


def restricted_attention(backends: tuple[SDPBackend, ...] | None) -> AbstractContextManager:
    """A context in which SDPA picks among `backends` only (the backward uses the forward's kernel)."""
    return sdpa_kernel(list(backends)) if backends else nullcontext()
