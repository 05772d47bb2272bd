"""Uniform affine quantization primitives shared by the backends and the scorers (pure functions).

Grid: ``maxq = 2**bits - 1``; ``q = clamp(round(w / scale) + zero, 0, maxq)``; ``w ~ scale * (q - zero)``.
Asymmetric: min/max of each group (widened to include 0, as GPTQ does). Symmetric: ``zero = 2**(bits-1)``
and the range is +-absmax. Groups run along the input dimension; ``g_idx[i]`` is the group of input
column ``i`` (``i // group_size`` without act-order; the last group may be shorter).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lwq.kernels.pack import group_index


@dataclass(frozen=True)
class QParams:
    """Per-group grid: ``scale`` and ``zero`` of shape ``(out, groups)``; ``zero`` is an integer tensor."""

    scale: torch.Tensor
    zero: torch.Tensor


def minmax_params(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for each row of ``x`` (rows are groups): GPTQ's ``Quantizer.find_params``."""
    maxq = 2**bits - 1
    x = x.float()
    xmin = torch.minimum(x.min(dim=1).values, torch.zeros(1, device=x.device))
    xmax = torch.maximum(x.max(dim=1).values, torch.zeros(1, device=x.device))
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, -torch.ones_like(xmin), xmin)
    xmax = torch.where(flat, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def quantize_values(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of ``x`` on the grid (broadcasting ``scale``/``zero``)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)


def mse_params(x: torch.Tensor, bits: int, sym: bool, grid: int = 100, max_shrink: float = 0.8,
               norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max params with the range shrunk per row to minimise ``|x - deq(x)|^norm`` (GPTQ's ``mse``)."""
    scale, zero = minmax_params(x, bits, sym)
    x = x.float()
    best = torch.full((x.shape[0],), float("inf"), device=x.device)
    xmin0 = torch.minimum(x.min(dim=1).values, torch.zeros(1, device=x.device))
    xmax0 = torch.maximum(x.max(dim=1).values, torch.zeros(1, device=x.device))
    maxq = 2**bits - 1
    for i in range(int(max_shrink * grid)):
        p = 1 - i / grid
        xmin, xmax = p * xmin0, p * xmax0
        if sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = torch.where(xmin < 0, -xmax, xmin)
        s = torch.clamp((xmax - xmin) / maxq, min=1e-12)
        z = torch.full_like(s, (maxq + 1) // 2) if sym else torch.round(-xmin / s)
        q = quantize_values(x, s[:, None], z[:, None], bits)
        err = ((s[:, None] * (q - z[:, None]) - x).abs() ** norm).sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def rtn_params(W: torch.Tensor, bits: int, group_size: int, sym: bool, mse: bool = False) -> QParams:
    """Per-group params of ``W`` (out, in) for round-to-nearest; ragged last group allowed."""
    out_f, in_f = W.shape
    gs = in_f if group_size == -1 else group_size
    scales, zeros = [], []
    find = mse_params if mse else minmax_params
    for start in range(0, in_f, gs):
        s, z = find(W[:, start:start + gs], bits, sym)
        scales.append(s)
        zeros.append(z)
    return QParams(torch.stack(scales, dim=1), torch.stack(zeros, dim=1).to(torch.int32))


def quantize_with(W: torch.Tensor, qp: QParams, g_idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (out, in) of ``W`` under per-group params, columns mapped to groups by ``g_idx``."""
    g = g_idx.long()
    return quantize_values(W.float(), qp.scale[:, g], qp.zero[:, g].float(), bits).to(torch.int32)


def dequantize(q: torch.Tensor, qp: QParams, g_idx: torch.Tensor) -> torch.Tensor:
    """Float weight (out, in) from codes and per-group params."""
    g = g_idx.long()
    return qp.scale[:, g] * (q.float() - qp.zero[:, g].float())


def rtn_fake_quant(W: torch.Tensor, bits: int, group_size: int = 128, sym: bool = False,
                   mse: bool = False) -> torch.Tensor:
    """``dequantize(quantize(W))`` with round-to-nearest, in ``W``'s dtype (for scorers and estimates)."""
    if bits >= 16:
        return W
    qp = rtn_params(W, bits, group_size, sym, mse)
    g_idx = group_index(W.shape[1], group_size, W.device)
    return dequantize(quantize_with(W, qp, g_idx, bits), qp, g_idx).to(W.dtype)
