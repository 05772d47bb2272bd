"""Triton kernels for int8 activations: per-token activation quantization and the int8 GEMM.

``quant_act_kernel`` (``ROWS`` rows per program): ``v = x * inv_smooth`` in fp32, ``amax = max|v|``
(at least ``reference.EPS`` = 1e-12), ``q = rint(v * (127 / amax))`` clamped to +-127 (round half to even with the
1.5 * 2**23 trick, IEEE divisions via ``div_rn``), ``scale = amax / 127``; bit-identical to
``lwq.kernels.w4a8.reference.quantize_activations``.

``wa8_kernel``: int8 activations times signed weight codes (``code - 2**(BITS-1)``, 4- or 6-bit,
unpacked in registers to int8) by ``tl.dot`` into int32, one int32 accumulator per group of input
columns (groups contiguous; ``GROUP`` a multiple of ``BLOCK_K``), each flushed into the fp32
accumulator times that group's fp16 scale; rows scaled by the token scales at the end.
``SPLIT_K > 1`` splits the K tiles across programs that ``atomic_add`` into an fp32 output.
"""
from __future__ import annotations

import triton
import triton.language as tl

from lwq.kernels.triton_common import load_k_tile, store_tile, tile_offsets


@triton.jit
def load_act_tile(x_ptr, inv_ptr, rows, mask_r, k0, K, stride_xm,
                  HAS_SMOOTH: tl.constexpr, BLOCK: tl.constexpr):
    """Columns ``k0 .. k0+BLOCK`` of ``rows`` as fp32 times the inverse smoothing scale (``HAS_SMOOTH``):
    ``(v, offs, mask)``, zero where masked."""
    offs = k0 + tl.arange(0, BLOCK)
    mask = mask_r[:, None] & (offs < K)[None, :]
    v = tl.load(x_ptr + rows[:, None] * stride_xm + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        v = v * tl.load(inv_ptr + offs, mask=offs < K, other=0.0)[None, :]
    return v, offs, mask


# ``tl.max`` is a jitted standard-library function (see ``triton_common``); its combine function is given
# to ``tl.reduce`` directly: the interpreter recognises it and reduces with numpy instead of calling it per element.
@triton.jit
def quant_act_kernel(x_ptr, inv_ptr, xq_ptr, xs_ptr, M, K, stride_xm,
                     HAS_SMOOTH: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    mask_r = rows < M
    vmax = tl.full((ROWS, BLOCK), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK):
        v, offs, mask = load_act_tile(x_ptr, inv_ptr, rows, mask_r, k0, K, stride_xm, HAS_SMOOTH, BLOCK)
        vmax = tl.maximum(vmax, tl.abs(v))
    amax = tl.maximum(tl.reduce(vmax, 1, tl.standard._elementwise_max), 1e-12)
    inv = tl.math.div_rn(tl.full((ROWS,), 127.0, tl.float32), amax)
    for k0 in range(0, K, BLOCK):
        v, offs, mask = load_act_tile(x_ptr, inv_ptr, rows, mask_r, k0, K, stride_xm, HAS_SMOOTH, BLOCK)
        r = (v * inv[:, None] + 12582912.0) - 12582912.0
        r = tl.minimum(tl.maximum(r, -127.0), 127.0)
        tl.store(xq_ptr + rows[:, None] * K + offs[None, :], r.to(tl.int8), mask=mask)
    tl.store(xs_ptr + rows, tl.math.div_rn(amax, tl.full((ROWS,), 127.0, tl.float32)), mask=mask_r)


@triton.jit
def wa8_kernel(xq_ptr, xs_ptr, w_ptr, hi_ptr, s_ptr, out_ptr, M, N, K, GROUP,
               BITS: tl.constexpr, SPLIT_K: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               ROUNDING: tl.constexpr, EMULATE_BF16: tl.constexpr):
    offs_m, offs_n, mask_m, mask_n, t, t1 = tile_offsets(M, N, K, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K)
    tiles_per_group = GROUP // BLOCK_K
    acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.float32)
    while t < t1:
        g = t // tiles_per_group
        t_end = tl.minimum((g + 1) * tiles_per_group, t1)
        iacc = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
        for tt in range(t, t_end):
            a, q, offs_k, mask_k, mask_w = load_k_tile(xq_ptr, K, w_ptr, hi_ptr, offs_m, offs_n, mask_m, mask_n,
                                                       tt, K, N, BITS, BLOCK_K)
            b = (q - (1 << (BITS - 1))).to(tl.int8)
            iacc = tl.dot(a, b, acc=iacc, out_dtype=tl.int32)  # int8 x int8 -> int32 (older triton assumes float32)
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += iacc.to(tl.float32) * s[None, :]
        t = t_end
    xs = tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)
    acc = acc * xs[:, None]
    store_tile(out_ptr, acc, offs_m, offs_n, mask_m, mask_n, N, SPLIT_K, EMULATE_BF16, ROUNDING)
