"""Entry points of the int8-activation kernels: per-token quantization prologue, int8 GEMM, W4A8 layer.

``int6.ops`` reuses ``quantize_act`` and ``int8_gemm`` with 6-bit weights.
"""
from __future__ import annotations

from typing import Any

import torch

from lwq.errors import LwqError
from lwq.kernels.runtime import launch_config, require_triton
from lwq.kernels.w4a16.ops import check_input, emulate_bf16, store_rounding, triton_cdiv
from lwq.kernels.w4a8.reference import inverse_smooth


def quantize_act(x2: torch.Tensor, smooth: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton per-token int8 quantization of a contiguous (M, K) activation: (q int8, scale fp32 [M])."""
    require_triton()
    from lwq.kernels.w4a8.kernel import quant_act_kernel

    M, K = x2.shape
    xq = torch.empty((M, K), dtype=torch.int8, device=x2.device)
    xs = torch.empty((M,), dtype=torch.float32, device=x2.device)
    if M == 0:
        return xq, xs
    inv = inverse_smooth(smooth)
    rows = min(16, 1 << (M - 1).bit_length())
    block = min(1 << (K - 1).bit_length(), max(128, 8192 // rows))
    quant_act_kernel[(triton_cdiv(M, rows),)](x2, xs if inv is None else inv.contiguous(), xq, xs, M, K, x2.stride(0),
                                              HAS_SMOOTH=inv is not None, ROWS=rows, BLOCK=block)
    return xq, xs


def int8_gemm(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, hi: torch.Tensor | None, scales: torch.Tensor,
              group_size: int, bits: int, out_dtype: torch.dtype, split_k: int | None = None) -> torch.Tensor:
    """``(sum_g float(xq_g @ codes_g) * scales[g]) * xs`` with signed ``bits``-bit codes unpacked in registers."""
    require_triton()
    from lwq.kernels.w4a8.kernel import wa8_kernel

    M, K = xq.shape
    N = scales.shape[1]
    if M == 0:
        return torch.zeros((0, N), dtype=out_dtype, device=xq.device)
    max_bk = 128 if group_size == -1 else min(128, group_size)
    cfg = launch_config(M, N, K, xq.device, max_block_k=max_bk, split_k=split_k)
    group = triton_cdiv(K, cfg.block_k) * cfg.block_k if group_size == -1 else group_size
    out = torch.zeros((M, N), dtype=torch.float32, device=xq.device) if cfg.split_k > 1 else \
        torch.empty((M, N), dtype=out_dtype, device=xq.device)
    grid = (triton_cdiv(M, cfg.block_m), triton_cdiv(N, cfg.block_n), cfg.split_k)
    wa8_kernel[grid](xq.contiguous(), xs.contiguous(), w.contiguous(), scales if hi is None else hi.contiguous(),
                     scales.contiguous(), out, M, N, K, group,
                     BITS=bits, SPLIT_K=cfg.split_k, ROUNDING=store_rounding(out.dtype),
                     EMULATE_BF16=emulate_bf16(out),
                     BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                     num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out.to(out_dtype)


def a8_linear(x: torch.Tensor, w: torch.Tensor, hi: torch.Tensor | None, scales: torch.Tensor, group_size: int,
              bits: int, smooth: torch.Tensor | None = None, perm: torch.Tensor | None = None,
              *, split_k: int | None = None) -> torch.Tensor:
    """``x @ W^T`` through int8 activations (act-order columns gathered by ``perm`` first)."""
    K = perm.shape[0] if perm is not None else (smooth.shape[0] if smooth is not None else x.shape[-1])
    check_input(x, K, w)
    x2 = x.reshape(-1, K)
    if perm is not None:
        x2 = x2[:, perm.long()]
        smooth = None if smooth is None else smooth[perm.long()]
    xq, xs = quantize_act(x2.contiguous(), smooth)
    y = int8_gemm(xq, xs, w, hi, scales, group_size, bits, x.dtype, split_k)
    return y.reshape(*x.shape[:-1], scales.shape[1])


def w4a8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                smooth: torch.Tensor | None = None, perm: torch.Tensor | None = None,
                *, split_k: int | None = None) -> torch.Tensor:
    """The W4A8 layer function (``lwq.formats.w4a8``); same as ``w4a8.reference.w4a8_reference``."""
    if group_size != -1 and group_size % 16:
        raise LwqError(f"the W4A8 kernel needs a group size that is a multiple of 16, got {group_size}")
    return a8_linear(x, qweight, None, scales, group_size, 4, smooth, perm, split_k=split_k)


def run_w4a8(x: torch.Tensor, layer: Any) -> torch.Tensor:
    """Kernel entry for a ``QuantizedLinear`` in the ``w4a8`` format."""
    return w4a8_linear(x, layer.qweight, layer.scales, layer.spec.group_size, getattr(layer, "smooth", None),
                       getattr(layer, "perm", None))
