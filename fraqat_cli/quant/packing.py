"""Integer codes in the smallest storage that holds them: two 4-bit codes to a byte, else int8/int16.

Deployment stores what a quantized weight really is: its integer codes. Codes of
at most 4 bits share a byte (low nibble first); wider ones take the narrowest
integer type of safetensors that holds their range. Signed (symmetric) nibbles
are two's complement, unsigned (asymmetric) ones plain.
"""

from __future__ import annotations

import math

import torch

from fraqat_cli.quant.fake_quant import code_range


def storage_of(bits: int, symmetric: bool) -> str:
    """Where `bits`-bit codes are kept: 'int4' / 'uint4' (packed nibbles), int8, uint8, int16 or int32."""
    if bits <= 4:
        return "int4" if symmetric else "uint4"
    if bits <= 8:
        return "int8" if symmetric else "uint8"
    return "int16" if symmetric else "int32"  # an asymmetric 16-bit code reaches 65535


def pack_codes(codes: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """`codes` (any integer dtype, within the b-bit integer range: [-2^(b-1), 2^(b-1) - 1] signed, which a clipping
    learned or searched scale reaches at its bottom, or [0, 2^b - 1]) in their storage form, flattened."""
    lo, hi = code_range(bits, symmetric, "nearest_int_range")
    if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise ValueError(
            f"codes span [{int(codes.min())}, {int(codes.max())}], outside the {bits}-bit range [{lo}, {hi}]")
    storage = storage_of(bits, symmetric)
    flat = codes.reshape(-1).to(torch.int32)
    if storage in ("int4", "uint4"):
        nibbles = (flat & 0xF).to(torch.uint8)  # two's complement low nibble for negative codes
        if nibbles.numel() % 2:
            nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
        return nibbles[0::2] | (nibbles[1::2] << 4)
    return flat.to(getattr(torch, storage))


def unpack_codes(stored: torch.Tensor, bits: int, symmetric: bool, shape: tuple[int, ...]) -> torch.Tensor:
    """int32 codes of `shape` from `pack_codes`' output."""
    numel = math.prod(shape)
    if storage_of(bits, symmetric) in ("int4", "uint4"):
        if stored.dtype != torch.uint8 or stored.numel() != (numel + 1) // 2:
            raise ValueError(f"packed 4-bit codes of shape {tuple(shape)} need {(numel + 1) // 2} uint8 bytes; "
                             f"got {stored.numel()} of {stored.dtype}")
        nibbles = torch.stack([stored & 0xF, stored >> 4], dim=1).reshape(-1)[:numel].to(torch.int32)
        if symmetric:
            nibbles = torch.where(nibbles >= 8, nibbles - 16, nibbles)
        return nibbles.reshape(shape)
    if stored.numel() != numel:
        raise ValueError(f"codes of shape {tuple(shape)} need {numel} values; got {stored.numel()}")
    return stored.to(torch.int32).reshape(shape)
