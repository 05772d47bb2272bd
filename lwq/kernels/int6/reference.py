"""Pure-torch reference of the INT6 kernels (W6A16 and W6A8) over the bit-plane layout of
``lwq.formats.int6``: codes are ``lo | hi << 4`` with ``lo`` from the 4-bit plane and ``hi`` from the
2-bit plane; groups are contiguous (act-order is stored as a column permutation ``perm``).
"""
from __future__ import annotations

import torch

from lwq.kernels.pack import unpack
from lwq.kernels.w4a16.reference import dequant_kn, weight_only_matmul
from lwq.kernels.w4a8.reference import a8_reference
from lwq.kernels.pack import group_index


def unpack_int6(qweight_lo: torch.Tensor, qweight_hi: torch.Tensor, K: int) -> torch.Tensor:
    """Unsigned 6-bit codes (K, N) from the planes (lo int32 [ceil(K/8), N], hi int32 [ceil(K/16), N])."""
    return unpack(qweight_lo, 4, K, dim=0) | (unpack(qweight_hi, 2, K, dim=0) << 4)


def w6a16_reference(x: torch.Tensor, qweight_lo: torch.Tensor, qweight_hi: torch.Tensor, scales: torch.Tensor,
                    group_size: int, zeros: torch.Tensor | None = None,
                    perm: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T`` with 6-bit weights and 16-bit activations (``zeros`` None: symmetric, zero 32)."""
    K = x.shape[-1]
    if perm is not None:
        x = x[..., perm.long()]
    q = unpack_int6(qweight_lo, qweight_hi, K)
    W = dequant_kn(q, 32 if zeros is None else zeros, scales, group_index(K, group_size, q.device))
    return weight_only_matmul(x, W)


def w6a8_reference(x: torch.Tensor, qweight_lo: torch.Tensor, qweight_hi: torch.Tensor, scales: torch.Tensor,
                   group_size: int, smooth: torch.Tensor | None = None,
                   perm: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T`` with symmetric 6-bit weights and per-token int8 activations (as W4A8)."""
    codes = unpack_int6(qweight_lo, qweight_hi, x.shape[-1]) - 32
    return a8_reference(x, codes, scales, group_size, smooth, perm)
