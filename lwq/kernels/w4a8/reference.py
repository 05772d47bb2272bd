"""Pure-torch reference of the int8-activation path (what ``w4a8.kernel`` computes, bit for bit on
the integer side): per-token symmetric int8 quantization of ``x / smooth`` and a group-wise int8 x
int4 (or int6) product accumulated exactly, rescaled by fp16 group scales and the token scales.
"""
from __future__ import annotations

import torch

from lwq.kernels.pack import unpack

EPS = 1e-12


def inverse_smooth(smooth: torch.Tensor | None) -> torch.Tensor | None:
    """``1 / smooth`` in fp32 (activations are multiplied by it; shared by kernel and reference)."""
    return None if smooth is None else smooth.float().reciprocal()


def quantize_activations(x2d: torch.Tensor, smooth: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token int8: ``v = x * (1/smooth)`` (fp32), ``amax = max(|v|, EPS)``,
    ``q = round_half_even(v * (127 / amax))`` in [-127, 127]; returns (q int8 [M, K], amax / 127 fp32 [M])."""
    v = x2d.float()
    inv = inverse_smooth(smooth)
    if inv is not None:
        v = v * inv
    amax = v.abs().amax(dim=-1).clamp_min(EPS) if v.shape[-1] else torch.full(v.shape[:-1], EPS)
    q = torch.round(v * (127.0 / amax)[:, None]).clamp(-127, 127).to(torch.int8)
    return q, amax / 127.0


def int8_group_matmul(xq: torch.Tensor, xscale: torch.Tensor, codes_kn: torch.Tensor, scales: torch.Tensor,
                      group_size: int, out_dtype: torch.dtype) -> torch.Tensor:
    """``sum_g float(xq[:, g] @ codes[g]) * scales[g]`` (groups of contiguous input columns, exact integer
    partial sums), times the token scales; ``codes_kn`` signed (K, N)."""
    M, K = xq.shape
    gs = K if group_size == -1 else group_size
    acc = torch.zeros(M, codes_kn.shape[1], dtype=torch.float32, device=xq.device)
    for g, k0 in enumerate(range(0, K, max(gs, 1))):
        part = xq[:, k0:k0 + gs].double() @ codes_kn[k0:k0 + gs].double()  # exact: |sum| < 2**53
        acc = acc + part.float() * scales[g].float()
    return (acc * xscale[:, None]).to(out_dtype)


def signed_codes(qweight: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """Signed weight codes (K, N) of a 4-bit weight packed along K (GPTQ words): ``q - 8``."""
    return unpack(qweight, bits, K, dim=0) - (1 << (bits - 1))


def a8_reference(x: torch.Tensor, codes_kn: torch.Tensor, scales: torch.Tensor, group_size: int,
                 smooth: torch.Tensor | None = None, perm: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T`` through int8 activations: columns gathered by ``perm`` (act-order), then quantized."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if perm is not None:
        x2 = x2[:, perm.long()]
        smooth = None if smooth is None else smooth[perm.long()]
    xq, xs = quantize_activations(x2, smooth)
    y = int8_group_matmul(xq, xs, codes_kn, scales, group_size, x.dtype)
    return y.reshape(*x.shape[:-1], codes_kn.shape[1])


def w4a8_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                   smooth: torch.Tensor | None = None, perm: torch.Tensor | None = None) -> torch.Tensor:
    """The W4A8 layer function over its packed tensors (see ``lwq.formats.w4a8``)."""
    return a8_reference(x, signed_codes(qweight, 4, x.shape[-1]), scales, group_size, smooth, perm)
