"""Entry point of the weight-only Triton GEMM: checks, allocation, grid, launch.

``w4a16_linear`` runs GPTQ-layout weights (2/4/8 bits, with or without act-order ``g_idx``);
``int6.ops`` reuses ``launch_wa16`` with the 6-bit plane layout. M <= 16 on a GPU uses split-K.
"""
from __future__ import annotations

from typing import Any

import torch

from lwq.errors import LwqError
from lwq.kernels.runtime import interpreting, launch_config, require_triton

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ZERO_CONST, ZERO_PACKED, ZERO_UINT8 = 0, 1, 2


def check_input(x: torch.Tensor, K: int, weight: torch.Tensor, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> None:
    """One-line errors for a wrong activation dtype, width or device."""
    if x.dtype not in dtypes:
        raise LwqError(f"kernel supports activations {', '.join(str(d) for d in dtypes)}, got {x.dtype}")
    if x.shape[-1] != K:
        raise LwqError(f"activation width {x.shape[-1]} does not match the layer's {K} inputs")
    if x.device != weight.device:
        raise LwqError(f"activations on {x.device} but weights on {weight.device}")


def launch_wa16(x2: torch.Tensor, w: torch.Tensor, hi: torch.Tensor | None, scales: torch.Tensor,
                zeros: torch.Tensor | None, zero_mode: int, g_idx: torch.Tensor | None, group_size: int,
                bits: int, split_k: int | None = None) -> torch.Tensor:
    """Launch ``wa16_kernel`` on a contiguous (M, K) activation; returns (M, N) in ``x2``'s dtype."""
    require_triton()
    from lwq.kernels.w4a16.kernel import wa16_kernel

    M, K = x2.shape
    N = scales.shape[1]
    if M == 0:
        return x2.new_zeros((0, N))
    cfg = launch_config(M, N, K, x2.device, split_k=split_k)
    out = torch.zeros((M, N), dtype=torch.float32, device=x2.device) if cfg.split_k > 1 else \
        torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    grid = (triton_cdiv(M, cfg.block_m), triton_cdiv(N, cfg.block_n), cfg.split_k)
    wa16_kernel[grid](
        x2, w, scales if hi is None else hi, scales, scales if zeros is None else zeros,
        scales if g_idx is None else g_idx, out,
        M, N, K, K if group_size == -1 else group_size, 1 if zeros is None else zeros.shape[-1], x2.stride(0),
        BITS=bits, ZERO_MODE=zero_mode, HAS_GIDX=g_idx is not None, SPLIT_K=cfg.split_k,
        EMULATE_BF16=emulate_bf16(x2),
        ROUNDING=store_rounding(x2.dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out.to(x2.dtype)


def emulate_bf16(x: torch.Tensor) -> bool:
    """bf16 under Triton's interpreter (its bf16 dot and casts are wrong): the kernels emulate them."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and interpreting()


def store_rounding(dtype: torch.dtype) -> str | None:
    """Round-to-nearest-even when the fp32 accumulator is stored in 16 bits (torch's rounding)."""
    return "rtne" if dtype in (torch.float16, torch.bfloat16) else None


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor | None, scales: torch.Tensor,
                 g_idx: torch.Tensor | None, bits: int = 4, *, group_size: int = -1,
                 split_k: int | None = None) -> torch.Tensor:
    """``x @ W^T`` (no bias) for a GPTQ-layout weight; same function as ``w4a16.reference.w4a16_reference``.
    Without a stored ``g_idx`` (no act-order) column ``k`` is in group ``k // group_size``; without
    ``qzeros`` (symmetric) every zero point is ``2**(bits-1)``."""
    if 32 % bits:
        raise LwqError(f"the W4A16 kernel packs 32/bits codes per word; {bits}-bit is not supported")
    K = x.shape[-1] if g_idx is None else g_idx.shape[0]
    check_input(x, K, qweight)
    x2 = x.reshape(-1, K).contiguous()
    g = None if g_idx is None else g_idx.to(torch.int32).contiguous()
    y = launch_wa16(x2, qweight.contiguous(), None, scales.contiguous(),
                    None if qzeros is None else qzeros.contiguous(), ZERO_CONST if qzeros is None else ZERO_PACKED,
                    g, -1 if g is not None else group_size, bits, split_k)
    return y.reshape(*x.shape[:-1], scales.shape[1])


def run_gptq(x: torch.Tensor, layer: Any) -> torch.Tensor:
    """Kernel entry for a ``QuantizedLinear`` in the ``gptq`` format."""
    t = layer.tensors()
    return w4a16_linear(x, t["qweight"], t.get("qzeros"), t["scales"], t.get("g_idx"), layer.spec.bits,
                        group_size=layer.spec.group_size)
