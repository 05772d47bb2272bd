"""Entry points of the INT6 kernels: W6A16 (the weight-only GEMM with ``BITS=6``) and W6A8 (the
int8-activation GEMM with ``BITS=6``), over the bit-plane layout of ``lwq.formats.int6``."""
from __future__ import annotations

from typing import Any

import torch

from lwq.kernels.w4a16.ops import ZERO_CONST, ZERO_UINT8, check_input, launch_wa16
from lwq.kernels.w4a8.ops import a8_linear


def w6a16_linear(x: torch.Tensor, qweight_lo: torch.Tensor, qweight_hi: torch.Tensor, scales: torch.Tensor,
                 group_size: int, zeros: torch.Tensor | None = None, perm: torch.Tensor | None = None,
                 *, split_k: int | None = None) -> torch.Tensor:
    """``x @ W^T`` with 6-bit weights, 16/32-bit activations; same as ``int6.reference.w6a16_reference``."""
    K = x.shape[-1] if perm is None else perm.shape[0]
    check_input(x, K, qweight_lo)
    x2 = x.reshape(-1, K)
    if perm is not None:
        x2 = x2[:, perm.long()]
    y = launch_wa16(x2.contiguous(), qweight_lo.contiguous(), qweight_hi.contiguous(), scales.contiguous(),
                    None if zeros is None else zeros.contiguous(), ZERO_CONST if zeros is None else ZERO_UINT8,
                    None, group_size, 6, split_k)
    return y.reshape(*x.shape[:-1], scales.shape[1])


def w6a8_linear(x: torch.Tensor, qweight_lo: torch.Tensor, qweight_hi: torch.Tensor, scales: torch.Tensor,
                group_size: int, smooth: torch.Tensor | None = None, perm: torch.Tensor | None = None,
                *, split_k: int | None = None) -> torch.Tensor:
    """``x @ W^T`` with symmetric 6-bit weights and per-token int8 activations."""
    return a8_linear(x, qweight_lo, qweight_hi, scales, group_size, 6, smooth, perm, split_k=split_k)


def run_w6a16(x: torch.Tensor, layer: Any) -> torch.Tensor:
    """Kernel entry for a ``QuantizedLinear`` in the ``int6`` format with 16-bit activations."""
    return w6a16_linear(x, layer.qweight_lo, layer.qweight_hi, layer.scales, layer.spec.group_size,
                        getattr(layer, "zeros", None), getattr(layer, "perm", None))


def run_w6a8(x: torch.Tensor, layer: Any) -> torch.Tensor:
    """Kernel entry for a ``QuantizedLinear`` in the ``int6`` format with int8 activations."""
    return w6a8_linear(x, layer.qweight_lo, layer.qweight_hi, layer.scales, layer.spec.group_size,
                       getattr(layer, "smooth", None), getattr(layer, "perm", None))
