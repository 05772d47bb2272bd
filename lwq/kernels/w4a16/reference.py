"""Pure-torch reference of the weight-only GEMM (the function ``w4a16.kernel.wa16_kernel`` computes).

``W[k, n] = (q[k, n] - zero[g(k), n]) * scale[g(k), n]`` in fp32, rounded to the activation dtype
(the kernel feeds the tensor cores in that dtype), then ``x @ W`` accumulated in fp32.
"""
from __future__ import annotations

import torch

from lwq.kernels.pack import unpack


def dequant_kn(q: torch.Tensor, zeros: torch.Tensor | int, scales: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """fp32 weight (K, N) from codes (K, N), zeros (groups, N) or a constant, scales (groups, N), group per k."""
    g = g.long()
    z = zeros[g].to(torch.int32) if isinstance(zeros, torch.Tensor) else zeros
    return (q.to(torch.int32) - z).float() * scales[g].float()


def weight_only_matmul(x: torch.Tensor, W_kn: torch.Tensor) -> torch.Tensor:
    """``x @ W`` with ``W`` rounded to ``x``'s dtype, accumulated in fp32, returned in ``x``'s dtype."""
    W = W_kn.to(x.dtype).float()
    return (x.float() @ W).to(x.dtype)


def w4a16_reference(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor | None, scales: torch.Tensor,
                    g_idx: torch.Tensor | None, bits: int = 4, group_size: int = -1) -> torch.Tensor:
    """``x @ W^T`` for a GPTQ-layout weight (qweight [words(K), N], qzeros [groups, words(N)]); without
    ``g_idx`` column ``k`` is in group ``k // group_size``."""
    K, N = x.shape[-1], scales.shape[1]
    if g_idx is None:
        g_idx = torch.arange(K, device=x.device) // (K if group_size == -1 else group_size)
    q = unpack(qweight, bits, K, dim=0)
    z = unpack(qzeros, bits, N, dim=1) if qzeros is not None else 1 << (bits - 1)
    return weight_only_matmul(x, dequant_kn(q, z, scales, g_idx))
