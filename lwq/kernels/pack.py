"""Bit packing: ``pack`` / ``unpack`` for 2, 3, 4, 6 and 8 bits (and any width up to 16).

Values are laid end to end as a little-endian bit stream inside 32-bit words along one dimension:
value ``i`` occupies stream bits ``[i*bits, (i+1)*bits)``, word ``w`` holds stream bits
``[32w, 32w+32)`` with bit 0 the least significant. This is GPTQ's layout (3-bit and 6-bit values
span word boundaries); words are stored as int32 (two's complement of the unsigned word).
"""
from __future__ import annotations

import math

import torch

_MASK32 = (1 << 32) - 1


def packed_len(n: int, bits: int) -> int:
    """Number of 32-bit words for ``n`` values."""
    return math.ceil(n * bits / 32)


def pack(q: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Pack integers in ``[0, 2**bits)`` along ``dim`` into int32 words (see module docstring)."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    q = q.movedim(dim, 0).to(torch.int64)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= (1 << bits)):
        raise ValueError(f"values out of range for {bits}-bit packing")
    n, rest = q.shape[0], q.shape[1:]
    nwords = packed_len(n, bits)
    start = torch.arange(n, dtype=torch.int64) * bits
    word, off = start // 32, start % 32
    shape = (n,) + (1,) * len(rest)
    lo = (q << off.view(shape)) & _MASK32
    out = torch.zeros((nwords + 1,) + tuple(rest), dtype=torch.int64)
    out.index_add_(0, word, lo)
    spill = (off + bits) > 32
    if bool(spill.any()):
        hi = q[spill] >> (32 - off[spill]).view((-1,) + (1,) * len(rest))
        out.index_add_(0, word[spill] + 1, hi)
    out = out[:nwords]
    out = torch.where(out >= (1 << 31), out - (1 << 32), out).to(torch.int32)
    return out.movedim(0, dim)


def unpack(packed: torch.Tensor, bits: int, n: int, dim: int = 0) -> torch.Tensor:
    """Inverse of ``pack``: the first ``n`` values along ``dim`` as int32 in ``[0, 2**bits)``."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    w = packed.movedim(dim, 0).to(torch.int64) & _MASK32
    if w.shape[0] < packed_len(n, bits):
        raise ValueError(f"{w.shape[0]} words cannot hold {n} values of {bits} bits")
    rest = w.shape[1:]
    w = torch.cat([w, torch.zeros((1,) + tuple(rest), dtype=torch.int64)])
    start = torch.arange(n, dtype=torch.int64, device=w.device) * bits
    word, off = start // 32, start % 32
    shape = (n,) + (1,) * len(rest)
    lo = w[word] >> off.view(shape)
    hi = w[word + 1] << (32 - off).view(shape)
    vals = (lo | hi) & ((1 << bits) - 1)
    return vals.to(torch.int32).movedim(0, dim)


def group_index(in_features: int, group_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``g_idx`` without act-order: ``i // group_size`` (all zeros for per-channel, group -1)."""
    idx = torch.arange(in_features, dtype=torch.int32, device=device)
    return torch.zeros_like(idx) if group_size == -1 else idx // group_size
