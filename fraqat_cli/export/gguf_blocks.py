"""GGUF's 32-weight blocks, packed from a student's own integer codes and scales (never re-quantized).

Each block holds 32 consecutive weights of one row (along the input dimension) with an fp16 scale `d`
(and, for the asymmetric types, an fp16 minimum `m`), as ggml lays them out (ggml-common.h):
- Q4_0: d, then 16 bytes; byte j holds element j in its low nibble and j+16 in its high one; w = d*(q-8).
- Q4_1: d, m, the same 16 bytes; w = d*q + m.
- Q5_0: d, a little-endian uint32 whose bit j is bit 4 of element j, then Q4_0's 16 bytes; w = d*(q-16).
- Q5_1: d, m, the uint32, the 16 bytes; w = d*q + m.
- Q8_0: d, then 32 int8; w = d*q.
A symmetric student's codes are signed (narrow range: [-7, 7] at 4 bits), so Q4_0/Q5_0 store code+8 / code+16;
an asymmetric one's are unsigned ([0, 2^b - 1]) with the range's minimum as offset, Q4_1/Q5_1's `m`.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

BLOCK = 32  # weights per block of every type used here (QK4_0 = QK4_1 = QK5_0 = QK5_1 = QK8_0 = 32 in ggml)
Q = GGMLQuantizationType
ZERO_POINT = {Q.Q4_0: 8, Q.Q5_0: 16, Q.Q8_0: 0, Q.Q4_1: 0, Q.Q5_1: 0}  # stored = code + ZERO_POINT


def block_type(bits: int, symmetric: bool, where: str) -> GGMLQuantizationType:
    """The GGUF block type that holds `bits`-bit codes exactly; ValueError naming `where` when none does."""
    if bits <= 4:
        return Q.Q4_0 if symmetric else Q.Q4_1
    if bits == 5:
        return Q.Q5_0 if symmetric else Q.Q5_1
    if bits <= 8 and symmetric:
        return Q.Q8_0
    allowed = "2-8 bits symmetric (Q4_0, Q5_0, Q8_0) or 2-5 bits asymmetric (Q4_1, Q5_1)"
    kind = "symmetric" if symmetric else "asymmetric"
    raise ValueError(f"{where} has {bits}-bit {kind} weights, which no GGUF block type that diffusers loads holds "
                     f"exactly; allowed: {allowed}. Export format=safetensors instead")


def block_view(values: torch.Tensor, spec, rows: int, cols: int, where: str) -> torch.Tensor:
    """Per-group, per-channel or per-tensor `values` (a scale or offset, as `quantize_to_codes` returns it)
    repeated to one per 32-wide block: (rows, cols / 32). ValueError when the groups do not tile the blocks."""
    if cols % BLOCK:
        raise ValueError(f"{where} has input width {cols}, which GGUF's {BLOCK}-wide blocks do not divide; "
                         f"allowed: layers whose input width is a multiple of {BLOCK} (leave the others unquantized "
                         f"with the selection's exclude)")
    blocks = cols // BLOCK
    if spec.granularity == "per_tensor":
        return values.reshape(1, 1).expand(rows, blocks).contiguous()
    if spec.granularity == "per_channel":
        return values.reshape(rows, 1).expand(rows, blocks).contiguous()
    check_group_size(spec.group_size)
    return values.reshape(rows, cols // spec.group_size).repeat_interleave(spec.group_size // BLOCK, dim=1)


def check_group_size(group_size: int | None) -> None:
    if group_size is not None and group_size % BLOCK:
        raise ValueError(f"quantizer.group_size={group_size} does not divide into GGUF's {BLOCK}-wide blocks "
                         f"(one scale each); allowed: a multiple of {BLOCK} (32, 64, 128, ...), or "
                         f"quantizer=per_channel / per_tensor")


def _half_bytes(values: torch.Tensor) -> torch.Tensor:
    """(N,) values already on the fp16 grid -> (N, 2) little-endian fp16 bytes."""
    return values.reshape(-1, 1).to(torch.float16).contiguous().view(torch.uint8)


def _nibble_bytes(q: torch.Tensor) -> torch.Tensor:
    """(N, 32) values in [0, 15] -> (N, 16) bytes: element j low nibble, element j+16 high nibble."""
    return (q[:, :16] | (q[:, 16:] << 4)).to(torch.uint8)


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    """(N, 32) values in [0, 31] -> (N, 4) bytes of the little-endian uint32 whose bit j is bit 4 of element j."""
    weights = torch.tensor([1 << j for j in range(BLOCK)], dtype=torch.int64)
    word = ((q >> 4) & 1).mul(weights).sum(dim=1)  # (N,) in [0, 2^32)
    return torch.stack([(word >> (8 * i)) & 0xFF for i in range(4)], dim=1).to(torch.uint8)


def pack_blocks(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                qtype: GGMLQuantizationType) -> np.ndarray:
    """codes (rows, cols) of integers; scale and offset (rows, cols / 32) on the fp16 grid -> uint8 blocks
    (rows, cols / 32 * type_size), the array `GGUFWriter.add_tensor(..., raw_dtype=qtype)` takes."""
    rows, cols = codes.shape
    q = (codes.to(torch.int64) + ZERO_POINT[qtype]).reshape(-1, BLOCK)  # (N, 32) stored values
    parts = [_half_bytes(scale)]
    if qtype in (Q.Q4_1, Q.Q5_1):
        parts.append(_half_bytes(offset))
    if qtype in (Q.Q5_0, Q.Q5_1):
        parts.append(_high_bits(q))
    parts.append(q.to(torch.int8).view(torch.uint8) if qtype == Q.Q8_0 else _nibble_bytes(q & 0xF))
    blocks = torch.cat(parts, dim=1)  # (N, type_size)
    assert blocks.shape[1] == GGML_QUANT_SIZES[qtype][1], (qtype, blocks.shape)
    return blocks.reshape(rows, -1).numpy()


def unpack_blocks(raw: np.ndarray, qtype: GGMLQuantizationType, rows: int, cols: int):
    """The inverse of `pack_blocks`: (codes int32 (rows, cols), scale float32 (rows, cols / 32), offset or None)."""
    size = GGML_QUANT_SIZES[qtype][1]
    blocks = torch.from_numpy(np.array(raw, dtype=np.uint8)).reshape(-1, size)  # (N, type_size); a copy: writable
    half = lambda at: blocks[:, at:at + 2].contiguous().view(torch.float16).float().reshape(rows, -1)  # noqa: E731
    scale, offset, at = half(0), None, 2
    if qtype in (Q.Q4_1, Q.Q5_1):
        offset, at = half(2), 4
    high = torch.zeros(blocks.shape[0], BLOCK, dtype=torch.int64)
    if qtype in (Q.Q5_0, Q.Q5_1):
        word = sum(blocks[:, at + i].to(torch.int64) << (8 * i) for i in range(4))  # (N,)
        high, at = ((word.reshape(-1, 1) >> torch.arange(BLOCK)) & 1) << 4, at + 4
    if qtype == Q.Q8_0:
        q = blocks[:, at:].contiguous().view(torch.int8).to(torch.int64)
    else:
        low = blocks[:, at:].to(torch.int64)
        q = torch.cat([low & 0xF, low >> 4], dim=1) | high
    codes = (q - ZERO_POINT[qtype]).to(torch.int32).reshape(rows, cols)
    return codes, scale, offset
